// Command weightsnap is the operator's CLI: pack a model directory into an
// image made for lazy loading, convert an existing image into one whose
// every range can be checked, mount an image lazily without containerd,
// look after a node's cache, and run the demo.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/bytesize"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/pack"
	"github.com/weightsnap/weightsnap/remote"
)

const usage = `usage: weightsnap <command> [flags]

commands:
  pack  [--threshold SIZE] [--plain-http] DIR REF   turn a model directory into an image made for lazy loading
  convert [--plain-http] SRC DST                  push SRC as DST with a chunk table for every layer, tar headers for tar layers, in its config (no layer is uploaded)
  mount [--plain-http] [--cache-dir DIR] [--unverified-layers full|lazy] REF MOUNTPOINT
                                                  mount an image lazily; unmounts and exits on SIGINT/SIGTERM
  demo  [--size SIZE]                             the main job on an embedded registry and a generated model
  cache [--cache-dir DIR] list                    what the node cache holds: each blob and stream, its images, how much is present, verified
  cache [--cache-dir DIR] [--max-bytes SIZE] usage
                                                  bytes of data and on disk, against the bound if given
  cache [--cache-dir DIR] [--all] prune           remove what no image record names (--all: everything); refuses while the cache is open
  cache [--cache-dir DIR] verify [DIGEST...]      hash whole blobs from disk (fetching nothing); a mismatch is removed
`

func main() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd, args := os.Args[1], os.Args[2:]; cmd {
	case "pack":
		err = runPack(ctx, args)
	case "convert":
		err = runConvert(ctx, args)
	case "mount":
		err = runMount(ctx, args)
	case "demo":
		err = runDemo(ctx, args)
	case "cache":
		err = runCache(ctx, args)
	case "-h", "--help", "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "weightsnap: unknown command %q\n%s", cmd, usage)
		os.Exit(2)
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "weightsnap %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func runPack(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("pack", flag.ContinueOnError)
	threshold := fl.String("threshold", "64MiB", "files of at least this size get a layer of their own")
	plainHTTP := fl.Bool("plain-http", false, "use plain HTTP for the registry (automatic for localhost)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 2 {
		return fmt.Errorf("want DIR REF, got %d arguments", fl.NArg())
	}
	th, err := bytesize.Parse(*threshold)
	if err != nil {
		return fmt.Errorf("--threshold: %w", err)
	}
	dir, ref := fl.Arg(0), fl.Arg(1)
	img, err := pack.Build(ctx, dir, pack.Options{LargeFileThreshold: th})
	if err != nil {
		return err
	}
	return pushWithProgress(ctx, img, ref, *plainHTTP)
}

func runConvert(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("convert", flag.ContinueOnError)
	plainHTTP := fl.Bool("plain-http", false, "use plain HTTP for the registry (automatic for localhost)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 2 {
		return fmt.Errorf("want SRC DST, got %d arguments", fl.NArg())
	}
	d, err := pack.Convert(ctx, fl.Arg(0), fl.Arg(1), *plainHTTP)
	if err != nil {
		return err
	}
	fmt.Printf("%s@%s\n", fl.Arg(1), d.DigestStr()) // as pack prints its push
	return nil
}

// pushWithProgress pushes img to ref, printing progress on stderr every
// tenth of the way.
func pushWithProgress(ctx context.Context, img v1.Image, ref string, plainHTTP bool) error {
	updates := make(chan v1.Update, 16)
	done := make(chan struct{})
	go func() { // pack.Push closes updates when it returns
		defer close(done)
		var last int64 = -1
		for u := range updates {
			if u.Total > 0 && u.Complete*10/u.Total != last {
				last = u.Complete * 10 / u.Total
				fmt.Fprintf(os.Stderr, "pushing %s: %3d%% of %s\n", ref, last*10, formatBytes(u.Total))
			}
		}
	}()
	err := pack.Push(ctx, img, ref, plainHTTP, updates)
	<-done
	if err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s@%s\n", ref, d)
	return nil
}

func runMount(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("mount", flag.ContinueOnError)
	plainHTTP := fl.Bool("plain-http", false, "use plain HTTP for the registry (automatic for localhost)")
	cacheDir := fl.String("cache-dir", "/var/lib/weightsnap/cache", "node cache directory")
	cacheMax := fl.String("cache-max", "0", "cache size bound (e.g. 100GiB); 0 = unbounded")
	metricsAddr := fl.String("metrics-address", "", "serve Prometheus metrics on HOST:PORT")
	unverified := fl.String("unverified-layers", "full", `layers without chunk digests: "full" (fetch and verify them whole, then mount) or "lazy" (serve them before they verified)`)
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 2 {
		return fmt.Errorf("want REF MOUNTPOINT, got %d arguments", fl.NArg())
	}
	ref, target := fl.Arg(0), fl.Arg(1)
	if os.Geteuid() != 0 {
		return errors.New("must run as root (FUSE and overlay mounts)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("no FUSE on this machine: %w", err)
	}
	policy := lazy.UnverifiedFetch
	switch *unverified {
	case "full":
	case "lazy":
		policy = lazy.UnverifiedLazy
	default:
		return fmt.Errorf("--unverified-layers %q: want full or lazy", *unverified)
	}
	max, err := bytesize.Parse(*cacheMax)
	if err != nil {
		return fmt.Errorf("--cache-max: %w", err)
	}
	if *metricsAddr != "" {
		if err := serveMetrics(*metricsAddr); err != nil {
			return err
		}
	}
	store, err := cache.Open(*cacheDir, cache.WithMaxBytes(max))
	if err != nil {
		return err
	}
	defer store.Close()
	mgr := lazy.New(store, remote.New(remote.WithPlainHTTP(*plainHTTP)), lazy.WithUnverifiedLayers(policy))
	defer mgr.Close()
	work, err := os.MkdirTemp(filepath.Join(*cacheDir, ".."), "mount-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	im, err := mgr.MountImage(ctx, ref, target, work)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "mounted %s at %s (SIGINT or SIGTERM unmounts)\n", ref, target)
	<-ctx.Done()
	// A process still using the image keeps its layers until the Manager
	// is closed, a moment later; then it gets ENOTCONN.
	if err := im.Unmount(); err != nil {
		return fmt.Errorf("unmount: %w", err)
	}
	fmt.Fprintf(os.Stderr, "unmounted %s\n", target)
	return nil
}

func serveMetrics(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics address: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", metrics.Handler())
	go http.Serve(ln, mux)
	return nil
}

func formatBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
