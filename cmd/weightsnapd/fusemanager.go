package main

// The FUSE manager is a second weightsnapd process that owns the lazy
// layer mounts: the FUSE servers, the node cache and the registry
// connections. The snapshotter process drives it over a unix socket.
//
// Why two processes: when a FUSE server dies, every mount it served fails
// with ENOTCONN, and so does every overlayfs built on them (overlayfs holds
// private clones of its lower mounts, so mounting a new server at the same
// path does not repair running containers). Keeping the FUSE servers in a
// process of their own, started in its own session, lets the snapshotter
// crash, be killed or be upgraded while pods keep reading; the restarted
// snapshotter finds the manager and adopts its mounts (stargz-snapshotter's
// fusemanager does so too). The manager itself can die or be replaced: the
// holder (holder.go) keeps its mounts' connections and the next manager
// resumes them. A SIGTERM of weightsnapd leaves the manager serving;
// `weightsnapd shutdown` unmounts everything.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	iofs "io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/rpc"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/credentials"
	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/holder"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/remote"
	"github.com/weightsnap/weightsnap/snapshot"
)

const (
	// fuseManagerCommand is the hidden subcommand running the manager.
	fuseManagerCommand = "fuse-manager"
	// readyFD is the descriptor on which the manager reports readiness.
	readyFD = 3
	// rpcService is the net/rpc service name.
	rpcService = "Mounts"
	// managerStartTimeout bounds waiting for a spawned manager.
	managerStartTimeout = time.Minute
	// unmountTimeout bounds waiting for the manager to unmount a layer.
	unmountTimeout = 5 * time.Second
	// handoverDrain bounds how long a handover waits for the mounts in
	// flight (a Mount RPC opening a layer) to finish.
	handoverDrain = 10 * time.Second
	// managerStopGrace bounds the manager's release of every layer at
	// shutdown. Releasing a layer normally takes milliseconds, but the
	// unmount of a FUSE layer that another mount still holds (the lower
	// layer of a running container's overlay) can wait for as long as
	// that mount lives. After the grace the manager exits anyway, which
	// ends its FUSE connections: their remaining users get ENOTCONN.
	managerStopGrace = 2 * time.Second
)

func managerSocket(root string) string  { return filepath.Join(root, "fusemanager.sock") }
func managerPIDFile(root string) string { return filepath.Join(root, "fusemanager.pid") }

// MountArgs are the arguments of Mounts.Mount.
type MountArgs struct {
	Mountpoint string
	ImageRef   string
	Digest     string
	// Namespace is the containerd namespace of the Prepare, in which
	// the image's manifest and config are read from containerd's content
	// store (containerdContent); empty: from the registry.
	Namespace string
}

// mountService is the RPC face of a snapshot.LayerMounter.
type mountService struct {
	m        snapshot.LayerMounter
	keys     *credentials.Keychain // the registry client's
	shutdown func() error
	handover func()        // exits, leaving the mounts to the next manager
	stopped  chan struct{} // closed once the manager has unmounted everything
	resumed  int           // mounts taken over at start
	holder   bool          // a holder keeps the mounts' connections
}

// Mount mounts a layer; see snapshot.LayerMounter.
func (s *mountService) Mount(a MountArgs, _ *struct{}) error {
	d, err := digest.Parse(a.Digest)
	if err != nil {
		return err
	}
	return s.m.Mount(withNamespace(context.Background(), a.Namespace), a.Mountpoint, a.ImageRef, d)
}

// WarmArgs are the arguments of Mounts.Warm.
type WarmArgs struct {
	ImageRef  string
	Layers    []string
	Namespace string // as MountArgs'
}

// Warm opens an image's layers ahead of their mounts; see snapshot.Warmer.
func (s *mountService) Warm(a WarmArgs, _ *struct{}) error {
	w, ok := s.m.(snapshot.Warmer)
	if !ok {
		return nil
	}
	var ds []digest.Digest
	for _, l := range a.Layers {
		if d, err := digest.Parse(l); err == nil {
			ds = append(ds, d)
		}
	}
	w.Warm(withNamespace(context.Background(), a.Namespace), a.ImageRef, ds)
	return nil
}

// Check checks a mount; see snapshot.LayerMounter.
func (s *mountService) Check(mountpoint string, r *CheckReply) error {
	err := s.m.Check(context.Background(), mountpoint)
	if errors.Is(err, iofs.ErrNotExist) {
		r.NotMounted = true
		return nil
	}
	return err
}

// CheckReply is the answer of Mounts.Check. An error crosses net/rpc as
// text only: that no layer is mounted there, which the snapshotter
// answers by mounting it again, is said here instead.
type CheckReply struct {
	NotMounted bool
}

// CachedBytes reports what the cache holds for a mounted layer; see
// snapshot.CacheReporter. A mounter that is not one reports an error, and
// the snapshotter the layer's file sizes.
func (s *mountService) CachedBytes(mountpoint string, n *int64) error {
	cr, ok := s.m.(snapshot.CacheReporter)
	if !ok {
		return errors.New("the layer mounter does not report cache usage")
	}
	var err error
	*n, err = cr.CachedBytes(context.Background(), mountpoint)
	return err
}

// Unmount unmounts a layer; see snapshot.LayerMounter.
func (s *mountService) Unmount(mountpoint string, _ *struct{}) error {
	return s.m.Unmount(context.Background(), mountpoint)
}

// Wait returns when the manager shuts down: a client blocked in it learns
// of the manager's death by its connection breaking.
func (s *mountService) Wait(_ struct{}, _ *struct{}) error {
	<-s.stopped
	return nil
}

// CredentialsArgs are the arguments of Mounts.Credentials. They hold a
// secret: never log them.
type CredentialsArgs struct {
	Registry   string
	Repository string
	Auth       authn.AuthConfig
}

// Credentials keeps registry credentials for a repository, in memory,
// for the lazy layers read from it; see credentials.Keychain.
func (s *mountService) Credentials(a CredentialsArgs, _ *struct{}) error {
	return s.keys.Put(a.Registry, a.Repository, a.Auth)
}

// PingReply is the answer of Mounts.Ping.
type PingReply struct {
	PID     int  // the manager's
	Resumed int  // mounts it took over from a former manager at start
	Holder  bool // its mounts are held: it can hand over
}

// Ping answers at once, for health checks (weightsnapd health): a reply
// shows that the manager runs and serves its socket.
func (s *mountService) Ping(_ struct{}, r *PingReply) error {
	r.PID = os.Getpid()
	r.Resumed = s.resumed
	r.Holder = s.holder
	return nil
}

// Handover exits the manager at once without unmounting: the holder keeps
// its mounts for the next manager (an upgrade). Its caller learns the end
// from its connection closing.
func (s *mountService) Handover(_ struct{}, _ *struct{}) error {
	s.handover()
	return nil
}

// Shutdown unmounts every layer and stops the manager.
func (s *mountService) Shutdown(_ struct{}, _ *struct{}) error {
	return s.shutdown()
}

// runFuseManager is the manager process: it serves the mounter until told
// to shut down or sent SIGTERM.
func runFuseManager(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: weightsnapd fuse-manager CONFIG-JSON")
	}
	var cfg Config
	if err := json.Unmarshal([]byte(args[0]), &cfg); err != nil {
		return fmt.Errorf("manager config: %w", err)
	}
	if err := setupLogging(cfg.LogLevel); err != nil {
		return err
	}
	slog.SetDefault(slog.Default().With("process", fuseManagerCommand))
	// SIGINT is ignored: the manager must not die with a terminal's ^C
	// aimed at weightsnapd.
	signal.Ignore(syscall.SIGINT)
	// It outlives weightsnapd, the first reader of its stderr: losing a
	// log line is better than dying of SIGPIPE.
	signal.Ignore(syscall.SIGPIPE)
	if n, ok := memoryLimit(cfg.Fetch, os.Getenv("GOMEMLIMIT")); ok {
		debug.SetMemoryLimit(n)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()

	// Credentials kubelet passed with a CRI PullImage (Mounts.Credentials)
	// first, then kubelet's credential provider plugins, then the docker
	// config.json.
	plugins, err := cfg.CredentialProviders.plugins()
	if err != nil {
		return err
	}
	var kopts []credentials.Option
	if plugins != nil {
		kopts = append(kopts, credentials.WithPlugins(plugins))
	}
	keys := credentials.New(authn.DefaultKeychain, kopts...)
	ropts := []remote.Option{remote.WithKeychain(keys)}
	if cfg.Registry.PlainHTTP {
		ropts = append(ropts, remote.WithPlainHTTP(true))
	}
	if m := hostsMirrors(ctx, cfg.Registry.ConfigPath); m != nil {
		ropts = append(ropts, remote.WithMirrors(m))
	}
	hc := connectHolder(cfg.Root)
	var lopts []lazy.Option
	if a := cfg.Registry.ContainerdAddress; a != "" {
		cc := &containerdContent{address: a}
		defer cc.Close()
		lopts = append(lopts, lazy.WithLocalContent(cc.Get))
	}
	if hc != nil {
		defer hc.Close()
		lopts = append(lopts, lazy.WithHolder(hc, filepath.Join(cfg.Root, "mounts")))
	}
	m, closeMounter, flushCache, err := newMounter(ctx, filepath.Join(cfg.Root, "cache"), cfg, ropts, lopts...)
	if err != nil {
		return err
	}
	// Before taking calls: the snapshotter, seeing mounts resumed, keeps
	// its mount points as they are.
	resumed := resumeHeld(ctx, m, hc, cfg.Root)
	sock := managerSocket(cfg.Root)
	lis, err := listenUnix(sock)
	if err != nil {
		_ = closeMounter()
		return err
	}
	pidFile := managerPIDFile(cfg.Root)
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		lis.Close()
		_ = closeMounter()
		return fmt.Errorf("writing pid file: %w", err)
	}

	// Shutting down stops taking connections first (a new weightsnapd
	// then starts a new manager rather than adopt this one), unmounts
	// every layer (or gives up after managerStopGrace), and only then
	// answers Shutdown and Wait, so that the snapshotter knows, when they
	// return, that the mounts are gone or about to die with the process.
	stopped := make(chan struct{})
	var (
		once    sync.Once
		stopErr error
	)
	shutdown := func() error {
		once.Do(func() {
			slog.Info("fuse manager shutting down")
			lis.Close()
			os.Remove(sock)
			closed := make(chan error, 1)
			go func() { closed <- closeMounter() }()
			select {
			case stopErr = <-closed:
			case <-time.After(managerStopGrace):
				// Not a failure of the manager: a container kept
				// using its image past the stop.
				slog.Warn("layers still in use: exiting ends their FUSE connections", "grace", managerStopGrace)
			}
			if stopErr != nil {
				slog.Error("closing layer mounts", "err", stopErr)
			}
			os.Remove(pidFile)
			close(stopped)
		})
		return stopErr
	}
	// Handing over exits at once, leaving every mount to the holder and
	// the next manager: not closing the cache, which a request still
	// being served would then fail on, and which survives a kill anyway;
	// its fetched data is made durable first.
	handover := func() {
		// Mounts in flight finish first, and go to the holder.
		if !m.Drain(handoverDrain) {
			slog.Warn("mounts still in flight at the handover", "waited", handoverDrain)
		}
		slog.Info("fuse manager exiting; its mounts wait for the next one", "mounts", len(m.Mountpoints()))
		if err := flushCache(); err != nil {
			slog.Warn("flushing the cache before handing over", "err", err)
		}
		lis.Close()
		os.Remove(sock)
		os.Remove(pidFile)
		os.Exit(0)
	}
	if hc == nil {
		handover = func() { _ = shutdown(); os.Exit(0) }
	}
	svc := &mountService{m: m, keys: keys, shutdown: shutdown, handover: handover, stopped: stopped, resumed: resumed, holder: hc != nil}
	srv := rpc.NewServer()
	if err := srv.RegisterName(rpcService, svc); err != nil {
		_ = shutdown()
		return err
	}
	go srv.Accept(lis)

	if cfg.MetricsAddress != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler())
		mlis, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			_ = shutdown()
			return fmt.Errorf("metrics listener: %w", err)
		}
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = msrv.Serve(mlis) }()
		defer msrv.Close()
		slog.Info("serving metrics", "address", mlis.Addr().String())
	}

	signalReady()
	slog.Info("fuse manager ready", "socket", sock)
	select {
	case <-ctx.Done(): // SIGTERM: an upgrade or a restart
		handover()
		return nil
	case <-stopped: // Shutdown RPC; the client learns the end from its connection closing
		return stopErr
	}
}

// connectHolder connects to the holder weightsnapd started; without one,
// the mounts of this manager end with it.
func connectHolder(root string) *holder.Client {
	hc, err := holder.Dial(holderSocket(root))
	if err != nil {
		slog.Warn("no holder: the mounts will not survive this process", "err", err)
		return nil
	}
	return hc
}

// resumeHeld serves again every mount a former manager left in the
// holder, and returns how many. One that cannot be served is ended, so
// that its readers get an error rather than wait forever, with the reason
// (image, registry, error) in the log. A stop (ctx) between two leaves the
// rest held for the next manager.
func resumeHeld(ctx context.Context, m *lazy.Manager, hc *holder.Client, root string) int {
	if hc == nil {
		return 0
	}
	held, err := hc.List()
	if err != nil {
		slog.Error("listing the mounts to resume", "err", err)
		return 0
	}
	n := 0
	for i, h := range held {
		if ctx.Err() != nil {
			for _, rest := range held[i:] {
				rest.File.Close()
			}
			slog.Info("stopping: the mounts not resumed stay held for the next manager", "left", len(held)-i)
			break
		}
		if !underRoot(h.Key, root) {
			// Not a mountpoint this manager makes: never unmount it.
			h.File.Close()
			slog.Error("the holder names a mount outside the root; dropping it", "mountpoint", h.Key, "root", root)
			_ = hc.Drop(h.Key)
			continue
		}
		// Not ctx: a stop must not cut a resume half way.
		if err := m.Resume(context.Background(), h.Key, h.Meta, fs.Conn{File: h.File}); err != nil {
			metrics.MountsResumed.WithLabelValues("error").Inc()
			slog.Error("cannot serve a mount again: ending it, its readers get errors", "mountpoint", h.Key, "err", err)
			if err := fs.CleanupMount(h.Key); err != nil {
				slog.Error("ending a mount", "mountpoint", h.Key, "err", err)
			}
			_ = hc.Drop(h.Key)
			continue
		}
		metrics.MountsResumed.WithLabelValues("ok").Inc()
		n++
	}
	if len(held) > 0 {
		slog.Info("resumed the mounts of a former fuse manager", "resumed", n, "held", len(held))
	}
	return n
}

// underRoot reports whether path is strictly under root.
func underRoot(path, root string) bool {
	rel, err := filepath.Rel(filepath.Clean(root), filepath.Clean(path))
	return err == nil && rel != "." && !strings.HasPrefix(rel, "..")
}

// memoryLimit is the soft memory limit the manager sets, if any: the
// configured one, unless the environment's GOMEMLIMIT (goMemLimit) already
// set one.
func memoryLimit(fc FetchConfig, goMemLimit string) (int64, bool) {
	return fc.MemoryLimitBytes, fc.MemoryLimitBytes > 0 && goMemLimit == ""
}
