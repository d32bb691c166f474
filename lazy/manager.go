// Package lazy serves the image layers of one node lazily. Its Manager
// opens each layer once (its blob in the node cache, its index, its
// background fill) and shares it between every mount of the same digest,
// whichever image, tag or repository named it; it mounts layers with fs
// and closes a layer when its last mount goes.
//
// The path of a read, top to bottom: fs (a FUSE request on a node) →
// layer (entry → blob range) → readAround here (a miss fetches its span,
// read-ahead is queued with prefetch) → cache (chunks present, or fetched
// once) → remote (a range GET).
package lazy

import (
	"context"
	"errors"
	"fmt"
	iofs "io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/internal/refmap"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
)

var (
	// ErrUnsupported is returned by Mount for a layer that cannot be
	// served lazily; the caller falls back to downloading it.
	ErrUnsupported = errors.New("layer cannot be served lazily")
	// ErrClosed is returned by Mount after Close.
	ErrClosed = errors.New("layer manager closed")
)

// Registry is how the Manager reaches registries; *remote.Client is one.
type Registry interface {
	Resolve(ctx context.Context, ref string, opts ...remote.ResolveOption) (*remote.Image, error)
	OpenBlob(ctx context.Context, repo string, d digest.Digest, size int64) (*remote.Blob, error)
}

// Manager mounts image layers lazily. It is node-wide: every mount of the
// same layer digest shares one opened layer.
type Manager struct {
	store  *cache.Store
	reg    Registry
	opt    options
	sched  *prefetch.Scheduler
	layers *refmap.Map[layerKey, *sharedLayer]
	// resolves shares a resolve of an image reference between the
	// callers asking for it at once.
	resolves *refmap.Map[string, *knownImage]
	// images are those described lately, parsed.
	images knownImages
	// serve mounts a layer and resume serves a held connection again;
	// tests without FUSE replace them.
	serve  func(ctx context.Context, l *layer.Opened, mountpoint string, opts ...fs.Option) (mount, error)
	resume func(ctx context.Context, l *layer.Opened, mountpoint string, c fs.Conn, opts ...fs.Option) (mount, error)
	// warmed, if set by a test, is told of each layer Warm has opened.
	warmed func(digest.Digest)

	// ctx ends at Close, and with it every open, warm-up and mount in
	// flight; work counts those, so that Close can wait for them.
	ctx    context.Context
	cancel context.CancelFunc
	work   sync.WaitGroup

	mu     sync.Mutex
	mounts map[string]*layerMount // by mountpoint
	closed bool
	// draining refuses new work but lets what is in flight finish
	// (Drain).
	draining bool
}

// mount is a served layer; *fs.Mount is one.
type mount interface {
	Unmount() error
	Done() <-chan struct{}
	Mountpoint() string
	Invalidate()
	DropPassthroughPages()
	Conn() (fs.Conn, error)
}

type layerMount struct {
	ref   *refmap.Ref[layerKey, *sharedLayer]
	mount mount
}

// New returns a Manager fetching from reg through store.
func New(store *cache.Store, reg Registry, opts ...Option) *Manager {
	m := &Manager{
		store:  store,
		reg:    reg,
		opt:    makeOptions(opts),
		mounts: make(map[string]*layerMount),
		serve: func(ctx context.Context, l *layer.Opened, mp string, opts ...fs.Option) (mount, error) {
			return fs.Serve(ctx, l, mp, opts...)
		},
		resume: func(ctx context.Context, l *layer.Opened, mp string, c fs.Conn, opts ...fs.Option) (mount, error) {
			mnt, err := fs.Resume(ctx, l, mp, c, opts...)
			if mnt == nil {
				return nil, err // not a typed nil in the interface
			}
			return mnt, err
		},
	}
	if m.opt.stateDir != "" {
		// A mount cannot keep its open table without it; Serve fails.
		if err := os.MkdirAll(m.opt.stateDir, 0o700); err != nil {
			slog.Error("creating the mounts' state directory", "dir", m.opt.stateDir, "err", err)
		}
	}
	m.sched = prefetch.New(m.opt.prefetch...)
	m.layers = refmap.New(m.closeLayer)
	m.resolves = refmap.New(func(string, *knownImage) {})
	m.ctx, m.cancel = context.WithCancel(context.Background())
	return m
}

// begin registers work that Close must wait for, and returns ctx bounded
// by the Manager's life too.
func (m *Manager) begin(ctx context.Context) (context.Context, func(), error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed || m.draining {
		return nil, nil, ErrClosed
	}
	m.work.Add(1)
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(m.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
		m.work.Done()
	}, nil
}

// acquire returns a reference to the shared opened layer dl, opening it
// on first use.
func (m *Manager) acquire(ctx context.Context, dl described) (*refmap.Ref[layerKey, *sharedLayer], error) {
	return m.layers.Acquire(ctx, dl.key(), func(ctx context.Context) (*sharedLayer, error) {
		return m.open(ctx, dl)
	})
}

// OpenLayers lists the blobs of the layers open now, mounted or held by
// Warm; not those still opening or already closing.
func (m *Manager) OpenLayers() []digest.Digest {
	var ds []digest.Digest
	for _, k := range m.layers.Open() {
		ds = append(ds, k.digest)
	}
	return ds
}

// Mountpoints lists where layers are mounted.
func (m *Manager) Mountpoints() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	ps := make([]string, 0, len(m.mounts))
	for p := range m.mounts {
		ps = append(ps, p)
	}
	return ps
}

// Mount mounts layer d of image imageRef lazily at mountpoint. If ctx
// ends or the Manager is closed before the mount is done, nothing stays
// mounted.
func (m *Manager) Mount(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error {
	mountpoint = filepath.Clean(mountpoint)
	ctx, done, err := m.begin(ctx)
	if err != nil {
		return fmt.Errorf("mount layer %s: %w", d, err)
	}
	defer done()
	if m.mounted(mountpoint) {
		return fmt.Errorf("a layer is already mounted at %s: %w", mountpoint, iofs.ErrExist)
	}
	dl, err := m.describe(ctx, imageRef, d)
	if err != nil {
		return err
	}
	ref, err := m.acquire(ctx, dl)
	if err != nil {
		return err
	}
	mnt, err := m.serveLayer(ctx, ref.Value(), mountpoint)
	if err != nil {
		ref.Release()
		return err
	}
	// Held before it is registered: once registered, an Unmount may come,
	// and its drop must find the connection in the holder.
	sl := ref.Value()
	m.hold(mountpoint, sl, mnt)
	if err := m.register(ctx, mountpoint, &layerMount{ref: ref, mount: mnt}); err != nil {
		m.unhold(mountpoint)
		if uerr := mnt.Unmount(); uerr != nil {
			slog.Warn("undoing a mount", "mountpoint", mountpoint, "err", uerr)
		}
		m.releaseWhenDone(ref, mnt)
		return err
	}
	sl.unwanted.Store(false)
	sl.mountedOnce.Do(func() { close(sl.mounted) })
	return nil
}

func (m *Manager) serveLayer(ctx context.Context, sl *sharedLayer, mountpoint string) (mount, error) {
	if err := os.MkdirAll(mountpoint, 0o755); err != nil {
		return nil, err
	}
	t0 := time.Now()
	mnt, err := m.serve(ctx, sl.l, mountpoint, m.fsOptions(sl, mountpoint)...)
	slog.Debug("layer mounted", "layer", sl.desc.Digest, "mountpoint", mountpoint, "took", time.Since(t0), "err", err)
	return mnt, err
}

// fsOptions are the options of every mount of sl at mountpoint, served
// or resumed.
func (m *Manager) fsOptions(sl *sharedLayer, mountpoint string) []fs.Option {
	opts := []fs.Option{
		fs.WithName("weightsnap:" + sl.desc.Digest.String()),
		fs.WithOnRead(func(e *layer.Entry, off, n int64) { m.onRead(sl, e, off, n) }),
		fs.WithOpenTable(m.openTable(mountpoint)),
	}
	if m.opt.passthrough {
		opts = append(opts, fs.WithPassthrough(sl.passthroughFile))
	}
	return opts
}

// register records a finished mount, unless the caller gave up, the
// Manager is closing, or a concurrent Mount at the same place won.
func (m *Manager) register(ctx context.Context, mountpoint string, lm *layerMount) error {
	if err := m.insert(ctx, mountpoint, lm); err != nil {
		return err
	}
	// The mount served lookups before it was recorded; if its layer
	// failed meanwhile, fail found no such mount to invalidate.
	if lm.ref.Value().failed.Load() != nil {
		lm.mount.Invalidate()
	}
	return nil
}

// insert is register's record, under m.mu.
func (m *Manager) insert(ctx context.Context, mountpoint string, lm *layerMount) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.closed:
		return fmt.Errorf("mount layer %s: %w", lm.ref.Key().digest, ErrClosed)
	case ctx.Err() != nil:
		return fmt.Errorf("mount layer %s: %w", lm.ref.Key().digest, ctx.Err())
	case m.mounts[mountpoint] != nil:
		return fmt.Errorf("a layer is already mounted at %s: %w", mountpoint, iofs.ErrExist)
	}
	m.mounts[mountpoint] = lm
	return nil
}

func (m *Manager) mounted(mountpoint string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mounts[mountpoint] != nil
}

// Check reports whether the layer mounted at mountpoint is still served.
func (m *Manager) Check(ctx context.Context, mountpoint string) error {
	m.mu.Lock()
	lm := m.mounts[filepath.Clean(mountpoint)]
	m.mu.Unlock()
	if lm == nil {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, iofs.ErrNotExist)
	}
	_, err := os.Stat(lm.mount.Mountpoint())
	return err
}

// CachedBytes returns the bytes the node cache holds for the layer mounted
// at mountpoint: what it takes on the cache's disk, which grows as it is
// read and filled. Layers mounted at several places share those bytes.
func (m *Manager) CachedBytes(ctx context.Context, mountpoint string) (int64, error) {
	m.mu.Lock()
	lm := m.mounts[filepath.Clean(mountpoint)]
	m.mu.Unlock()
	if lm == nil {
		return 0, fmt.Errorf("no layer mounted at %s: %w", mountpoint, iofs.ErrNotExist)
	}
	return lm.ref.Value().cachedBytes(), nil
}

// Unmount unmounts the layer at mountpoint and releases it. If the
// unmount fails, the layer stays mounted and a later Unmount tries again.
//
// containerd unmounts a layer when it removes its snapshot (the image is
// removed, by kubelet's image GC or by hand): once the last mount of a
// layer is gone, the layer closes (its background fill stops) as soon as
// nothing else holds it, and its cached bytes are the first the cache
// evicts.
func (m *Manager) Unmount(ctx context.Context, mountpoint string) error {
	return m.unmount(mountpoint, true)
}

// unmount unmounts mountpoint; forGood marks its layer unwanted if no
// other mount of it is left (not so when the Manager closes: the node
// still has the image).
func (m *Manager) unmount(mountpoint string, forGood bool) error {
	mountpoint = filepath.Clean(mountpoint)
	m.mu.Lock()
	lm := m.mounts[mountpoint]
	delete(m.mounts, mountpoint)
	m.mu.Unlock()
	if lm == nil {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, iofs.ErrNotExist)
	}
	if err := lm.mount.Unmount(); err != nil {
		m.mu.Lock() // still mounted: keep it, and the layer it serves
		m.mounts[mountpoint] = lm
		m.mu.Unlock()
		return err
	}
	m.unhold(mountpoint)
	if forGood {
		m.mu.Lock()
		sl, last := lm.ref.Value(), true
		for _, other := range m.mounts {
			if other.ref.Value() == sl {
				last = false
				break
			}
		}
		if last {
			sl.unwanted.Store(true)
		}
		m.mu.Unlock()
	}
	m.releaseWhenDone(lm.ref, lm.mount)
	return nil
}

// releaseWhenDone releases ref once mnt's server has exited: at once after
// a clean unmount; a mount detached while busy serves its last users
// first.
func (m *Manager) releaseWhenDone(ref *refmap.Ref[layerKey, *sharedLayer], mnt mount) {
	select {
	case <-mnt.Done():
		ref.Release()
	default:
		go func() {
			<-mnt.Done()
			ref.Release()
		}()
	}
}

// Drain refuses new work (Mount, Warm and Resume fail with ErrClosed) and
// waits up to d for the work in flight to finish; it reports whether it
// did. Nothing is unmounted: it is for a process about to exit and leave
// its mounts to a successor.
func (m *Manager) Drain(d time.Duration) bool {
	m.mu.Lock()
	m.draining = true
	m.mu.Unlock()
	done := make(chan struct{})
	go func() {
		m.work.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// Close stops every open, warm-up and mount in flight, then unmounts
// every layer the Manager mounted. It waits up to closeGrace for their
// servers to exit; a layer that something still holds (a container's
// overlay) is released when its holder lets go, which can be after Close.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.work.Wait()
	m.mu.Lock()
	var points []string
	for p := range m.mounts {
		points = append(points, p)
	}
	m.mu.Unlock()
	var errs []error
	var served []<-chan struct{}
	for _, p := range points {
		m.mu.Lock()
		lm := m.mounts[p]
		m.mu.Unlock()
		if err := m.unmount(p, false); err != nil {
			errs = append(errs, err)
			continue
		}
		served = append(served, lm.mount.Done())
	}
	waitAll(served, closeGrace)
	m.layers.Close() // lets go of the layers Warm holds
	m.sched.Close()
	return errors.Join(errs...)
}

// waitAll waits until every channel of chs is closed, or d has passed.
func waitAll(chs []<-chan struct{}, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	for _, ch := range chs {
		select {
		case <-ch:
		case <-t.C:
			return
		}
	}
}
