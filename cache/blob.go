package cache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
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

	verified bitmap // may be served (see pin)
	present  bitmap // recorded on disk (or fetched in this process)

	// pin is held for reading while bytes of verified chunks are read or
	// handed out by ReadFile, and for writing to drop a chunk or move a
	// range into a segment, so that a reader never sees bytes change or
	// move under it.
	pin         sync.RWMutex
	unpin       func() // pin.RUnlock, made once: ReadFile's release
	filesClosed bool   // guarded by pin: set, under it held for writing, by shutdown

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
	k := entryKey{kindBlob, key}
	s.mu.Lock()
	e := s.entries[k]
	for s.waitBusyLocked(e) {
		e = s.entries[k]
	}
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if e != nil && e.b != nil {
		b := e.b
		if b.size != size {
			s.mu.Unlock()
			return nil, fmt.Errorf("%w: %s is open with size %d, asked %d", ErrSizeMismatch, key, b.size, size)
		}
		e.refs++
		s.touchLocked(e)
		s.mu.Unlock()
		return &Blob{b: b, fetch: fetch}, nil
	}
	if e == nil {
		e = &entry{entryKey: k}
		s.entries[k] = e
	}
	s.beginBusyLocked(e)
	s.mu.Unlock()
	b, err := s.openBlob(e, size)
	if err != nil {
		return nil, err
	}
	// Everything may have been fetched before a restart but never verified.
	b.kickVerify()
	s.evict()
	return &Blob{b: b, fetch: fetch}, nil
}

// openBlob loads the blob of e, which the caller made busy, and makes it
// e's open blob.
func (s *Store) openBlob(e *entry, size int64) (*blob, error) {
	defer s.wg.Done()
	b, err := s.loadBlob(e, size)
	s.mu.Lock()
	lost := err == nil && s.closed // and Close has not seen b: shut it here
	if err == nil && !lost {
		s.usage.Add(b.cached - e.bytes)
		e.b, e.refs = b, 1
		s.touchLocked(e)
	} else if e.bytes == 0 {
		delete(s.entries, e.entryKey)
	}
	s.endBusyLocked(e)
	s.mu.Unlock()
	if lost {
		b.shutdown()
		return nil, ErrClosed
	}
	return b, err
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
	e := b.e
	s.mu.Lock()
	e.refs--
	if e.refs > 0 || s.closed {
		// Once closed, the store's Close shuts the blob down, and its
		// directory may already be another process's.
		s.mu.Unlock()
		return
	}
	e.b = nil
	s.beginBusyLocked(e)
	s.mu.Unlock()
	if err := b.shutdown(); err != nil {
		slog.Warn("cache: closing blob", "key", b.key, "err", err)
	}
	s.settle(e, b.cachedBytes(), s.blobPath(b.key)+".rec")
}

// hold takes a reference for background work on b, which keeps its files
// open and which Close waits for; false if b is closing or the store is
// closed.
func (s *Store) hold(b *blob) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || b.e.b != b {
		return false
	}
	b.e.refs++
	s.wg.Add(1)
	return true
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
	// Pinned readers, those of ranges handed out by ReadFile included,
	// finish before the files are closed under them.
	b.pin.Lock()
	b.filesClosed = true
	err = errors.Join(err, b.rec.Close(), b.st.close())
	b.pin.Unlock()
	return err
}
