package lazy

// The Manager's lifetimes (shared open, linger, close while mounting, a
// cancelled opener, unmount retry) against a real in-process registry and
// a real cache, without root: FUSE is the one part replaced, by fakeServe.

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	iofs "io/fs"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/internal/refmap"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/remote"
)

// gatedRegistry is an in-process registry whose blob GETs wait while the
// gate is closed.
type gatedRegistry struct {
	srv     *httptest.Server
	mu      sync.Mutex
	open    chan struct{} // closed: GETs pass
	waiting chan struct{} // receives once per GET that waits
	blobGET atomic.Int32
	// manifestGET and blobHEAD count those requests.
	manifestGET, blobHEAD atomic.Int32
	// corrupt, set before use, makes every 'h' of a blob past its first
	// KiB (its first tar header) an 'X', as a lying mirror would.
	corrupt bool
}

func newGatedRegistry(t *testing.T) *gatedRegistry {
	g := &gatedRegistry{open: make(chan struct{}), waiting: make(chan struct{}, 64)}
	close(g.open)
	reg := registry.New()
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/"):
			g.manifestGET.Add(1)
		case r.Method == http.MethodHead && strings.Contains(r.URL.Path, "/blobs/"):
			g.blobHEAD.Add(1)
		}
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			g.blobGET.Add(1)
			g.mu.Lock()
			open := g.open
			g.mu.Unlock()
			select {
			case <-open:
			default:
				g.waiting <- struct{}{}
				select {
				case <-open:
				case <-r.Context().Done():
					return
				}
			}
		}
		if g.corrupt && strings.Contains(r.URL.Path, "/blobs/") {
			w = &corruptWriter{ResponseWriter: w, off: rangeStart(r)}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(g.srv.Close)
	return g
}

// corruptWriter writes a blob's bytes, from offset off, with every 'h'
// past the first KiB made an 'X'.
type corruptWriter struct {
	http.ResponseWriter
	off int64
}

func (c *corruptWriter) Write(p []byte) (int, error) {
	q := bytes.Clone(p)
	for i := range q {
		if c.off+int64(i) >= 1024 && q[i] == 'h' {
			q[i] = 'X'
		}
	}
	c.off += int64(len(p))
	return c.ResponseWriter.Write(q)
}

// rangeStart is where the blob range a request asks for starts.
func rangeStart(r *http.Request) int64 {
	var start int64
	fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &start)
	return start
}

func (g *gatedRegistry) addr() string { return strings.TrimPrefix(g.srv.URL, "http://") }

// hold makes blob GETs wait until the returned function is called.
func (g *gatedRegistry) hold() (release func()) {
	ch := make(chan struct{})
	g.mu.Lock()
	g.open = ch
	g.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }
}

// pushModel pushes an image of n uncompressed tar layers and returns its
// reference and layer digests.
func pushModel(t *testing.T, g *gatedRegistry, n int) (string, []digest.Digest) {
	var tars [][]byte
	for i := range n {
		tars = append(tars, tarOf(t, fmt.Sprintf("models/f%d", i), strings.Repeat("w", 3000+i)))
	}
	layers := testutil.EncodeLayers(t, tars, testutil.FormatTar)
	ref := testutil.PushImage(t, g.addr(), "model:v1", layers)
	var ds []digest.Digest
	for _, l := range layers {
		ds = append(ds, digest.Digest(l.Digest()))
	}
	return ref, ds
}

// tarOf is an uncompressed tar of one file.
func tarOf(t *testing.T, name, content string) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write([]byte(content))
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// fakeMount stands in for a FUSE mount.
type fakeMount struct {
	mp       string
	l        *layer.Opened
	fails    atomic.Int32 // Unmount fails this many times first
	unmounts atomic.Int32
	// invalidations counts Invalidate calls.
	invalidations atomic.Int32
	done          chan struct{}
	once          sync.Once
	resumedInit   string // the INIT a resumed mount was given
}

func (f *fakeMount) Unmount() error {
	if f.fails.Add(-1) >= 0 {
		return errors.New("device busy")
	}
	f.unmounts.Add(1)
	f.once.Do(func() { close(f.done) })
	return nil
}

func (f *fakeMount) Done() <-chan struct{} { return f.done }
func (f *fakeMount) Invalidate()           { f.invalidations.Add(1) }
func (f *fakeMount) DropPassthroughPages() {}
func (f *fakeMount) Mountpoint() string    { return f.mp }

// Conn gives a descriptor of /dev/null and an INIT naming the mount.
func (f *fakeMount) Conn() (fs.Conn, error) {
	file, err := os.Open(os.DevNull)
	return fs.Conn{File: file, Init: []byte("init " + f.mp)}, err
}

// fakeServe records the mounts a Manager makes.
type fakeServe struct {
	mu     sync.Mutex
	mounts []*fakeMount
	// before, if set, runs at the start of every serve.
	before func(ctx context.Context)
	// failFirstUnmounts is how many times a new mount's Unmount fails.
	failFirstUnmounts int32
}

func (s *fakeServe) serve(ctx context.Context, l *layer.Opened, mp string, _ ...fs.Option) (mount, error) {
	if s.before != nil {
		s.before(ctx)
	}
	m := &fakeMount{mp: mp, l: l, done: make(chan struct{})}
	m.fails.Store(s.failFirstUnmounts)
	s.mu.Lock()
	s.mounts = append(s.mounts, m)
	s.mu.Unlock()
	return m, nil
}

// resume records a resumed mount, with the INIT it was given.
func (s *fakeServe) resume(ctx context.Context, l *layer.Opened, mp string, c fs.Conn, _ ...fs.Option) (mount, error) {
	c.Close()
	m := &fakeMount{mp: mp, l: l, done: make(chan struct{}), resumedInit: string(c.Init)}
	s.mu.Lock()
	s.mounts = append(s.mounts, m)
	s.mu.Unlock()
	return m, nil
}

// live lists the mounts not unmounted.
func (s *fakeServe) live() []*fakeMount {
	s.mu.Lock()
	defer s.mu.Unlock()
	var live []*fakeMount
	for _, m := range s.mounts {
		if m.unmounts.Load() == 0 {
			live = append(live, m)
		}
	}
	return live
}

func newTestManager(t *testing.T, opts ...Option) (*Manager, *fakeServe) {
	return newTestManagerOn(t, t.TempDir(), nil, opts...)
}

// newTestManagerOn is newTestManager with its cache in dir, opened with
// copts.
func newTestManagerOn(t *testing.T, dir string, copts []cache.Option, opts ...Option) (*Manager, *fakeServe) {
	store, err := cache.Open(dir, copts...)
	if err != nil {
		t.Fatal(err)
	}
	opts = append([]Option{WithBackgroundFill(false)}, opts...)
	m := New(store, remote.New(remote.WithRetry(1, time.Millisecond)), opts...)
	fake := &fakeServe{}
	m.serve, m.resume = fake.serve, fake.resume
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close manager: %v", err)
		}
		store.Close()
	})
	return m, fake
}

// At an image's first Prepare, its mount and the warm-up of its other
// layers describe it at once: they share one resolve (one manifest GET),
// which asks for the layers' sizes while it fetches the config.
func TestConcurrentDescribesShareOneResolve(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 2)
	g.manifestGET.Store(0) // the push's own requests
	g.blobHEAD.Store(0)
	m, _ := newTestManager(t)
	release := g.hold() // the config's GET waits
	t.Cleanup(release)
	const n = 4
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { _, errs[i] = m.describe(t.Context(), ref, ds[i%2]) })
	}
	<-g.waiting
	// Every describe holds or awaits the one resolve, and a HEAD of each
	// layer came during the config's GET.
	waitFor(t, func() bool { return m.resolves.Refs(ref) == n })
	waitFor(t, func() bool { return g.blobHEAD.Load() == 2 })
	release()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("describe %d: %v", i, err)
		}
	}
	if got := g.manifestGET.Load(); got != 1 {
		t.Errorf("%d manifest GETs for %d describes at once, want 1", got, n)
	}
}

func TestMountsOfOneLayerShareOneOpen(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManager(t)
	dir := t.TempDir()
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			if err := m.Mount(t.Context(), filepath.Join(dir, fmt.Sprint(i)), ref, ds[0]); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	live := fake.live()
	if len(live) != 4 {
		t.Fatalf("%d mounts, want 4", len(live))
	}
	for _, f := range live[1:] {
		if f.l != live[0].l {
			t.Fatal("mounts of one layer got different opened layers")
		}
	}
	for i := range 3 {
		if err := m.Unmount(t.Context(), filepath.Join(dir, fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(m.OpenLayers(), ds) {
			t.Fatalf("after %d of 4 unmounts, open layers %v", i+1, m.OpenLayers())
		}
	}
	if err := m.Unmount(t.Context(), filepath.Join(dir, "3")); err != nil {
		t.Fatal(err)
	}
	if got := m.OpenLayers(); len(got) != 0 {
		t.Fatalf("open layers after the last unmount: %v", got)
	}
}

func TestMountAtATakenPlaceFails(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 2)
	m, _ := newTestManager(t)
	mp := filepath.Join(t.TempDir(), "mp")
	if err := m.Mount(t.Context(), mp, ref, ds[0]); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(t.Context(), mp+"/", ref, ds[1]); err == nil {
		t.Fatal("a second mount at the same place succeeded")
	}
	if got := m.OpenLayers(); !slices.Equal(got, ds[:1]) {
		t.Fatalf("open layers %v, want only the mounted one", got)
	}
}

// holdBlob has m record layer d of ref, so that the manifest is not
// fetched again, then holds the registry's blob GETs.
func holdBlob(t *testing.T, g *gatedRegistry, m *Manager, ref string, d digest.Digest) (release func()) {
	t.Helper()
	if _, err := m.describe(t.Context(), ref, d); err != nil {
		t.Fatal(err)
	}
	return g.hold()
}

func TestCloseWhileMountingLeavesNothing(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManager(t)
	release := holdBlob(t, g, m, ref, ds[0])
	defer release()
	errc := make(chan error, 1)
	go func() { errc <- m.Mount(context.Background(), filepath.Join(t.TempDir(), "mp"), ref, ds[0]) }()
	<-g.waiting
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err == nil {
		t.Fatal("a mount in flight at Close succeeded")
	}
	if live := fake.live(); len(live) != 0 {
		t.Fatalf("%d mounts left after Close", len(live))
	}
	if got := m.OpenLayers(); len(got) != 0 {
		t.Fatalf("open layers after Close: %v", got)
	}
	if err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "late"), ref, ds[0]); !errors.Is(err, ErrClosed) {
		t.Fatalf("Mount after Close: %v, want ErrClosed", err)
	}
}

// A mount whose caller gave up while it was being made is undone, and
// its layer released: containerd has forgotten it.
func TestMountFinishedAfterCallerGaveUpIsUndone(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManager(t)
	ctx, cancel := context.WithCancel(t.Context())
	fake.before = func(context.Context) { cancel() }
	if err := m.Mount(ctx, filepath.Join(t.TempDir(), "mp"), ref, ds[0]); !errors.Is(err, context.Canceled) {
		t.Fatalf("Mount: %v, want context.Canceled", err)
	}
	if live := fake.live(); len(live) != 0 {
		t.Fatalf("%d mounts left", len(live))
	}
	if got := m.OpenLayers(); len(got) != 0 {
		t.Fatalf("open layers: %v", got)
	}
}

// A Mount whose context ends while it opens the layer must not fail a
// concurrent Mount of the same layer whose context is alive.
func TestCancelledOpenerDoesNotFailOtherMount(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManager(t)
	release := holdBlob(t, g, m, ref, ds[0])
	ctxA, cancelA := context.WithCancel(t.Context())
	dir := t.TempDir()
	errA := make(chan error, 1)
	go func() { errA <- m.Mount(ctxA, filepath.Join(dir, "a"), ref, ds[0]) }()
	<-g.waiting
	errB := make(chan error, 1)
	go func() { errB <- m.Mount(t.Context(), filepath.Join(dir, "b"), ref, ds[0]) }()
	cancelA()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled mount: %v", err)
	}
	release()
	if err := <-errB; err != nil {
		t.Fatalf("the other mount failed with the cancelled one's error: %v", err)
	}
	if live := fake.live(); len(live) != 1 || live[0].mp != filepath.Join(dir, "b") {
		t.Fatalf("live mounts %v, want b's", live)
	}
}

func TestFailedUnmountCanBeRetried(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManager(t)
	fake.failFirstUnmounts = 1
	mp := filepath.Join(t.TempDir(), "mp")
	if err := m.Mount(t.Context(), mp, ref, ds[0]); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(t.Context(), mp); err == nil {
		t.Fatal("first unmount did not fail")
	}
	if err := m.Check(t.Context(), mp); err != nil {
		t.Fatalf("after a failed unmount the layer is not kept mounted: %v", err)
	}
	if err := m.Unmount(t.Context(), mp); err != nil {
		t.Fatalf("retried unmount: %v", err)
	}
	if got := m.OpenLayers(); len(got) != 0 {
		t.Fatalf("open layers after the unmount: %v", got)
	}
}

func TestWarmHoldsLayersUntilMountOrClose(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 3)
	m, _ := newTestManager(t, WithWarmHold(time.Hour))
	warmed := make(chan digest.Digest, len(ds))
	m.warmed = func(d digest.Digest) { warmed <- d }
	m.Warm(t.Context(), ref, ds)
	for range ds {
		<-warmed
	}
	// The mount of a warmed layer ends Warm's hold of it: once unmounted
	// it closes. Warm holds the others.
	mp := filepath.Join(t.TempDir(), "mp")
	if err := m.Mount(t.Context(), mp, ref, ds[0]); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(t.Context(), mp); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(m.OpenLayers()) == 2 })
	if got := m.OpenLayers(); slices.Contains(got, ds[0]) {
		t.Fatalf("open layers %v, want the 2 not mounted, held by Warm", got)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if got := m.OpenLayers(); len(got) != 0 {
		t.Fatalf("open layers after Close: %v", got)
	}
}

// waitFor waits up to 5 s for cond.
// waitReady waits until the layer mounted at mp may be read: its claimed
// index, if it has one, confirmed against the blob (started here, as a
// read would start it).
func waitReady(t *testing.T, m *Manager, mp string) {
	t.Helper()
	m.mu.Lock()
	lm := m.mounts[mp]
	m.mu.Unlock()
	if lm == nil {
		t.Fatalf("nothing mounted at %s", mp)
	}
	if c := lm.ref.Value().l.Confirm; c != nil {
		c.Start()
	}
	select {
	case <-lm.ref.Value().ready:
	case <-time.After(10 * time.Second):
		t.Fatalf("the layer at %s did not become ready", mp)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}

func TestWarmLetsGoAfterItsHold(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	closed := make(chan digest.Digest, 1)
	m, _ := newTestManager(t, WithWarmHold(time.Millisecond))
	closeLayer := m.closeLayer
	m.layers = refmap.New(func(k layerKey, sl *sharedLayer) {
		closeLayer(k, sl)
		closed <- k.digest
	})
	m.Warm(t.Context(), ref, ds)
	if d := <-closed; d != ds[0] {
		t.Fatalf("closed %s", d)
	}
}

// Two images that name one blob but say different things of it (media
// type, DiffID, annotations) get the facts of their own manifest, and do
// not share an opened layer: no image changes what another's pods read.
func TestImagesDoNotShareWhatTheySayOfABlob(t *testing.T) {
	g := newGatedRegistry(t)
	tarb := tarOf(t, "models/f", "weights")
	honest := testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar)
	lieAnnotations := maps.Clone(honest[0].Annotations)
	lieAnnotations["org.opencontainers.image.title"] = "lie"
	liar := []testutil.LayerBlob{{Blob: tarb, MediaType: honest[0].MediaType,
		DiffID: digest.FromString("another layer").String(), Annotations: lieAnnotations}}
	refLiar := testutil.PushImage(t, g.addr(), "liar:v1", liar)
	refHonest := testutil.PushImage(t, g.addr(), "honest:v1", honest)
	d := digest.Digest(honest[0].Digest())

	m, fake := newTestManager(t)
	dir := t.TempDir()
	if err := m.Mount(t.Context(), filepath.Join(dir, "liar"), refLiar, d); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(t.Context(), filepath.Join(dir, "honest"), refHonest, d); err != nil {
		t.Fatal(err)
	}
	live := fake.live()
	if len(live) != 2 || live[0].l == live[1].l {
		t.Fatal("the two images share one opened layer")
	}
	dl, err := m.describe(t.Context(), refHonest, d)
	if err != nil {
		t.Fatal(err)
	}
	if dl.desc.DiffID.String() != honest[0].DiffID || dl.desc.Annotations["org.opencontainers.image.title"] != "" {
		t.Fatalf("the honest image's layer is described as %+v", dl.desc)
	}
}

// A layer whose last snapshot containerd removed (its image is going) is
// closed at once, whatever Warm opened it for, and is evicted before a
// layer that closed earlier but was not removed.
func TestUnmountedForGoodIsEvictedFirst(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 3)
	const blobSize = 4608 // a tar of one 3000-byte file
	dir := t.TempDir()
	m, _ := newTestManagerOn(t, dir, []cache.Option{cache.WithMaxBytes(2*blobSize + blobSize/2)}, WithWarmHold(time.Hour))
	warmed := make(chan digest.Digest, 1)
	m.warmed = func(d digest.Digest) { warmed <- d }
	// A layer's cached bytes become evictable once it has closed: wait
	// for that rather than for it to leave OpenLayers, which it does when
	// it starts closing.
	closed := make(chan digest.Digest, 1)
	closeLayer := m.closeLayer
	m.layers = refmap.New(func(k layerKey, sl *sharedLayer) {
		closeLayer(k, sl)
		closed <- k.digest
	})
	mnt := t.TempDir()
	mount := func(i int) string {
		t.Helper()
		mp := filepath.Join(mnt, fmt.Sprint(i))
		if err := m.Mount(t.Context(), mp, ref, ds[i]); err != nil {
			t.Fatal(err)
		}
		// Its tar headers, which the index was taken from, are read from
		// the blob (all of it, here) once they are confirmed. The whole
		// blob's hashing, which that starts, holds the blob until it ends:
		// wait for it, so that closing the layer lets go of the blob.
		waitReady(t, m, mp)
		m.mu.Lock()
		sl := m.mounts[mp].ref.Value()
		m.mu.Unlock()
		if err := sl.blob.Verify(t.Context()); err != nil {
			t.Fatal(err)
		}
		return mp
	}
	waitClosed := func(i int) {
		t.Helper()
		if d := <-closed; d != ds[i] {
			t.Fatalf("closed layer %s, want %s", d, ds[i])
		}
	}
	onDisk := func(i int) bool {
		_, err := os.Stat(filepath.Join(dir, "blobs", "sha256", ds[i].Encoded()+".rec"))
		return err == nil
	}

	// Layer 0 is used, then closed as at a restart: the node still has
	// its image.
	mp0 := mount(0)
	if u := m.store.Usage(); u != blobSize {
		t.Fatalf("cache usage %d after the first layer, want %d", u, blobSize)
	}
	if n, err := m.CachedBytes(t.Context(), mp0); n != blobSize || err != nil {
		t.Fatalf("CachedBytes = %d, %v; want %d", n, err, blobSize)
	}
	if _, err := m.CachedBytes(t.Context(), mnt); !errors.Is(err, iofs.ErrNotExist) {
		t.Fatalf("CachedBytes of no mount: %v", err)
	}
	if err := m.unmount(mp0, false); err != nil {
		t.Fatal(err)
	}
	waitClosed(0)

	// Layer 1, warmed then mounted, is unmounted: containerd removed it.
	m.Warm(t.Context(), ref, ds[1:2])
	<-warmed
	if err := m.Unmount(t.Context(), mount(1)); err != nil {
		t.Fatal(err)
	}
	waitClosed(1)
	if len(m.OpenLayers()) != 0 {
		t.Fatalf("open layers %v after the unmount", m.OpenLayers())
	}

	// Layer 2 needs room: layer 1 goes, though layer 0 was used before it.
	mount(2)
	if !onDisk(0) || onDisk(1) || !onDisk(2) {
		t.Fatalf("layers on disk: %v %v %v; want the removed one evicted", onDisk(0), onDisk(1), onDisk(2))
	}
}

// A record of an earlier version (no version: it lacks the tables an
// image keeps in its config) is not used while the image resolves; it is
// resolved again and recorded anew. When it does not resolve, the old
// record serves, as it did before the upgrade.
func TestRecordOfAnEarlierVersionIsNotUsed(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, _ := newTestManager(t)
	img, err := m.reg.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	ref = pinnedRef(img) // records serve references by digest
	pinned, err := name.NewDigest(ref)
	if err != nil {
		t.Fatal(err)
	}
	// An old record that says the image has another layer.
	old, err := json.Marshal(map[string]any{"layers": []map[string]any{{"digest": digest.FromString("other"), "size": 1}}})
	if err != nil {
		t.Fatal(err)
	}
	recName := imageRecordName(digest.Digest(pinned.DigestStr()))
	if err := m.store.PutMeta(recName, old); err != nil {
		t.Fatal(err)
	}
	if _, err := m.describe(t.Context(), ref, ds[0]); err != nil {
		t.Fatalf("describe with an old record: %v; want the image resolved again", err)
	}
	b, err := m.store.GetMeta(recName)
	if err != nil {
		t.Fatal(err)
	}
	var rec imageRecord
	if err := json.Unmarshal(b, &rec); err != nil || rec.Version != recordVersion || len(rec.Layers) != 1 || rec.Layers[0].Digest != ds[0] {
		t.Errorf("record %s (%v): want the image's, of version %d", b, err, recordVersion)
	}

	// The old record again, and a registry that does not answer, in a
	// process started since (this one knows the image as resolved).
	if _, err := m.describe(t.Context(), ref, digest.FromString("other")); !errors.Is(err, iofs.ErrNotExist) {
		t.Errorf("describe of a layer only the old record has, after the image resolved: %v", err)
	}
	if err := m.store.PutMeta(recName, old); err != nil {
		t.Fatal(err)
	}
	g.srv.Close()
	restarted := New(m.store, m.reg, WithBackgroundFill(false))
	t.Cleanup(func() { restarted.Close() })
	if _, err := restarted.describe(t.Context(), ref, digest.FromString("other")); err != nil {
		t.Errorf("describe with an old record and no registry: %v; want the old record's layer", err)
	}
}

// TestWarmAndMountReachLocalContentWithTheirContext: the resolve that
// Warm starts, the first for its image, asks WithLocalContent's reader
// with the values of Warm's context (the containerd namespace, in
// weightsnapd), though the call returned long before; a Mount's resolve
// does the same with its own.
func TestWarmAndMountReachLocalContentWithTheirContext(t *testing.T) {
	type key struct{}
	g := newGatedRegistry(t)
	tagged, ds := pushModel(t, g, 2)
	img, err := remote.New().Resolve(t.Context(), tagged)
	if err != nil {
		t.Fatal(err)
	}
	ref := pinnedRef(img)
	var mu sync.Mutex
	seen := map[string]bool{}
	local := func(ctx context.Context, d digest.Digest, max int64) ([]byte, error) {
		v, _ := ctx.Value(key{}).(string)
		mu.Lock()
		seen[v] = true
		mu.Unlock()
		return nil, iofs.ErrNotExist
	}
	m, _ := newTestManager(t, WithWarmHold(time.Hour), WithLocalContent(local))
	warmed := make(chan digest.Digest, len(ds))
	m.warmed = func(d digest.Digest) { warmed <- d }
	wctx, cancel := context.WithCancel(context.WithValue(t.Context(), key{}, "warm"))
	cancel() // Warm's work outlives its caller
	m.Warm(wctx, ref, ds)
	for range ds {
		<-warmed
	}
	mu.Lock()
	if !seen["warm"] {
		t.Errorf("Warm's resolve asked local content with %v; want Warm's context", seen)
	}
	mu.Unlock()

	// Another image (the tag moved to it), first resolved by a Mount.
	other, ods := pushModel(t, g, 1)
	oimg, err := remote.New().Resolve(t.Context(), other)
	if err != nil {
		t.Fatal(err)
	}
	mctx := context.WithValue(t.Context(), key{}, "mount")
	if err := m.Mount(mctx, filepath.Join(t.TempDir(), "mp"), pinnedRef(oimg), ods[0]); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !seen["mount"] {
		t.Errorf("Mount's resolve asked local content with %v; want Mount's context", seen)
	}
}
