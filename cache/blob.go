package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	digest "github.com/opencontainers/go-digest"
)

// FetchFunc fills p with the source's bytes at off: all of p, never past
// the end of the content. It is called without any cache lock held.
type FetchFunc func(ctx context.Context, p []byte, off int64) error

// Blob is one handle on cached random-access content. Handles of the same
// key share one in-memory state and one data file, so bytes are fetched
// once; each handle carries the FetchFunc of whoever opened it.
type Blob struct {
	b      *blob
	fetch  FetchFunc
	closed atomic.Bool
}

// blob is the shared state of one key.
type blob struct {
	s     *Store
	e     *entry
	key   digest.Digest
	size  int64
	chunk int64
	n     int
	st    storage // the data file and the segments
	rec   *os.File
	refs  int // guarded by s.mu

	verified bitmap // may be served (see pin)
	present  bitmap // recorded on disk (or fetched in this process)

	// pin is held for reading while bytes of verified chunks are read or
	// handed out by ReadFile, and for writing to drop a chunk or move a
	// range into a segment, so that a reader never sees bytes change or
	// move under it.
	pin   sync.RWMutex
	unpin func() // pin.RUnlock, made once: ReadFile's release

	mu       sync.Mutex // guards the fields below and bitmap writes
	sums     []uint32
	inflight map[int]*flight
	vrun     *verifyRun
	cached   int64
	complete bool
	// strict is set once the content failed whole verification: from then
	// on nothing is served until all of it is fetched and verified.
	strict bool
	// drops counts dropped chunks, so that a check that read bytes outside
	// mu can tell whether one was dropped (and perhaps refetched) meanwhile.
	drops   uint64
	closed  bool
	pending []byte // records awaiting flush, in the order of the state changes
	syncRec bool   // pending holds a complete record: sync the records file too

	// recMu serialises appends to rec, so that records reach it in order,
	// with closing the files.
	recMu sync.Mutex
}

// Blob opens the cached content named key, a digest of the whole content,
// of the given size. Missing chunks are fetched with fetch on demand. Close
// the handle when done: only then can its data be evicted.
func (s *Store) Blob(key digest.Digest, size int64, fetch FetchFunc) (*Blob, error) {
	if err := key.Validate(); err != nil {
		return nil, fmt.Errorf("cache: blob key: %w", err)
	}
	if size < 0 || fetch == nil {
		return nil, fmt.Errorf("cache: blob %s: invalid size %d or nil fetch", key, size)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	k := entryKey{kindBlob, key}
	e := s.entries[k]
	if e != nil && e.b != nil {
		b := e.b
		if b.size != size {
			s.mu.Unlock()
			return nil, fmt.Errorf("%w: %s is open with size %d, asked %d", ErrSizeMismatch, key, b.size, size)
		}
		b.refs++
		s.touchLocked(e)
		s.mu.Unlock()
		return &Blob{b: b, fetch: fetch}, nil
	}
	if e == nil {
		e = &entry{entryKey: k}
		s.entries[k] = e
	}
	b, err := s.loadBlob(e, size)
	if err != nil {
		if e.bytes.Load() == 0 {
			delete(s.entries, k)
		}
		s.mu.Unlock()
		return nil, err
	}
	e.b = b
	b.refs = 1
	s.touchLocked(e)
	s.mu.Unlock()
	// Everything may have been fetched before a restart but never verified.
	b.kickVerify()
	s.evict()
	return &Blob{b: b, fetch: fetch}, nil
}

// loadBlob opens the files of e, trusting only what the records say.
func (s *Store) loadBlob(e *entry, size int64) (*blob, error) {
	base := s.blobPath(e.key)
	if err := os.MkdirAll(filepath.Dir(base), 0o700); err != nil {
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	data, err := os.OpenFile(base+".data", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	rec, err := os.OpenFile(base+".rec", os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		data.Close()
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	segs, err := loadSegments(base, size)
	if err != nil {
		data.Close()
		rec.Close()
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	b := &blob{
		s: s, e: e, key: e.key, size: size, chunk: s.chunkSize,
		n: chunkCount(size, s.chunkSize), rec: rec,
		inflight: make(map[int]*flight),
	}
	b.unpin = b.pin.RUnlock
	b.st.data, b.st.segDir = data, segmentDir(base)
	b.st.segs.Store(&segs)
	b.present, b.verified, b.sums = newBitmap(b.n), newBitmap(b.n), make([]uint32, b.n)
	fail := func(err error) (*blob, error) {
		b.st.close()
		rec.Close()
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	raw, err := io.ReadAll(rec)
	if err != nil {
		return fail(err)
	}
	r, ok := replay(raw)
	if !ok || r.chunkSize != b.chunk || r.size != size {
		// New, foreign or damaged: start over.
		if err := rec.Truncate(0); err != nil {
			return fail(err)
		}
		if _, err := rec.Write(encodeHeader(b.chunk, size)); err != nil {
			return fail(err)
		}
		if err := data.Truncate(0); err != nil {
			return fail(err)
		}
		r = replayed{present: make([]bool, b.n), sums: make([]uint32, b.n)}
	} else if r.valid < int64(len(raw)) {
		if err := rec.Truncate(r.valid); err != nil {
			return fail(err)
		}
	}
	if err := data.Truncate(size); err != nil {
		return fail(err)
	}
	// A crash between making a segment and punching its range out of
	// the data file leaves stale bytes there.
	for _, g := range segs {
		punchFile(data, g.off, g.end-g.off)
	}
	// Bytes of chunks without a record are garbage from a crash or a
	// drop: give the space back, one hole per run of such chunks.
	hole := -1
	for i, p := range r.present {
		if p {
			b.present.set(i)
			b.sums[i] = r.sums[i]
			if hole >= 0 {
				b.punchRun(hole, i)
				hole = -1
			}
		} else if hole < 0 {
			hole = i
		}
	}
	if hole >= 0 {
		b.punchRun(hole, b.n)
	}
	b.cached, b.complete = r.cached, r.complete
	s.usage.Add(r.cached - e.bytes.Load())
	e.bytes.Store(r.cached)
	return b, nil
}

func (b *blob) chunkLen(i int) int64 { return chunkLen(int64(i), b.chunk, b.size) }

// punch frees the disk space of chunk i. Callers hold b.mu (or own b
// exclusively) with b open, so the fd cannot be closed and reused meanwhile.
func (b *blob) punch(i int) { b.punchRun(i, i+1) }

// punchRun frees the space of chunks [lo, hi).
func (b *blob) punchRun(lo, hi int) {
	b.st.punch(int64(lo)*b.chunk, min(b.size, int64(hi)*b.chunk))
}

// Size returns the size of the content.
func (h *Blob) Size() int64 { return h.b.size }

// Complete reports whether the whole content is cached and was verified
// against the key.
func (h *Blob) Complete() bool { return h.b.isComplete() }

// Close releases the handle.
func (h *Blob) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	h.b.s.releaseBlob(h.b)
	return nil
}

// releaseBlob drops a reference; the last one closes the files, so the
// key becomes evictable.
func (s *Store) releaseBlob(b *blob) {
	s.mu.Lock()
	b.refs--
	if b.refs > 0 {
		s.mu.Unlock()
		return
	}
	e := b.e
	if e.b == b {
		e.b = nil
		s.touchLocked(e)
	}
	// Under s.mu so that a new Blob(key) cannot open the files before
	// this state is flushed.
	if err := b.shutdown(); err != nil {
		slog.Warn("cache: closing blob", "key", b.key, "err", err)
	}
	if e.b == nil && e.bytes.Load() == 0 {
		// Nothing cached: do not leave empty files and an entry behind.
		s.removeLocked(e)
	} else {
		s.stampLocked(s.blobPath(b.key) + ".rec")
	}
	s.mu.Unlock()
	s.evict()
}

// shutdown persists pending records and closes the files.
func (b *blob) shutdown() error {
	b.recMu.Lock()
	defer b.recMu.Unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	// Nothing is queued once closed, so a later flush finds nothing to
	// write and leaves the closed files alone.
	b.closed = true
	p, syncRec := b.takePendingLocked()
	b.mu.Unlock()
	err := b.writeRecords(p, syncRec)
	return errors.Join(err, b.rec.Close(), b.st.close())
}
