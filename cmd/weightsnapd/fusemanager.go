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
// snapshotter finds the manager and adopts its mounts. This is the design
// of stargz-snapshotter's fusemanager. A clean SIGTERM of weightsnapd stops
// the manager too, unmounting everything.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/rpc"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/credentials"
	"github.com/weightsnap/weightsnap/fs"
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
}

// mountService is the RPC face of a snapshot.LayerMounter.
type mountService struct {
	m        snapshot.LayerMounter
	keys     *credentials.Keychain // the registry client's
	shutdown func() error
	stopped  chan struct{} // closed once the manager has unmounted everything
}

// Mount mounts a layer; see snapshot.LayerMounter.
func (s *mountService) Mount(a MountArgs, _ *struct{}) error {
	d, err := digest.Parse(a.Digest)
	if err != nil {
		return err
	}
	return s.m.Mount(context.Background(), a.Mountpoint, a.ImageRef, d)
}

// WarmArgs are the arguments of Mounts.Warm.
type WarmArgs struct {
	ImageRef string
	Layers   []string
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
	w.Warm(a.ImageRef, ds)
	return nil
}

// Check checks a mount; see snapshot.LayerMounter.
func (s *mountService) Check(mountpoint string, _ *struct{}) error {
	return s.m.Check(context.Background(), mountpoint)
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
	PID int // the manager's
}

// Ping answers at once, for health checks (weightsnapd health): a reply
// shows that the manager runs and serves its socket.
func (s *mountService) Ping(_ struct{}, r *PingReply) error {
	r.PID = os.Getpid()
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
	m, closeMounter, err := newMounter(ctx, filepath.Join(cfg.Root, "cache"), cfg, ropts)
	if err != nil {
		return err
	}
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
	svc := &mountService{m: m, keys: keys, shutdown: shutdown, stopped: stopped}
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

	if f := os.NewFile(readyFD, "ready"); f != nil {
		_, _ = f.WriteString("ready\n")
		f.Close()
	}
	slog.Info("fuse manager ready", "socket", sock)
	select {
	case <-ctx.Done(): // SIGTERM
		return shutdown()
	case <-stopped: // Shutdown RPC; the client learns the end from its connection closing
		return stopErr
	}
}

// managerClient is a snapshot.LayerMounter served by the manager process.
type managerClient struct {
	c *rpc.Client
	// dead is closed when the manager has unmounted everything or its
	// connection broke.
	dead chan struct{}
	// exited is closed when a manager this process started has been
	// reaped; nil for an adopted manager.
	exited chan struct{}
}

var (
	_ snapshot.LayerMounter  = (*managerClient)(nil)
	_ snapshot.Warmer        = (*managerClient)(nil)
	_ snapshot.CacheReporter = (*managerClient)(nil)
)

// call runs an RPC, giving up (but not cancelling it in the manager) when
// ctx ends.
func (c *managerClient) call(ctx context.Context, method string, args any) error {
	return c.callReply(ctx, method, args, new(struct{}))
}

// callReply is call with a reply.
func (c *managerClient) callReply(ctx context.Context, method string, args, reply any) error {
	call := c.c.Go(rpcService+"."+method, args, reply, nil)
	select {
	case <-call.Done:
		return call.Error
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Mount implements snapshot.LayerMounter. If ctx ends first, the manager
// still finishes the mount, which nobody would ever unmount: it is undone
// as soon as it is done.
func (c *managerClient) Mount(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error {
	call := c.c.Go(rpcService+".Mount", MountArgs{Mountpoint: mountpoint, ImageRef: imageRef, Digest: d.String()}, new(struct{}), nil)
	select {
	case <-call.Done:
		return call.Error
	case <-ctx.Done():
	}
	go func() {
		<-call.Done
		if call.Error == nil {
			slog.Info("undoing a mount finished after its caller gave up", "mountpoint", mountpoint, "layer", d)
			c.c.Go(rpcService+".Unmount", mountpoint, new(struct{}), nil)
		}
	}()
	return ctx.Err()
}

// Warm implements snapshot.Warmer. It does not wait for the answer: the
// manager only starts the work, and a lost hint costs nothing but time.
func (c *managerClient) Warm(imageRef string, layers []digest.Digest) {
	args := WarmArgs{ImageRef: imageRef}
	for _, d := range layers {
		args.Layers = append(args.Layers, d.String())
	}
	c.c.Go(rpcService+".Warm", args, new(struct{}), nil)
}

// Check implements snapshot.LayerMounter.
func (c *managerClient) Check(ctx context.Context, mountpoint string) error {
	return c.call(ctx, "Check", mountpoint)
}

// CachedBytes implements snapshot.CacheReporter.
func (c *managerClient) CachedBytes(ctx context.Context, mountpoint string) (int64, error) {
	var n int64
	err := c.callReply(ctx, "CachedBytes", mountpoint, &n)
	return n, err
}

// keepCredentials gives the manager registry credentials for a
// repository; see mountService.Credentials.
func (c *managerClient) keepCredentials(ctx context.Context, registry, repository string, cfg authn.AuthConfig) error {
	return c.call(ctx, "Credentials", CredentialsArgs{Registry: registry, Repository: repository, Auth: cfg})
}

// Unmount implements snapshot.LayerMounter. A mount still in use is
// detached and released by the manager when its last user goes, which can
// take any time: the snapshotter does not wait for more than
// unmountTimeout. Once the manager is gone, a mount it left is dead
// (ENOTCONN): it is removed here, so that its directory can be.
func (c *managerClient) Unmount(ctx context.Context, mountpoint string) error {
	select {
	case <-c.dead:
		return fs.CleanupMount(mountpoint)
	default:
	}
	ctx, cancel := context.WithTimeout(ctx, unmountTimeout)
	defer cancel()
	return c.call(ctx, "Unmount", mountpoint)
}

// shutdown stops the manager, which unmounts every layer, and waits until
// it has exited. The manager may exit before its reply is sent: the
// connection closing is the answer then.
func (c *managerClient) shutdown(ctx context.Context) error {
	call := c.c.Go(rpcService+".Shutdown", struct{}{}, new(struct{}), nil)
	select {
	case <-call.Done:
		var serr rpc.ServerError
		if errors.As(call.Error, &serr) {
			return serr
		}
	case <-ctx.Done():
		return fmt.Errorf("waiting for the fuse manager to stop: %w", ctx.Err())
	}
	select {
	case <-c.dead:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the fuse manager to stop: %w", ctx.Err())
	}
	if c.exited != nil {
		select {
		case <-c.exited:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the fuse manager to exit: %w", ctx.Err())
		}
	}
	return nil
}

// dial connects to a running manager.
func dialManager(root string) (*managerClient, error) {
	conn, err := net.Dial("unix", managerSocket(root))
	if err != nil {
		return nil, err
	}
	c := &managerClient{c: rpc.NewClient(conn), dead: make(chan struct{})}
	wait := c.c.Go(rpcService+".Wait", struct{}{}, new(struct{}), nil)
	go func() {
		<-wait.Done
		close(c.dead)
	}()
	return c, nil
}

// connectManager connects to the manager serving cfg.Root, starting one if
// none runs. adopted reports that it was already running, so its mounts
// are alive and must be kept.
func connectManager(ctx context.Context, cfg Config) (c *managerClient, adopted bool, err error) {
	if c, err := dialManager(cfg.Root); err == nil {
		slog.Info("adopting running fuse manager", "socket", managerSocket(cfg.Root))
		return c, true, nil
	}
	exited, err := spawnManager(ctx, cfg)
	if err != nil {
		return nil, false, err
	}
	c, err = dialManager(cfg.Root)
	if err != nil {
		return nil, false, fmt.Errorf("connecting to the fuse manager: %w", err)
	}
	c.exited = exited
	return c, false, nil
}

// spawnManager starts the manager in its own session (so that a signal to
// weightsnapd or its process group does not reach it) and waits until it
// is ready. The returned channel is closed once it has exited and been
// reaped (if weightsnapd dies first, init reaps it).
func spawnManager(ctx context.Context, cfg Config) (exited chan struct{}, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(self, fuseManagerCommand, string(b))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.ExtraFiles = []*os.File{w} // readyFD
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("starting fuse manager: %w", err)
	}
	w.Close()
	exited = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()

	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 16)
		n, err := r.Read(buf)
		if n == 0 {
			ready <- fmt.Errorf("fuse manager exited before it was ready: %v", err)
			return
		}
		ready <- nil
	}()
	select {
	case err = <-ready:
	case <-time.After(managerStartTimeout):
		err = errors.New("fuse manager did not become ready")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	return exited, nil
}
