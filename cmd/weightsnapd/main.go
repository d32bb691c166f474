// Command weightsnapd is weightsnap's containerd proxy snapshotter: it
// serves containerd's snapshots API on a unix socket, mounting the layers
// of model images lazily so that a pull returns before the weights are
// downloaded. Configure containerd with deploy/containerd-config.toml.
//
// The lazy mounts are served by a second process, the FUSE manager (see
// fusemanager.go), that weightsnapd starts and that survives it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/weightsnap/weightsnap/snapshot"
)

const (
	// callGrace bounds how long SIGTERM waits for in-flight snapshot
	// calls; the rest are cancelled.
	callGrace = 2 * time.Second
	// shutdownGrace bounds waiting for the fuse manager to stop, in case
	// it does not answer: it gives itself managerStopGrace.
	shutdownGrace = 10 * time.Second
)

func main() {
	var err error
	switch {
	case len(os.Args) > 1 && os.Args[1] == fuseManagerCommand:
		err = runFuseManager(os.Args[2:])
	case len(os.Args) > 1 && os.Args[1] == holderCommand:
		err = runHolder(os.Args[2:])
	case len(os.Args) > 1 && os.Args[1] == shutdownCommand:
		err = runShutdown(os.Args[2:])
	case len(os.Args) > 1 && os.Args[1] == healthCommand:
		// Plain text: kubelet shows a probe's output in the pod's events.
		if err := runHealth(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "weightsnapd health:", err)
			os.Exit(1)
		}
		return
	default:
		err = run(os.Args[1:])
	}
	if err != nil {
		slog.Error("weightsnapd failed", "err", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	cfg, err := parseFlags(args)
	if err != nil {
		return err
	}
	if err := setupLogging(cfg.LogLevel); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return serve(ctx, cfg)
}

// parseFlags applies defaults, then the config file, then the flags given
// on the command line.
func parseFlags(args []string) (Config, error) {
	fset := flag.NewFlagSet("weightsnapd", flag.ContinueOnError)
	def := defaultConfig()
	configPath := fset.String("config", "", "TOML configuration file (see deploy/weightsnapd.toml)")
	root := fset.String("root", def.Root, "state directory: metadata, snapshots and the node cache")
	address := fset.String("address", def.Address, "unix socket serving containerd's snapshots API")
	metricsAddr := fset.String("metrics-address", def.MetricsAddress, "host:port serving Prometheus metrics at /metrics (empty: off)")
	logLevel := fset.String("log-level", def.LogLevel, "debug, info, warn or error")
	if err := fset.Parse(args); err != nil {
		return Config{}, err
	}
	if fset.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments: %v", fset.Args())
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return Config{}, err
	}
	fset.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "root":
			cfg.Root = *root
		case "address":
			cfg.Address = *address
		case "metrics-address":
			cfg.MetricsAddress = *metricsAddr
		case "log-level":
			cfg.LogLevel = *logLevel
		}
	})
	return cfg, nil
}

// setupLogging makes slog (weightsnap's packages) and containerd's logrus
// logger (the snapshotter core) both write JSON lines to stderr at level.
func setupLogging(level string) error {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return fmt.Errorf("log level %q: %w", level, err)
	}
	slog.SetDefault(slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l})))
	if err := log.SetLevel(strings.ToLower(level)); err != nil {
		return fmt.Errorf("log level %q: %w", level, err)
	}
	return log.SetFormat(log.JSONFormat)
}

// serve runs the daemon until ctx is done, then stops serving: the gRPC
// server stops taking calls, and weightsnapd exits. The FUSE manager keeps
// serving the lazy layers, and the next weightsnapd adopts it (or, if it
// is of another binary, has it hand over to a new one: an upgrade);
// `weightsnapd shutdown` stops it for good.
func serve(ctx context.Context, cfg Config) (err error) {
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return fmt.Errorf("creating root: %w", err)
	}
	if hc, err := dialHolder(ctx, cfg.Root, cfg.Holder.LeaveCgroup); err != nil {
		slog.Warn("no holder: lazy mounts will not survive a restart of the fuse manager", "err", err)
	} else {
		hc.Close()
	}
	mc, adopted, err := connectManager(ctx, cfg)
	if err != nil {
		return err
	}
	sup := newSupervisor(cfg, mc)
	watchCtx, stopWatching := context.WithCancel(context.Background())
	defer stopWatching()
	go sup.watch(watchCtx)

	// The snapshotter's state sits beside the cache. When the manager
	// outlived a previous weightsnapd, or resumed its mounts, they are
	// still served and in use by containers: keep them rather than
	// remount. The snapshotter is not closed at the end: its Close would
	// unmount every layer, and its metadata is committed call by call.
	sn, err := snapshot.New(ctx, filepath.Join(cfg.Root, "snapshotter"), sup, snapshot.Options{KeepMounts: adopted})
	if err != nil {
		return err
	}

	lis, err := listenUnix(cfg.Address)
	if err != nil {
		return err
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(lis) }()

	var criErrc <-chan error // nil: never ready when the proxy is off
	if cfg.CRIKeychain.Enable {
		stopCRI, ec, cerr := serveCRI(cfg.CRIKeychain, sup.keepCredentials)
		if cerr != nil {
			stopGRPC(rpc)
			_ = os.Remove(cfg.Address)
			return cerr
		}
		defer stopCRI()
		criErrc = ec
		slog.Info("serving the CRI image service", "listen", cfg.CRIKeychain.Listen, "image_service", cfg.CRIKeychain.ImageService)
	}
	slog.Info("weightsnapd ready", "address", cfg.Address, "root", cfg.Root, "adopted_mounts", adopted)

	select {
	case <-ctx.Done():
		slog.Info("stopping; the fuse manager keeps serving the lazy layers")
	case err = <-errc:
		err = fmt.Errorf("snapshots server stopped: %w", err)
	case err = <-criErrc:
		err = fmt.Errorf("CRI image service stopped: %w", err)
	case err = <-sup.failed:
		err = fmt.Errorf("the fuse manager died and could not be started again: %w", err)
	}
	stopWatching()
	stopGRPC(rpc)
	_ = os.Remove(cfg.Address)
	return err
}

// listenUnix listens on the socket path, replacing a socket left by a
// previous (killed) run.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket: %w", err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	return lis, nil
}

// stopGRPC lets in-flight calls finish for a while, then cuts them off.
func stopGRPC(rpc *grpc.Server) {
	done := make(chan struct{})
	go func() {
		rpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(callGrace):
		rpc.Stop()
	}
}
