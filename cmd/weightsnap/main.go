// Command weightsnap is the operator's CLI: pack a model directory into an
// image made for lazy loading, mount an image lazily without containerd,
// and run the demo and the benchmark.
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
	"strconv"
	"strings"
	"syscall"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/pack"
	"github.com/weightsnap/weightsnap/remote"
)

const usage = `usage: weightsnap <command> [flags]

commands:
  pack  [--threshold SIZE] [--plain-http] DIR REF   turn a model directory into an image made for lazy loading
  mount [--plain-http] [--cache-dir DIR] REF MOUNTPOINT
                                                  mount an image lazily; unmounts and exits on SIGINT/SIGTERM
  demo  [--size SIZE]                             the main job on an embedded registry and a generated model
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
	case "mount":
		err = runMount(ctx, args)
	case "demo":
		err = runDemo(ctx, args)
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
	th, err := parseSize(*threshold)
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
	max, err := parseSize(*cacheMax)
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
	mgr := fs.NewManager(store, remote.WithPlainHTTP(*plainHTTP))
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

// parseSize parses sizes like "64MiB", "2GiB", "1G", "4096".
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return int64(f * float64(mult)), nil
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
