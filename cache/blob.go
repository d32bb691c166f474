package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
)

// The cache's consistency scheme.
//
// Locks, in the order in which they may be taken:
//
//	blob.recMu → blob.mu → blob.pin
//	blob.mu → Store.mu, Store.dirtyMu
//	Stream.mu → stream.mu
//
// Store.mu, Store.dirtyMu, Store.freeMu and stream.mu take no other lock. Whoever holds
// blob.pin for reading (a reader, or the caller of ReadFile until it
// releases the range) takes no lock of that blob, closes neither its last
// handle nor the Store, until it lets go of the pin.
//
// Store.mu guards the index of keys: Store.entries and every entry's
// fields (bytes on disk, LRU time, references, the open blob or stream,
// the busy state), the LRU clock and closed. It is never held across file
// I/O: a key's files are opened, closed or removed by one goroutine at a
// time, which marks the entry busy under Store.mu and does the work
// without it; others wait for the busy state to end (entry.go). So a key
// is opened once however many callers want it, and never while it closes.
//
// blob.mu guards the state of a blob: checksums, the table, fetches in
// flight, the verification run, the byte count, complete, strict, drops,
// closed, whether a complete record is due and whether appending records
// failed. The bitmaps and the segment list change only under it, and the
// segments' read-only handles are opened under it; records are appended
// under it, with the change they describe, so they land in its order. A
// read of servable bytes does not take it. What file I/O it is held
// across is bounded: a hole punched, a segment made (at most
// maxSegmentCopy chunks copied), a segment opened, a record appended (a
// write into the page cache, never a sync).
//
// blob.pin keeps bytes where the storage maps them and their files open.
// Both read paths use it alike: ReadAt holds it for reading while it sees
// that its chunks are servable and reads them, ReadFile from that check
// until its caller releases the range. Whatever moves or destroys bytes
// that may be served holds it for writing: dropping a chunk (the hole
// punched), moving a range into a segment, closing the files (shutdown,
// which sets filesClosed, so that no reader pins them afterwards).
// Checks of stored chunks (verifyChunk, checkTableChunk, hash) read under
// it too, then compare blob.drops under blob.mu: if a chunk was dropped,
// and perhaps fetched again, while they read, what they read counts for
// nothing.
//
// blob.recMu orders the syncs of a blob's files and their closing: a
// flush (the flusher's, Store.Flush's, the one after verification, the
// one of shutdown) syncs the data and then, under blob.mu, appends the
// complete record if one is due and no chunk was dropped since before the
// sync (see syncAndComplete), all under recMu. So whoever's flush returns
// has its data durable, even if another flush swapped the dirty flags,
// and the files stay open for it. Nothing is appended once a blob is
// closed, so a flush after shutdown touches no file.
//
// Store.freeMu guards the estimate of the file system's free space
// (bound.go); the statfs that refreshes it runs without it.
//
// Store.dirtyMu guards the set of blobs with a complete record due, for
// the flusher; stream.mu a stream's writing state (see stream.go);
// Stream.mu a handle's read-only file.
//
// What is read without a lock, each for a reader that must not wait:
//
//   - blob.present and the servable bitmaps are atomic: Present is asked
//     before every FUSE read, a handle's servable bitmap tested on every
//     read (see below). Bits are set under blob.mu; the servable ones are
//     cleared only with the pin held for writing too, so a pinned reader's
//     chunks stay servable.
//   - storage.segs points to a list that is replaced, never changed: a
//     fetch writes its chunks without a lock, and no segment is made over
//     chunks in flight.
//   - the storage's dirty flags are set by those writes and swapped by a
//     flush, so it syncs every file written before it began, which covers
//     the chunks present then.
//   - Store.usage grows and shrinks with fetches, drops and stream writes,
//     which do not take Store.mu; eviction reads it (and the free space
//     estimate) before taking Store.mu.
//   - stream.written, size and failure let stream readers go without
//     stream.mu.
//   - Blob.closed and Stream.closed make Close idempotent and later calls
//     fail.
//
// What may be served, and to whom. A handle tests one bitmap of its blob,
// chosen when it is opened (access.servable), so that a hit costs the same
// whatever it trusts:
//
//   - trusted, for handles WithTable: the chunk's table chunk was checked
//     against the table in this process, before it was stored if this
//     process fetched it, or read back from disk if not (table.go).
//   - fresh, for handles WithReuseAfterVerify: the chunk was fetched by
//     this process, or is trusted.
//   - verified, for the others: the chunk was fetched, or checked against
//     its checksum, by this process, or is fresh.
//
// So trusted ⊆ fresh ⊆ verified ⊆ present, and a chunk the table vouched
// for is servable to every handle, whichever fetched it. Once the whole
// content hashed to its digest in this process, every chunk is in all
// three; if it was verified by an earlier process (complete on open), a
// chunk checked against its checksum is fresh too. In strict mode (the
// whole content failed) no check of a chunk makes it servable: only the
// whole content's. A blob has at most one table while it is open, the one
// of every handle that has one; and one content digest.

// FetchFunc fills p with the source's bytes at off: all of p, never past
// the end of the content. It is called without any cache lock held.
type FetchFunc func(ctx context.Context, p []byte, off int64) error

// RangeReaderFunc opens a reader of the source's n bytes at off (never past
// the end of the content); see WithRangeReader.
type RangeReaderFunc func(ctx context.Context, off, n int64) (io.ReadCloser, error)

// Blob is one handle on cached random-access content. Handles of the same
// key share one in-memory state and one data file, so bytes are fetched
// once; each handle carries the FetchFunc of whoever opened it, and the
// options it was opened with.
type Blob struct {
	b      *blob
	a      access
	closed atomic.Bool
}

// access is how one handle fetches, and which chunks it may be served.
type access struct {
	fetch FetchFunc
	open  RangeReaderFunc // nil: every fetch is one FetchFunc call
	// table is the blob's table if the handle was opened with one: it
	// fetches whole table chunks and checks them before storing them.
	table *chunks.Table
	reuse bool // WithReuseAfterVerify
	// servable is the blob's bitmap of the chunks this handle may be
	// served: trusted with a table, fresh with reuse, else verified.
	servable bitmap
}

// blob is the shared state of one key.
type blob struct {
	s     *Store
	e     *entry
	key   digest.Digest
	want  digest.Digest // what the whole content must hash to
	size  int64
	chunk int64
	n     int
	st    storage // the data file and the segments
	rec   *os.File

	present bitmap // recorded on disk (or fetched in this process)
	// The chunks each kind of handle may be served; see the consistency
	// scheme above. trusted ⊆ fresh ⊆ verified ⊆ present.
	verified bitmap
	fresh    bitmap
	trusted  bitmap

	pin         sync.RWMutex
	unpin       func() // pin.RUnlock, made once: ReadFile's release
	filesClosed bool   // guarded by pin

	mu       sync.Mutex // guards the fields below
	sums     []uint32
	table    *chunks.Table // of the handles that have one; set once
	inflight map[int]*flight
	vrun     *verifyRun
	cached   int64
	complete bool
	// strict is set once the content failed whole verification: from then
	// on nothing is served until all of it is fetched and verified.
	strict bool
	// drops counts dropped chunks, so that a check that read bytes outside
	// mu can tell whether one was dropped (and perhaps refetched) meanwhile.
	drops  uint64
	closed bool
	// completeDue: the blob is complete and its complete record not
	// appended yet; flush appends it once the data is durable.
	completeDue bool
	// recFailed: an append to the records file failed, and none is made
	// any more (see queue).
	recFailed bool

	recMu sync.Mutex
}

// Blob opens the cached content named key, a digest, of the given size.
// Missing chunks are fetched with fetch on demand. Unless opts say
// otherwise, the whole content must hash to key, and the handle serves
// bytes before the whole content is verified: checked against a checksum
// stored with them (which catches a crash or bit rot, not a lying
// source). Close the handle when done: only then can its data be evicted.
func (s *Store) Blob(key digest.Digest, size int64, fetch FetchFunc, opts ...BlobOption) (*Blob, error) {
	if err := key.Validate(); err != nil {
		return nil, fmt.Errorf("cache: blob key: %w", err)
	}
	if size < 0 || fetch == nil {
		return nil, fmt.Errorf("cache: blob %s: invalid size %d or nil fetch", key, size)
	}
	o, err := s.blobOptions(key, size, opts)
	if err != nil {
		return nil, err
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
		h, err := b.handle(fetch, o)
		if err != nil {
			s.releaseBlob(b)
			return nil, err
		}
		return h, nil
	}
	if e == nil {
		e = &entry{entryKey: k}
		s.entries[k] = e
	}
	s.beginBusyLocked(e)
	s.mu.Unlock()
	b, err := s.openBlob(e, size, o.want)
	if err != nil {
		return nil, err
	}
	h, err := b.handle(fetch, o)
	if err != nil {
		s.releaseBlob(b)
		return nil, err
	}
	// Everything may have been fetched before a restart but never verified.
	b.kickVerify()
	s.evict()
	return h, nil
}

// blobOptions applies opts to the defaults of a blob of key and size, and
// refuses what cannot be used.
func (s *Store) blobOptions(key digest.Digest, size int64, opts []BlobOption) (blobOptions, error) {
	o := blobOptions{want: key}
	for _, opt := range opts {
		opt(&o)
	}
	if err := validDigest(o.want); err != nil {
		return o, fmt.Errorf("cache: blob %s: content digest: %w", key, err)
	}
	if t := o.table; t != nil {
		if err := s.fits(t, size); err != nil {
			return o, fmt.Errorf("%w: blob %s: %w", ErrTable, key, err)
		}
	}
	return o, nil
}

// handle makes a handle on b, which the caller holds a reference of, for
// a caller with fetch and o.
func (b *blob) handle(fetch FetchFunc, o blobOptions) (*Blob, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	if o.want != b.want {
		return nil, fmt.Errorf("%w: %s is open to hash to %s, asked %s", ErrDigestConflict, b.key, b.want, o.want)
	}
	a := access{fetch: fetch, open: o.open, servable: b.verified}
	switch {
	case o.table != nil:
		if b.table == nil {
			b.table = o.table
		} else if err := conflict(b.table, o.table); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrTableConflict, b.key, err)
		}
		a.table, a.servable = b.table, b.trusted
	case o.reuse:
		a.reuse, a.servable = true, b.fresh
	}
	return &Blob{b: b, a: a}, nil
}

// openBlob loads the blob of e, which the caller made busy, and makes it
// e's open blob.
func (s *Store) openBlob(e *entry, size int64, want digest.Digest) (*blob, error) {
	defer s.wg.Done()
	b, err := s.loadBlob(e, size, want)
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

// punch frees the disk space of chunk i. Callers hold b.mu, with b open,
// and the pin for writing (or own b, while loading it).
func (b *blob) punch(i int) { b.punchRun(i, i+1) }

// punchRun frees the space of chunks [lo, hi).
func (b *blob) punchRun(lo, hi int) {
	b.st.punch(int64(lo)*b.chunk, min(b.size, int64(hi)*b.chunk))
}

// Size returns the size of the content.
func (h *Blob) Size() int64 { return h.b.size }

// Complete reports whether the whole content is cached and was verified
// against its digest (the key, or WithContentDigest's).
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

// shutdown makes the data durable, appends the complete record if it is
// due, and closes the files.
func (b *blob) shutdown() error {
	b.recMu.Lock()
	defer b.recMu.Unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	// Nothing is appended by others once closed, and no chunk dropped, so
	// a later flush leaves the closed files alone.
	b.closed = true
	b.mu.Unlock()
	err := b.syncAndComplete()
	// Pinned readers, those of ranges handed out by ReadFile included,
	// finish before the files are closed under them.
	b.pin.Lock()
	b.filesClosed = true
	err = errors.Join(err, b.rec.Close(), b.st.close())
	b.pin.Unlock()
	return err
}
