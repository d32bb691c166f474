package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	iofs "io/fs"
	"log/slog"
	"net"
	"net/rpc"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/opencontainers/go-digest"
	"github.com/weightsnap/weightsnap/snapshot"
)

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
	args := MountArgs{Mountpoint: mountpoint, ImageRef: imageRef, Digest: d.String(), Namespace: namespaceOf(ctx)}
	call := c.c.Go(rpcService+".Mount", args, new(struct{}), nil)
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
func (c *managerClient) Warm(ctx context.Context, imageRef string, layers []digest.Digest) {
	args := WarmArgs{ImageRef: imageRef, Namespace: namespaceOf(ctx)}
	for _, d := range layers {
		args.Layers = append(args.Layers, d.String())
	}
	c.c.Go(rpcService+".Warm", args, new(struct{}), nil)
}

// Check implements snapshot.LayerMounter; a layer the manager does not
// serve there is an fs.ErrNotExist, which the snapshotter answers by
// mounting it again.
func (c *managerClient) Check(ctx context.Context, mountpoint string) error {
	var r CheckReply
	if err := c.callReply(ctx, "Check", mountpoint, &r); err != nil {
		return err
	}
	if r.NotMounted {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, iofs.ErrNotExist)
	}
	return nil
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

// errManagerDied is the answer of a manager that died; the supervisor
// asks the next one.
var errManagerDied = errors.New("the fuse manager died")

// Unmount implements snapshot.LayerMounter. A mount still in use is
// detached and released by the manager when its last user goes, which can
// take any time: the snapshotter does not wait for more than
// unmountTimeout.
func (c *managerClient) Unmount(ctx context.Context, mountpoint string) error {
	select {
	case <-c.dead:
		return errManagerDied
	default:
	}
	ctx, cancel := context.WithTimeout(ctx, unmountTimeout)
	defer cancel()
	err := c.call(ctx, "Unmount", mountpoint)
	if errors.Is(err, rpc.ErrShutdown) {
		return errManagerDied
	}
	return err
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
// none runs. A running manager of another binary (weightsnapd was
// upgraded) hands over to a new one: it exits leaving its mounts in the
// holder, and the new one resumes them. adopted reports that the mounts of
// a former weightsnapd are alive (the manager kept running, or resumed
// them) and must be kept.
func connectManager(ctx context.Context, cfg Config) (c *managerClient, adopted bool, err error) {
	if c, err := dialManager(cfg.Root); err == nil {
		var r PingReply
		err := c.callReply(ctx, "Ping", struct{}{}, &r)
		switch {
		case err == nil && !sameBinary(r.PID) && r.Holder:
			slog.Info("upgrading the fuse manager: the running one hands its mounts over", "pid", r.PID)
			if err := c.handover(ctx); err != nil {
				// Still running: keep it, with its mounts.
				slog.Warn("the running fuse manager did not hand over; keeping it", "pid", r.PID, "err", err)
				return c, true, nil
			}
		case err == nil && !sameBinary(r.PID):
			// Its mounts would end with it: keep it until a stop.
			slog.Warn("the running fuse manager is of another binary but holds its mounts alone; keeping it", "pid", r.PID)
			return c, true, nil
		default:
			slog.Info("adopting running fuse manager", "socket", managerSocket(cfg.Root))
			return c, true, nil
		}
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
	var r PingReply
	if err := c.callReply(ctx, "Ping", struct{}{}, &r); err != nil {
		return nil, false, fmt.Errorf("connecting to the fuse manager: %w", err)
	}
	return c, r.Resumed > 0, nil
}

// sameBinary reports whether process pid runs this process's executable
// file (not one it was replaced by since).
func sameBinary(pid int) bool {
	self, err := os.Executable()
	if err != nil {
		return true
	}
	mine, err := os.Stat(self)
	if err != nil {
		return true
	}
	theirs, err := os.Stat(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return true // not ours to judge: keep it
	}
	return os.SameFile(mine, theirs)
}

// handover has the manager exit without unmounting, and waits until it
// has: its connection closing is the answer. A manager that answers
// instead (one too old to know Handover) or takes longer than
// handoverTimeout keeps running.
func (c *managerClient) handover(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, handoverTimeout)
	defer cancel()
	call := c.c.Go(rpcService+".Handover", struct{}{}, new(struct{}), nil)
	select {
	case <-c.dead:
		return nil
	case <-call.Done:
		var serr rpc.ServerError
		if errors.As(call.Error, &serr) {
			return serr
		}
		select { // the connection broke: it is exiting
		case <-c.dead:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("waiting for the fuse manager to hand over: %w", ctx.Err())
		}
	case <-ctx.Done():
		return fmt.Errorf("waiting for the fuse manager to hand over: %w", ctx.Err())
	}
}

// handoverTimeout bounds a handover: the manager waits for the mounts in
// flight (handoverDrain) and flushes the cache.
const handoverTimeout = handoverDrain + 20*time.Second

// spawnManager starts the manager and waits until it is ready; see
// spawnDetached.
func spawnManager(ctx context.Context, cfg Config) (exited chan struct{}, err error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	exited, err = spawnDetached(ctx, fuseManagerCommand, string(b))
	if err != nil {
		return nil, fmt.Errorf("fuse manager: %w", err)
	}
	return exited, nil
}

// spawnDetached starts this binary with args in its own session (so that
// a signal to weightsnapd or its process group does not reach it) and
// waits until it reports ready on readyFD. The returned channel is closed
// once it has exited and been reaped (if weightsnapd dies first, init
// reaps it).
func spawnDetached(ctx context.Context, args ...string) (exited chan struct{}, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.ExtraFiles = []*os.File{w} // readyFD
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("starting: %w", err)
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
			ready <- fmt.Errorf("exited before it was ready: %v", err)
			return
		}
		ready <- nil
	}()
	select {
	case err = <-ready:
	case <-time.After(managerStartTimeout):
		err = errors.New("did not become ready")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	return exited, nil
}

// signalReady tells the process that spawned this one that it is ready.
func signalReady() {
	if f := os.NewFile(readyFD, "ready"); f != nil {
		_, _ = f.WriteString("ready\n")
		f.Close()
	}
}

// supervisor is weightsnapd's FUSE manager: the one it talks to, replaced
// by a new one when it dies (killed, crashed), which resumes the mounts
// the holder kept. Calls made meanwhile wait for the new one.
type supervisor struct {
	cfg Config

	mu      sync.Mutex
	cur     *managerClient
	changed chan struct{} // closed when cur is replaced
	// failed reports that no new manager could be started.
	failed chan error
}

var (
	_ snapshot.LayerMounter  = (*supervisor)(nil)
	_ snapshot.Warmer        = (*supervisor)(nil)
	_ snapshot.CacheReporter = (*supervisor)(nil)
)

// restartAttempts bounds starting a manager again after one died.
const restartAttempts = 3

func newSupervisor(cfg Config, c *managerClient) *supervisor {
	return &supervisor{cfg: cfg, cur: c, changed: make(chan struct{}), failed: make(chan error, 1)}
}

// watch replaces the manager each time it dies, until ctx ends.
func (s *supervisor) watch(ctx context.Context) {
	for {
		s.mu.Lock()
		c := s.cur
		s.mu.Unlock()
		select {
		case <-c.dead:
		case <-ctx.Done():
			return
		}
		if ctx.Err() != nil {
			return
		}
		slog.Warn("the fuse manager died: starting another, which resumes its mounts")
		var nc *managerClient
		var err error
		for range restartAttempts {
			if nc, _, err = connectManager(ctx, s.cfg); err == nil {
				break
			}
			slog.Error("starting the fuse manager again", "err", err)
		}
		if err != nil {
			s.failed <- err
			return
		}
		s.mu.Lock()
		s.cur = nc
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
	}
}

// live returns a manager that has not died, waiting for the next one if
// the current one has.
func (s *supervisor) live(ctx context.Context) (*managerClient, error) {
	for {
		s.mu.Lock()
		c, changed := s.cur, s.changed
		s.mu.Unlock()
		select {
		case <-c.dead:
		default:
			return c, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for a new fuse manager: %w", ctx.Err())
		}
	}
}

// Mount implements snapshot.LayerMounter.
func (s *supervisor) Mount(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error {
	c, err := s.live(ctx)
	if err != nil {
		return err
	}
	return c.Mount(ctx, mountpoint, imageRef, d)
}

// Warm implements snapshot.Warmer; a hint is dropped while no manager
// runs.
func (s *supervisor) Warm(ctx context.Context, imageRef string, layers []digest.Digest) {
	s.mu.Lock()
	c := s.cur
	s.mu.Unlock()
	c.Warm(ctx, imageRef, layers)
}

// Check implements snapshot.LayerMounter.
func (s *supervisor) Check(ctx context.Context, mountpoint string) error {
	c, err := s.live(ctx)
	if err != nil {
		return err
	}
	return c.Check(ctx, mountpoint)
}

// CachedBytes implements snapshot.CacheReporter.
func (s *supervisor) CachedBytes(ctx context.Context, mountpoint string) (int64, error) {
	c, err := s.live(ctx)
	if err != nil {
		return 0, err
	}
	return c.CachedBytes(ctx, mountpoint)
}

// Unmount implements snapshot.LayerMounter. The mount of a manager that
// died is the next one's to unmount, once it has resumed it.
func (s *supervisor) Unmount(ctx context.Context, mountpoint string) error {
	ctx, cancel := context.WithTimeout(ctx, managerStartTimeout)
	defer cancel()
	for {
		c, err := s.live(ctx)
		if err != nil {
			return err
		}
		if err := c.Unmount(ctx, mountpoint); !errors.Is(err, errManagerDied) {
			return err
		}
	}
}

// keepCredentials implements the CRI proxy's hand-over of credentials.
func (s *supervisor) keepCredentials(ctx context.Context, registry, repository string, cfg authn.AuthConfig) error {
	c, err := s.live(ctx)
	if err != nil {
		return err
	}
	return c.keepCredentials(ctx, registry, repository, cfg)
}
