package lazy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
)

// sharedLayer is one opened layer, shared by every mount of its digest.
type sharedLayer struct {
	desc    layer.Descriptor
	image   string // the image that opened it, for logs
	trust   trust
	failed  atomic.Pointer[error] // set once, when found wrong (trust.go)
	blob    *cache.Blob
	stream  *cache.Stream // the decompressed tar of a streamed layer; nil if none
	l       *layer.Opened
	readers *prefetch.Readers // nil unless file contents are blob ranges
	cancel  context.CancelFunc

	used        chan struct{} // closed at the first read of any file
	usedOnce    sync.Once
	mounted     chan struct{} // closed at the first mount
	mountedOnce sync.Once
	filled      chan struct{} // closed when background fill has returned
	// ready is closed when the index's file ranges may be used (read-ahead,
	// segments, passthrough): at open, or once a claimed index (from the
	// tar header annotation) is confirmed; prepared when that has returned.
	ready    chan struct{}
	prepared chan struct{}
	// unwanted is set when its last mount was unmounted (containerd
	// removed the snapshot: the image is going), and cleared by a new
	// mount: a layer that closes unwanted is the cache's first to evict.
	unwanted atomic.Bool
}

// open opens the layer dl describes: its blob in the cache, checked as
// its image allows (trust.go), its index, the segments of its large files,
// and its background fill.
func (m *Manager) open(ctx context.Context, dl described) (*sharedLayer, error) {
	desc := dl.desc
	rb, err := m.openBlob(ctx, dl)
	if err != nil {
		return nil, err
	}
	tr, err := m.trustOf(dl)
	if err != nil {
		return nil, err
	}
	blob, err := m.store.Blob(tr.key, desc.Size, fetchFunc(rb), append(tr.blobOptions(), cache.WithRangeReader(rangeReader(rb)))...)
	if err != nil {
		if errors.Is(err, cache.ErrTable) || errors.Is(err, cache.ErrTableConflict) {
			return nil, fmt.Errorf("%w: layer %s of %s: %v", ErrUnsupported, desc.Digest, dl.image, err)
		}
		return nil, err
	}
	if err := tr.before(ctx, blob); err != nil {
		blob.Close()
		return nil, fmt.Errorf("layer %s of %s: %w", desc.Digest, dl.image, err)
	}
	// Read-ahead around the tar headers read to build the index waits
	// until segment has given the large files their own cache files, so
	// that their first spans are not written to the data file only to be
	// moved.
	src := &readAround{Blob: blob, sched: m.sched, deferring: true}
	opener := tr.opener(rb, blob)
	t0 := time.Now()
	var stream atomic.Pointer[cache.Stream]
	l, err := layer.Open(ctx, desc, src, tr.layerOptions(opener, m.store, &stream, blob, m.opt)...)
	if err == nil && tr.v == byTOC && l.Streamed {
		// Its manifest promised a TOC with chunk digests; the blob has
		// none, and a stream is checked only at its end.
		l.Close()
		err = fmt.Errorf("%w: layer %s of %s: its manifest gives a TOC digest, but the blob has no usable TOC", layer.ErrUnsupported, desc.Digest, dl.image)
	}
	if err != nil {
		blob.Close()
		if errors.Is(err, layer.ErrUnsupported) {
			return nil, fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		return nil, err
	}
	bg, cancel := context.WithCancel(context.Background())
	sl := &sharedLayer{desc: desc, image: dl.image, trust: tr, blob: blob, stream: stream.Load(), cancel: cancel,
		used: make(chan struct{}), mounted: make(chan struct{}), filled: make(chan struct{}),
		ready: make(chan struct{}), prepared: make(chan struct{})}
	sl.l = sl.guard(l)
	if l.Ranges != nil {
		sl.readers = prefetch.NewReaders(m.sched.SpanSize(), m.opt.maxReadAhead)
	}
	indexed := time.Now()
	if l.Confirm == nil {
		m.prepareReads(sl, src)
	} else {
		go m.prepareWhenConfirmed(bg, sl, src)
	}
	slog.Debug("layer opened", "layer", desc.Digest, "image", dl.image, "verification", tr.label(), "index", indexed.Sub(t0), "segments", time.Since(indexed), "claimed", l.Confirm != nil)
	metrics.LayersOpened.WithLabelValues(tr.label()).Inc()
	m.startBackground(bg, sl)
	return sl, nil
}

// prepareReads does what works from the index's file ranges before they
// are read: the segments of the large files, then the read-ahead held
// back until they exist.
func (m *Manager) prepareReads(sl *sharedLayer, src *readAround) {
	defer close(sl.prepared)
	if m.opt.passthrough {
		sl.segment()
	}
	src.startReadAhead()
	close(sl.ready)
}

// prepareWhenConfirmed waits for the claimed index of sl to be checked
// against its blob: then prepares its reads, or, if the blob contradicts
// it, fails the layer. A layer closed first prepares nothing.
func (m *Manager) prepareWhenConfirmed(ctx context.Context, sl *sharedLayer, src *readAround) {
	c := sl.l.Confirm
	select {
	case <-c.Done():
	case <-ctx.Done():
		close(sl.prepared)
		return
	}
	if err := c.Err(); err != nil {
		if errors.Is(err, layer.ErrVerify) {
			m.failClaimedLayer(sl, err)
		}
		close(sl.prepared)
		return
	}
	t0 := time.Now()
	m.prepareReads(sl, src)
	slog.Debug("layer tar headers confirmed", "layer", sl.desc.Digest, "image", sl.image, "segments", time.Since(t0))
}

// waitReady waits until sl's file contents may be read: its claimed index
// confirmed, and what prepareReads does done, so that a read waiting for
// the confirmation does not fill a large file's range of the data file
// before its segment is declared.
func (sl *sharedLayer) waitReady(ctx context.Context) error {
	if sl.isReady() {
		return nil
	}
	if err := sl.l.Confirm.Wait(ctx); err != nil {
		if errors.Is(err, layer.ErrVerify) {
			// Failed, logged and counted before the reader's EIO, so that
			// whoever sees the one sees the others (prepareWhenConfirmed
			// may not have got to it yet).
			sl.claimContradicted(err)
		}
		return err // contradicted, closed, or the blob cannot be read yet
	}
	select {
	case <-sl.ready:
		return nil
	case <-sl.prepared: // done: ready, or closed before it was
		if sl.isReady() {
			return nil
		}
		return fmt.Errorf("layer %s closed", sl.desc.Digest)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// isReady reports whether sl's file ranges may be used now.
func (sl *sharedLayer) isReady() bool {
	select {
	case <-sl.ready:
		return true
	default:
		return false
	}
}

// startBackground starts what runs for sl until it closes: the fill of
// its blob, and, for a layer served before it verified, the check that
// fails it if it does not.
func (m *Manager) startBackground(ctx context.Context, sl *sharedLayer) {
	unverified := sl.trust.lazy()
	switch {
	case sl.l.Streamed && unverified:
		// The stream checks the blob and the DiffID at its end; the
		// index is complete once it ended.
		go func() {
			defer close(sl.filled)
			if _, err := sl.l.ReadDir(ctx, ""); err != nil && ctx.Err() == nil {
				m.failLayer(sl, err)
			}
		}()
	case sl.l.Streamed, !m.opt.backgroundFill && !unverified:
		close(sl.filled)
	default: // what is served unverified is filled and checked, always
		go m.fillWhenUsed(ctx, sl)
	}
}

// openBlob opens the blob of dl, refusing one whose size the manifest
// and the registry disagree on, or that the cache could never hold, before
// anything is allocated for it.
func (m *Manager) openBlob(ctx context.Context, dl described) (*remote.Blob, error) {
	desc := dl.desc
	size := int64(-1) // ask the registry
	if dl.opened {
		// Its pods are waiting: what the cache holds serves them whether
		// the registry answers or not, and only bytes it lacks need it.
		size = desc.Size
	}
	rb, err := m.reg.OpenBlob(ctx, dl.repo, desc.Digest, size)
	if err != nil {
		return nil, err
	}
	if rb.Size() != desc.Size {
		return nil, fmt.Errorf("%w: layer %s of %s: its manifest says %d bytes, the registry %d", layer.ErrCorrupt, desc.Digest, dl.image, desc.Size, rb.Size())
	}
	// Not corrupt, maybe, but never cacheable: containerd may download it.
	if c := m.store.Capacity(); desc.Size > c {
		return nil, fmt.Errorf("%w: layer %s of %s: %d bytes, more than the cache holds (%d)", ErrUnsupported, desc.Digest, dl.image, desc.Size, c)
	}
	return rb, nil
}

// fetchFunc is how the cache fetches the missing chunks of rb.
func fetchFunc(rb *remote.Blob) cache.FetchFunc {
	return func(ctx context.Context, p []byte, off int64) error {
		t0 := time.Now()
		_, err := rb.ReadAt(ctx, p, off)
		slog.Debug("fetched", "layer", rb.Digest(), "off", off, "len", len(p), "took", time.Since(t0), "err", err)
		if errors.Is(err, io.EOF) && off+int64(len(p)) >= rb.Size() {
			err = nil
		}
		return err
	}
}

// rangeReader is how the cache fetches several runs of rb in one request.
func rangeReader(rb *remote.Blob) cache.RangeReaderFunc {
	return func(ctx context.Context, off, n int64) (io.ReadCloser, error) {
		slog.Debug("fetching", "layer", rb.Digest(), "off", off, "len", n)
		return rb.OpenRange(ctx, off, n)
	}
}

// segment gives each large file of a contiguous layer a cache file of its
// own, so that it can be passed through once the blob is verified. A file
// that cannot get one (see cache.ErrSegment) is served through the daemon.
func (sl *sharedLayer) segment() {
	if sl.l.Ranges == nil {
		return
	}
	for _, f := range sl.l.Ranges.Files() {
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
	if sl.l.Ranges == nil || e.Size < passthroughMin || !sl.isReady() {
		return nil, false
	}
	r, ok := sl.l.Ranges.DataRange(e)
	if !ok {
		return nil, false
	}
	return sl.blob.FileOf(r.Off, r.Len)
}

// onRead marks the layer used (starting its background fill) and starts
// read-ahead for a sequential reader of a file whose bytes are a
// contiguous range of the blob.
func (m *Manager) onRead(sl *sharedLayer, e *layer.Entry, off, n int64) {
	sl.usedOnce.Do(func() { close(sl.used) })
	if sl.readers == nil || !sl.isReady() {
		return
	}
	file := func() (prefetch.Range, bool) {
		r, ok := sl.l.Ranges.DataRange(e)
		return prefetch.Range{Off: r.Off, Len: r.Len}, ok
	}
	if ahead, ok := sl.readers.Observe(e.Ino, off, n, file); ok {
		m.sched.ReadAhead(sl.blob, ahead)
	}
}

// closeLayer stops sl's background work and releases what it holds; the
// refmap calls it when the last reference goes. The cached bytes of a
// layer unmounted for good are evicted before anything else.
func (m *Manager) closeLayer(_ layerKey, sl *sharedLayer) {
	sl.cancel()
	<-sl.filled
	<-sl.prepared
	if sl.unwanted.Load() {
		// Its blob and, if it was streamed, its stream share the key;
		// the demotion holds once their last handles, below, are closed.
		m.store.Demote(sl.trust.key)
		slog.Debug("layer no longer wanted", "layer", sl.desc.Digest, "image", sl.image)
	}
	label := sl.desc.Digest.String()
	metrics.LayerSizeBytes.DeleteLabelValues(label)
	metrics.LayerFetchedBytes.DeleteLabelValues(label)
	metrics.LayerVerified.DeleteLabelValues(label)
	m.sched.Forget(sl.blob)
	if err := sl.l.Close(); err != nil {
		slog.Warn("closing layer", "layer", sl.desc.Digest, "err", err)
	}
	sl.blob.Close()
}

// cachedBytes is what the node cache holds for sl: the chunks of its blob
// present, and the bytes of its stream written.
func (sl *sharedLayer) cachedBytes() int64 {
	n := sl.blob.CachedBytes()
	if sl.stream != nil {
		n += sl.stream.Written()
	}
	return n
}

// streamStore adapts the cache's Streams to layer.StreamStore. Streams of
// unverified bytes are kept under a key of their source's (namespace).
// The stream a layer opens is kept in opened, for its usage.
type streamStore struct {
	s         *cache.Store
	namespace string
	opened    *atomic.Pointer[cache.Stream]
}

func (s streamStore) Stream(key, content digest.Digest) (layer.Stream, bool, error) {
	if s.namespace != "" {
		key = digest.FromString(s.namespace + "@" + key.String())
	}
	st, w, err := s.s.Stream(key, cache.WithStreamDigest(content))
	if err != nil {
		return nil, false, err
	}
	if s.opened != nil {
		s.opened.Store(st)
	}
	return st, w, nil
}
