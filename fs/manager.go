package fs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
)

// errManagerClosed is returned by MountLayer after Close.
var errManagerClosed = errors.New("manager closed")

// ErrUnsupported is returned by MountLayer for a layer that cannot be
// served lazily; the caller falls back to downloading it.
var ErrUnsupported = errors.New("layer cannot be served lazily")

// Manager mounts image layers lazily. It is node-wide: every mount of the
// same layer digest shares one opened layer (one index, one cache entry,
// one background fill), whichever image, tag or repository it came from.
type Manager struct {
	store *cache.Store
	cfg   Config
	sched *prefetch.Scheduler

	mu     sync.Mutex
	layers map[digest.Digest]*layerSlot
	mounts map[string]*layerMount // by mountpoint
	closed bool

	// warmCtx bounds Warm's work: Close cancels it, and held layers let go.
	warmCtx    context.Context
	warmCancel context.CancelFunc
	warmWG     sync.WaitGroup
}

// layerSlot is a layer's place in the Manager: opened once however many
// callers mount it at the same time, and closed completely before it is
// opened again (a streamed layer's writer must not be closed under a new
// reader of the same stream).
type layerSlot struct {
	refs   int
	ready  chan struct{} // closed when the open has finished
	sl     *sharedLayer  // after ready: the layer, or nil and err
	err    error
	closed chan struct{} // set at the last release; closed once closed
}

// Config tunes a Manager.
type Config struct {
	// Remote are the registry options (plain HTTP, mirrors, retries).
	Remote []remote.Option
	// Prefetch sizes read-ahead and background fill (zero: defaults).
	Prefetch prefetch.Options
	// MaxReadAhead bounds how far ahead of a sequential reader fetches
	// go (default prefetch.DefaultMaxWindow).
	MaxReadAhead int64
	// NoBackgroundFill disables fetching whole layers into the cache
	// after they are mounted.
	NoBackgroundFill bool
	// NoPassthrough serves every read through the daemon, even of files
	// the cache holds whole (see Options.Passthrough).
	NoPassthrough bool
	// WarmHold is how long a layer opened by Warm stays open for the
	// mount it was opened for (default one minute).
	WarmHold time.Duration
}

// passthroughMin is the smallest file that gets a cache file of its own,
// to be passed through once cached: weight files, not the many small ones,
// whose reads the page cache absorbs anyway.
const passthroughMin = 4 << 20

// sharedLayer is one opened layer.
type sharedLayer struct {
	desc   layer.Descriptor
	blob   *cache.Blob
	layer  layer.Layer
	contig layer.Contiguous   // nil unless file contents are blob ranges
	cancel context.CancelFunc // stops background work

	seqMu  sync.Mutex
	seq    map[uint64][]*stream // read-ahead state of each file's readers
	seqUse uint64               // clock for replacing the least recently used

	used        chan struct{} // closed at the first read of any file
	usedOnce    sync.Once
	mounted     chan struct{} // closed at the first mount
	mountedOnce sync.Once
	filled      chan struct{} // closed when background fill has returned
}

type layerMount struct {
	digest digest.Digest
	mount  *Mount
}

// NewManager returns a Manager fetching through store with the registry
// options opts and default read-ahead and background fill.
func NewManager(store *cache.Store, opts ...remote.Option) *Manager {
	return New(store, Config{Remote: opts})
}

// New returns a Manager fetching through store, configured by cfg.
func New(store *cache.Store, cfg Config) *Manager {
	if cfg.MaxReadAhead <= 0 {
		cfg.MaxReadAhead = prefetch.DefaultMaxWindow
	}
	if cfg.Prefetch.SpanSize <= 0 {
		cfg.Prefetch.SpanSize = prefetch.DefaultSpanSize
	}
	if cfg.WarmHold <= 0 {
		cfg.WarmHold = time.Minute
	}
	warmCtx, warmCancel := context.WithCancel(context.Background())
	return &Manager{
		store:      store,
		cfg:        cfg,
		sched:      prefetch.NewScheduler(cfg.Prefetch),
		layers:     make(map[digest.Digest]*layerSlot),
		mounts:     make(map[string]*layerMount),
		warmCtx:    warmCtx,
		warmCancel: warmCancel,
	}
}

// maxWarming bounds the layers Warm opens at once.
const maxWarming = 4

// Warm opens the layers of imageRef that are not open yet, in the
// background and several at once, so that the mounts containerd asks for
// one after another find them indexed. Layers that would be streamed
// whole (plain gzip or zstd) are left alone: opening one starts its
// download. A layer nobody mounts within Config.WarmHold is closed again;
// its background fill waits for a mount.
func (m *Manager) Warm(imageRef string, layers []digest.Digest) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	var todo []digest.Digest
	for _, d := range layers {
		if slot := m.layers[d]; (slot == nil || slot.closed != nil) && !slices.Contains(todo, d) {
			todo = append(todo, d)
		}
	}
	if len(todo) == 0 {
		m.mu.Unlock()
		return
	}
	m.warmWG.Add(1) // under mu: Close waits for it
	m.mu.Unlock()
	slog.Debug("warming layers", "image", imageRef, "layers", len(todo))
	go func() {
		defer m.warmWG.Done()
		ctx := m.warmCtx
		sem := make(chan struct{}, maxWarming) // taken while a layer opens
		var wg sync.WaitGroup
		for _, d := range todo {
			// In turn: the first layer without a record resolves the
			// image, which records every layer for the others.
			rec, err := m.describe(ctx, imageRef, d)
			if err != nil {
				slog.Debug("warming layer", "layer", d, "image", imageRef, "err", err)
				continue
			}
			if !layer.MayBeRandomAccess(rec.descriptor(d)) {
				continue
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
			}
			if ctx.Err() != nil {
				break
			}
			wg.Go(func() { m.warmLayer(ctx, imageRef, d, sem) })
		}
		wg.Wait()
	}()
}

// warmLayer opens layer d, gives back its place in sem, and holds the
// layer open for Config.WarmHold, or until ctx ends.
func (m *Manager) warmLayer(ctx context.Context, imageRef string, d digest.Digest, sem <-chan struct{}) {
	_, err := m.acquire(ctx, imageRef, d)
	<-sem
	if err != nil {
		slog.Debug("warming layer", "layer", d, "image", imageRef, "err", err)
		return
	}
	t := time.NewTimer(m.cfg.WarmHold)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
	m.release(d)
}

// OpenLayers lists the layers open now, mounted or held by Warm; not
// those still opening or already closing.
func (m *Manager) OpenLayers() []digest.Digest {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ds []digest.Digest
	for d, slot := range m.layers {
		select {
		case <-slot.ready:
			if slot.err == nil && slot.closed == nil {
				ds = append(ds, d)
			}
		default:
		}
	}
	return ds
}

// layerRecord is what the Manager remembers of a layer so that a remount
// after a restart needs no manifest from the registry.
type layerRecord struct {
	Repo        string            `json:"repo"`
	MediaType   string            `json:"mediaType"`
	Size        int64             `json:"size"`
	DiffID      digest.Digest     `json:"diffID"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

func recordName(d digest.Digest) string { return "layer/" + d.Encoded() + ".json" }

// describe returns the record of layer d of imageRef, resolving the image
// only when the record is not yet kept. The blob is fetched from imageRef's
// repository, whichever repository first recorded the layer.
func (m *Manager) describe(ctx context.Context, imageRef string, d digest.Digest) (layerRecord, error) {
	var rec layerRecord
	if b, err := m.store.GetMeta(recordName(d)); err == nil && json.Unmarshal(b, &rec) == nil && rec.Size > 0 {
		if ref, err := name.ParseReference(imageRef); err == nil {
			rec.Repo = ref.Context().Name()
		}
		return rec, nil
	}
	img, err := remote.Resolve(ctx, imageRef, m.cfg.Remote...)
	if err != nil {
		return rec, err
	}
	for _, l := range m.record(img) {
		if l.digest == d {
			return l.layerRecord, nil
		}
	}
	return rec, fmt.Errorf("layer %s is not in image %s: %w", d, imageRef, iofs.ErrNotExist)
}

// recorded is a layer's record with its digest.
type recorded struct {
	digest digest.Digest
	layerRecord
}

// record keeps the records of img's layers and returns them.
func (m *Manager) record(img *remote.Image) []recorded {
	var recs []recorded
	for _, l := range img.Layers {
		r := layerRecord{Repo: img.Ref.Context().Name(), MediaType: l.MediaType, Size: l.Size, DiffID: l.DiffID, Annotations: l.Annotations}
		if b, err := json.Marshal(r); err == nil {
			_ = m.store.PutMeta(recordName(l.Digest), b)
		}
		recs = append(recs, recorded{l.Digest, r})
	}
	return recs
}

// descriptor is the layer descriptor of layer d with this record.
func (r layerRecord) descriptor(d digest.Digest) layer.Descriptor {
	return layer.Descriptor{Digest: d, Size: r.Size, MediaType: r.MediaType, DiffID: r.DiffID, Annotations: r.Annotations}
}

// acquire returns the shared opened layer d, opening it on first use;
// every successful acquire is paired with a release.
func (m *Manager) acquire(ctx context.Context, imageRef string, d digest.Digest) (*sharedLayer, error) {
	for {
		m.mu.Lock()
		slot := m.layers[d]
		if slot != nil && slot.closed != nil { // closing: wait, then open anew
			closed := slot.closed
			m.mu.Unlock()
			select {
			case <-closed:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if slot != nil {
			slot.refs++
			m.mu.Unlock()
			select {
			case <-slot.ready:
			case <-ctx.Done():
				m.release(d)
				return nil, ctx.Err()
			}
			if slot.err != nil {
				m.release(d)
				return nil, slot.err
			}
			return slot.sl, nil
		}
		slot = &layerSlot{refs: 1, ready: make(chan struct{})}
		m.layers[d] = slot
		m.mu.Unlock()

		rec, err := m.describe(ctx, imageRef, d)
		if err == nil {
			slot.sl, err = m.open(ctx, d, rec)
		}
		slot.err = err
		close(slot.ready)
		if err != nil {
			m.release(d)
			return nil, err
		}
		return slot.sl, nil
	}
}

func (m *Manager) open(ctx context.Context, d digest.Digest, rec layerRecord) (*sharedLayer, error) {
	rb, err := remote.OpenBlob(ctx, rec.Repo, d, rec.Size, m.cfg.Remote...)
	if err != nil {
		return nil, err
	}
	desc := rec.descriptor(d)
	fetch := func(ctx context.Context, p []byte, off int64) error {
		t0 := time.Now()
		_, err := rb.ReadAt(ctx, p, off)
		slog.Debug("fetched", "layer", d, "off", off, "len", len(p), "took", time.Since(t0), "err", err)
		if errors.Is(err, io.EOF) && off+int64(len(p)) >= rb.Size() {
			err = nil
		}
		return err
	}
	blob, err := m.store.Blob(d, rec.Size, fetch)
	if err != nil {
		return nil, err
	}
	bg, cancel := context.WithCancel(context.Background())
	opener := func(ctx context.Context) (io.ReadCloser, error) {
		return rb.Open(remote.WithReason(ctx, "stream"), 0)
	}
	// Read-ahead around the tar headers read to build the index waits
	// until segment has given the large files their own cache files, so
	// that their first spans are not written to the data file only to be
	// moved.
	src := &readAround{Blob: blob, sched: m.sched, span: m.cfg.Prefetch.SpanSize, deferring: true}
	t0 := time.Now()
	l, err := layer.Open(ctx, desc, src, opener, streamStore{m.store}, m.store)
	if err != nil {
		cancel()
		blob.Close()
		if errors.Is(err, layer.ErrUnsupported) {
			return nil, fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		return nil, err
	}
	sl := &sharedLayer{desc: desc, blob: blob, layer: l, cancel: cancel, seq: make(map[uint64][]*stream),
		used: make(chan struct{}), mounted: make(chan struct{}), filled: make(chan struct{})}
	sl.contig, _ = l.(layer.Contiguous)
	indexed := time.Now()
	if !m.cfg.NoPassthrough {
		sl.segment()
	}
	src.startReadAhead()
	slog.Debug("layer opened", "layer", d, "index", indexed.Sub(t0), "segments", time.Since(indexed))
	if m.cfg.NoBackgroundFill || !layer.RandomAccess(l) {
		close(sl.filled)
	} else {
		go func() {
			defer close(sl.filled)
			select { // a layer opened by Warm may never be mounted
			case <-sl.mounted:
			case <-bg.Done():
				return
			}
			select { // see fillDelay
			case <-sl.used:
			case <-time.After(fillDelay):
			case <-bg.Done():
				return
			}
			m.fill(bg, sl)
		}()
	}
	return sl, nil
}

// segment gives each large file of a contiguous layer a cache file of its
// own, so that it can be passed through once the blob is verified. A file
// that cannot get one (see cache.ErrSegment) is served through the daemon.
func (sl *sharedLayer) segment() {
	if sl.contig == nil {
		return
	}
	for _, f := range sl.contig.Files() {
		if f.Len < passthroughMin {
			continue
		}
		if err := sl.blob.Segment(f.Off, f.Len); err != nil {
			slog.Debug("no passthrough for file", "layer", sl.desc.Digest, "file", f.Name, "err", err)
		}
	}
}

// passthroughFile returns the cache file holding exactly e's content, once
// the layer's blob is verified.
func (sl *sharedLayer) passthroughFile(e *layer.Entry) (*os.File, bool) {
	if sl.contig == nil || e.Size < passthroughMin {
		return nil, false
	}
	r, ok := sl.contig.DataRange(e)
	if !ok {
		return nil, false
	}
	return sl.blob.FileOf(r.Off, r.Len)
}

// stream is one reader of a file, as far as read-ahead can tell.
type stream struct {
	q       *prefetch.Sequential
	lastUse uint64
}

// maxReaders is how many readers of one file get read-ahead of their own
// (tensor-parallel ranks loading one checkpoint read it at several places).
const maxReaders = 4

// reader returns the read-ahead state of the reader of e that a read at off
// continues, starting one (in place of the least recently used) if none
// does; nil if e's bytes are not a blob range. Callers hold sl.seqMu.
func (sl *sharedLayer) reader(e *layer.Entry, off, span, maxWindow int64) *prefetch.Sequential {
	sl.seqUse++
	streams := sl.seq[e.Ino]
	for _, st := range streams {
		if st.q.Near(off) {
			st.lastUse = sl.seqUse
			return st.q
		}
	}
	r, ok := sl.contig.DataRange(e)
	if !ok {
		return nil
	}
	st := &stream{q: prefetch.NewSequential(prefetch.Range{Off: r.Off, Len: r.Len}, span, maxWindow), lastUse: sl.seqUse}
	if len(streams) < maxReaders {
		sl.seq[e.Ino] = append(streams, st)
		return st.q
	}
	oldest := 0
	for i, o := range streams {
		if o.lastUse < streams[oldest].lastUse {
			oldest = i
		}
	}
	streams[oldest] = st
	return st.q
}

// fillDelay is how long after its first mount a layer nobody reads waits
// before its background fill starts. A pull is followed by the creation of the
// containers that use the image, which needs the node's CPU; the first
// read of the layer starts the fill at once.
const fillDelay = 2 * time.Second

// fill fetches the whole blob of sl into the cache, metadata files and
// safetensors headers first, yielding to read-ahead.
func (m *Manager) fill(ctx context.Context, sl *sharedLayer) {
	var files []prefetch.File
	if sl.contig != nil {
		for _, f := range sl.contig.Files() {
			files = append(files, prefetch.File{Name: f.Name, Range: prefetch.Range{Off: f.Off, Len: f.Len}})
		}
	}
	label := sl.desc.Digest.String()
	metrics.LayerSizeBytes.WithLabelValues(label).Set(float64(sl.blob.Size()))
	progress := func(int64) { metrics.LayerFetchedBytes.WithLabelValues(label).Set(float64(sl.blob.CachedBytes())) }
	ctx = remote.WithReason(ctx, "background")
	err := m.sched.Fill(ctx, sl.blob, prefetch.ModelOrder(files, sl.blob.Size()), progress)
	if ctx.Err() != nil {
		return // the layer is being closed
	}
	progress(0)
	if err != nil {
		slog.Warn("background fill stopped", "layer", label, "err", err)
		return
	}
	// Hashing the whole blob may still be running; after a restart, the
	// blob is known whole but its chunks are checked (read back against
	// their checksums) before files are passed through.
	err = sl.blob.Verify(ctx)
	if err == nil {
		err = sl.blob.Check(ctx, 0, sl.blob.Size())
	}
	if err != nil {
		if ctx.Err() == nil {
			slog.Warn("layer not verified", "layer", label, "err", err)
		}
		return
	}
	metrics.LayerVerified.WithLabelValues(label).Set(1)
}

// onRead marks the layer used (starting its background fill) and starts
// read-ahead for a sequential reader of a file whose bytes are a
// contiguous range of the blob.
func (m *Manager) onRead(sl *sharedLayer, e *layer.Entry, off, n int64) {
	sl.usedOnce.Do(func() { close(sl.used) })
	if sl.contig == nil {
		return
	}
	sl.seqMu.Lock()
	q := sl.reader(e, off, m.cfg.Prefetch.SpanSize, m.cfg.MaxReadAhead)
	var ahead prefetch.Range
	ok := q != nil
	if ok {
		ahead, ok = q.Observe(off, n)
	}
	sl.seqMu.Unlock()
	if ok {
		m.sched.ReadAhead(sl.blob, ahead)
	}
}

func (m *Manager) closeLayer(sl *sharedLayer) {
	sl.cancel()
	<-sl.filled
	label := sl.desc.Digest.String()
	metrics.LayerSizeBytes.DeleteLabelValues(label)
	metrics.LayerFetchedBytes.DeleteLabelValues(label)
	metrics.LayerVerified.DeleteLabelValues(label)
	m.sched.Forget(sl.blob)
	if err := sl.layer.Close(); err != nil {
		slog.Warn("closing layer", "layer", sl.desc.Digest, "err", err)
	}
	sl.blob.Close()
}

// release drops a reference to layer d; the last one closes the layer.
func (m *Manager) release(d digest.Digest) {
	m.mu.Lock()
	slot := m.layers[d]
	slot.refs--
	if slot.refs > 0 {
		m.mu.Unlock()
		return
	}
	slot.closed = make(chan struct{})
	m.mu.Unlock()
	<-slot.ready
	if slot.sl != nil {
		m.closeLayer(slot.sl)
	}
	m.mu.Lock()
	delete(m.layers, d)
	close(slot.closed)
	m.mu.Unlock()
}

// MountLayer mounts layer d of image imageRef lazily at mountpoint.
func (m *Manager) MountLayer(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error {
	mountpoint = filepath.Clean(mountpoint)
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return fmt.Errorf("mount layer %s: %w", d, errManagerClosed)
	}
	if m.mounted(mountpoint) {
		return fmt.Errorf("a layer is already mounted at %s: %w", mountpoint, iofs.ErrExist)
	}
	sl, err := m.acquire(ctx, imageRef, d)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(mountpoint, 0o755); err != nil {
		m.release(d)
		return err
	}
	opt := Options{Name: "weightsnap:" + d.String()}
	opt.OnRead = func(e *layer.Entry, off, n int64) { m.onRead(sl, e, off, n) }
	if !m.cfg.NoPassthrough {
		opt.Passthrough = sl.passthroughFile
	}
	t0 := time.Now()
	mnt, err := MountLayer(ctx, sl.layer, mountpoint, opt)
	slog.Debug("layer mounted", "layer", d, "mountpoint", mountpoint, "took", time.Since(t0), "err", err)
	if err != nil {
		m.release(d)
		return err
	}
	m.mu.Lock()
	_, taken := m.mounts[mountpoint]
	if !taken {
		m.mounts[mountpoint] = &layerMount{digest: d, mount: mnt}
	}
	m.mu.Unlock()
	if taken { // a concurrent MountLayer at the same place won
		mnt.Unmount()
		m.release(d)
		return fmt.Errorf("a layer is already mounted at %s: %w", mountpoint, iofs.ErrExist)
	}
	sl.mountedOnce.Do(func() { close(sl.mounted) })
	return nil
}

func (m *Manager) mounted(mountpoint string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.mounts[mountpoint]
	return ok
}

// Check reports whether the layer mounted at mountpoint is still served.
func (m *Manager) Check(ctx context.Context, mountpoint string) error {
	m.mu.Lock()
	lm, ok := m.mounts[filepath.Clean(mountpoint)]
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, iofs.ErrNotExist)
	}
	_, err := os.Stat(lm.mount.Mountpoint())
	return err
}

// Unmount unmounts the layer at mountpoint and releases it.
func (m *Manager) Unmount(ctx context.Context, mountpoint string) error {
	m.mu.Lock()
	lm, ok := m.mounts[filepath.Clean(mountpoint)]
	delete(m.mounts, filepath.Clean(mountpoint))
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, iofs.ErrNotExist)
	}
	if err := lm.mount.Unmount(); err != nil {
		m.mu.Lock() // still mounted: keep it, and the layer it serves
		m.mounts[filepath.Clean(mountpoint)] = lm
		m.mu.Unlock()
		return err
	}
	select {
	case <-lm.mount.Done():
		m.release(lm.digest)
	default: // detached while busy: the layer serves its last users
		go func() {
			<-lm.mount.Done()
			m.release(lm.digest)
		}()
	}
	return nil
}

// Close unmounts every layer the Manager mounted.
func (m *Manager) Close() error {
	m.mu.Lock()
	if !m.closed {
		m.closed = true
		m.warmCancel()
	}
	m.mu.Unlock()
	m.warmWG.Wait()
	m.mu.Lock()
	var points []string
	for p := range m.mounts {
		points = append(points, p)
	}
	m.mu.Unlock()
	var errs []error
	for _, p := range points {
		if err := m.Unmount(context.Background(), p); err != nil {
			errs = append(errs, err)
		}
	}
	m.sched.Close()
	return errors.Join(errs...)
}

// streamStore adapts the cache's concrete Stream to layer.StreamStore.
type streamStore struct{ s *cache.Store }

func (s streamStore) Stream(key digest.Digest) (layer.Stream, bool, error) {
	st, w, err := s.s.Stream(key)
	if err != nil {
		return nil, false, err
	}
	return st, w, nil
}

// ImageMount is the merged, read-only tree of an image at a target
// directory: one lazy FUSE mount per layer, combined by overlayfs.
type ImageMount struct {
	m       *Manager
	target  string
	layers  []string // layer mountpoints, base first
	overlay bool     // the merged view is mounted
}

// MountImage mounts the merged tree of image ref at target, with the layer
// mounts under workdir.
func (m *Manager) MountImage(ctx context.Context, ref, target, workdir string) (_ *ImageMount, err error) {
	img, err := remote.Resolve(ctx, ref, m.cfg.Remote...)
	if err != nil {
		return nil, err
	}
	im := &ImageMount{m: m, target: target}
	defer func() {
		if err != nil { // undo the layer mounts made so far
			im.Unmount()
		}
	}()
	// The records spare every mount a resolve of the image; the layers
	// above the first are opened while it is mounted.
	m.record(img)
	var above []digest.Digest
	for _, l := range img.Layers[min(1, len(img.Layers)):] {
		above = append(above, l.Digest)
	}
	m.Warm(img.Ref.String(), above)
	for i, l := range img.Layers {
		mp := filepath.Join(workdir, fmt.Sprintf("layer-%03d", i))
		if err := m.MountLayer(ctx, mp, img.Ref.String(), l.Digest); err != nil {
			return nil, fmt.Errorf("mounting layer %d (%s): %w", i, l.Digest, err)
		}
		im.layers = append(im.layers, mp)
	}
	if len(im.layers) == 0 {
		return nil, fmt.Errorf("image %s has no layers", ref)
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	lowers := make([]string, len(im.layers))
	for i, p := range im.layers { // overlayfs wants the top-most first
		lowers[len(lowers)-1-i] = p
	}
	if err := MountOverlay(lowers, target); err != nil {
		return nil, fmt.Errorf("mounting merged view at %s: %w", target, err)
	}
	im.overlay = true
	return im, nil
}

// Unmount removes the merged view and every layer mount under it.
func (im *ImageMount) Unmount() error {
	var errs []error
	if im.overlay {
		errs = append(errs, UnmountOverlay(im.target))
		im.overlay = false
	}
	for i := len(im.layers) - 1; i >= 0; i-- {
		errs = append(errs, im.m.Unmount(context.Background(), im.layers[i]))
	}
	im.layers = nil
	return errors.Join(errs...)
}

// readAround is the Source of a layer. A read that misses the cache holds
// back background fill while it waits, and fetches the whole span around
// it: weight files are read in large pieces (a tensor, the kernel's
// read-ahead), so the next read of a cold region is most likely close by,
// and one span-sized range request costs little more than a chunk-sized
// one. Small reads (headers, config files) fetch only their chunk at once
// and leave the rest of the span to the scheduler.
type readAround struct {
	*cache.Blob
	sched *prefetch.Scheduler
	span  int64

	mu        sync.Mutex
	deferring bool             // read-ahead is held back (see startReadAhead)
	deferred  []prefetch.Range // and these spans wait for it
}

// readAhead queues rg for the scheduler, or keeps it for startReadAhead.
func (r *readAround) readAhead(rg prefetch.Range) {
	r.mu.Lock()
	if r.deferring {
		r.deferred = append(r.deferred, rg)
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	r.sched.ReadAhead(r.Blob, rg)
}

// startReadAhead ends the deferral and queues the spans held back.
func (r *readAround) startReadAhead() {
	r.mu.Lock()
	held := r.deferred
	r.deferring, r.deferred = false, nil
	r.mu.Unlock()
	for _, rg := range held {
		r.sched.ReadAhead(r.Blob, rg)
	}
}

func (r *readAround) isDeferring() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.deferring
}

// smallRead is the largest read served before the rest of its span.
const smallRead = 64 << 10

func (r *readAround) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	done, err := r.around(ctx, off, int64(len(p)))
	defer done()
	if err != nil {
		return 0, err
	}
	return r.Blob.ReadAt(ctx, p, off)
}

func (r *readAround) ReadFile(ctx context.Context, off, n int64) (*os.File, int64, func(), error) {
	done, err := r.around(ctx, off, n)
	defer done()
	if err != nil {
		return nil, 0, nil, err
	}
	return r.Blob.ReadFile(ctx, off, n)
}

func (r *readAround) around(ctx context.Context, off, n int64) (done func(), err error) {
	if r.Present(off, n) {
		return func() {}, nil
	}
	demandDone := r.sched.Demand()
	start := off / r.span * r.span
	end := min(r.Size(), (off+n+r.span-1)/r.span*r.span)
	if n <= smallRead {
		// After the read's own chunk has come: queued first, a span
		// fetch would take that chunk along and make the read wait for
		// the whole span.
		return func() {
			r.readAhead(prefetch.Range{Off: start, Len: end - start})
			demandDone()
		}, nil
	}
	if r.isDeferring() {
		return demandDone, nil // the read fetches its own chunks
	}
	return demandDone, r.Blob.Fetch(ctx, start, end-start)
}
