package cache

import (
	"context"
	_ "crypto/sha256" // digest algorithms of keys
	_ "crypto/sha512"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/metrics"
)

// FetchFunc fills p with the source's bytes at off: all of p, never past
// the end of the content. It is called without any cache lock held.
type FetchFunc func(ctx context.Context, p []byte, off int64) error

var (
	hitBytes  = metrics.CacheBytes.WithLabelValues("hit")
	missBytes = metrics.CacheBytes.WithLabelValues("miss")
)

// testHookWait, when set by a test, is called when a reader starts waiting
// for a fetch another caller runs.
var testHookWait func()

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

	// gen is odd while chunks are being dropped and changes with every
	// drop, so a lock-free reader that raced with one can tell (seqlock).
	gen      atomic.Uint64
	verified bitmap // present and checked in this process: safe to serve
	present  bitmap // recorded on disk (or fetched in this process)
	cached   atomic.Int64
	complete atomic.Bool
	// strict is set once the content failed whole verification: from then
	// on nothing is served until all of it is fetched and verified.
	strict atomic.Bool

	// splice is held for reading while a range handed out by ReadFile is
	// being moved out of the data file; dropping a chunk takes it for
	// writing, so that a hole is never punched under bytes being served.
	splice sync.RWMutex

	mu       sync.Mutex // guards sums, inflight, vrun, closed and bitmap writes
	sums     []uint32
	inflight map[int]*flight
	vrun     *verifyRun
	closed   bool

	pendMu  sync.Mutex
	pending []byte // records awaiting flush, in the order of the state changes
	// recMu serialises flushes (so records reach the file in order) with
	// closing the files.
	recMu     sync.Mutex
	recClosed bool
}

// flight is one FetchFunc call covering chunks [first, last].
type flight struct {
	first, last int
	done        chan struct{}
	err         error // set before done is closed
}

// verifyRun is one hashing of the whole content.
type verifyRun struct {
	done chan struct{}
	err  error // set before done is closed; nil and not complete: inconclusive
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
	if b.cached.Load() == size && !b.complete.Load() {
		// Everything was fetched before a restart but never verified.
		b.kickVerify()
	}
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
	b.cached.Store(r.cached)
	b.complete.Store(r.complete)
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

// ReadAt reads len(p) bytes at off with io.ReaderAt semantics. Present
// chunks are read from disk; missing ones are fetched (one fetch however
// many readers wait for a chunk), stored and then served.
func (h *Blob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	b := h.b
	if off < 0 {
		return 0, fmt.Errorf("cache: blob %s: negative offset %d", b.key, off)
	}
	if off >= b.size {
		return 0, io.EOF
	}
	var eof error
	if rem := b.size - off; int64(len(p)) > rem {
		p, eof = p[:rem], io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	lo, hi := int(off/b.chunk), int((off+int64(len(p))-1)/b.chunk)
	missed := false
	for {
		if b.strict.Load() && !b.complete.Load() {
			if err := h.Verify(ctx); err != nil {
				return 0, err
			}
			missed = true
		}
		g := b.gen.Load()
		if g&1 == 0 && b.verified.all(lo, hi) {
			n, err := b.st.ReadAt(p, off)
			if b.gen.Load() == g {
				if err != nil {
					return n, fmt.Errorf("cache: read blob %s at %d: %w", b.key, off, err)
				}
				if missed {
					missBytes.Add(float64(n))
				} else {
					hitBytes.Add(float64(n))
				}
				return n, eof
			}
			// A drop raced with the read: the bytes may be wrong.
		}
		waited, err := b.ensure(ctx, h.fetch, lo, hi, true)
		if err != nil {
			return 0, err
		}
		missed = missed || waited
	}
}

// ReadFile makes [off, off+n) present and checked, exactly as ReadAt
// would, and returns the file that holds those bytes and their offset in
// it, so that a caller can move them without copying (splice into FUSE).
// The bytes stay in place until release is called, which the caller must
// do once it has read them; the file belongs to the Blob. A range past the
// end is clamped; off at or past the end is io.EOF. A range that crosses
// a segment's boundary is not in one file and is an error.
func (h *Blob) ReadFile(ctx context.Context, off, n int64) (f *os.File, fileOff int64, release func(), err error) {
	if h.closed.Load() {
		return nil, 0, nil, ErrClosed
	}
	b := h.b
	if off < 0 || n <= 0 {
		return nil, 0, nil, fmt.Errorf("cache: blob %s: bad range %d+%d", b.key, off, n)
	}
	if off >= b.size {
		return nil, 0, nil, io.EOF
	}
	n = min(n, b.size-off)
	lo, hi := int(off/b.chunk), int((off+n-1)/b.chunk)
	missed := false
	for {
		if b.strict.Load() && !b.complete.Load() {
			if err := h.Verify(ctx); err != nil {
				return nil, 0, nil, err
			}
			missed = true
		}
		b.splice.RLock()
		if b.verified.all(lo, hi) { // and stays so until RUnlock
			f, fileOff, ok := b.st.fileOf(off, n)
			if !ok {
				b.splice.RUnlock()
				return nil, 0, nil, fmt.Errorf("cache: blob %s: range %d+%d crosses a segment boundary", b.key, off, n)
			}
			if missed {
				missBytes.Add(float64(n))
			} else {
				hitBytes.Add(float64(n))
			}
			return f, fileOff, b.splice.RUnlock, nil
		}
		b.splice.RUnlock()
		waited, err := b.ensure(ctx, h.fetch, lo, hi, true)
		if err != nil {
			return nil, 0, nil, err
		}
		missed = missed || waited
	}
}

// Fetch makes [off, off+n) present without reading it out: read-ahead and
// background fill. Contiguous missing chunks are fetched together, up to
// WithMaxFetch per FetchFunc call; chunks another caller is fetching
// are waited for.
func (h *Blob) Fetch(ctx context.Context, off, n int64) error {
	return h.ensureRange(ctx, off, n, false)
}

// Check makes [off, off+n) present and checks every chunk of it against
// its checksum, as a read would, without reading it out: after a restart,
// chunks are trusted only once checked in this process.
func (h *Blob) Check(ctx context.Context, off, n int64) error {
	return h.ensureRange(ctx, off, n, true)
}

func (h *Blob) ensureRange(ctx context.Context, off, n int64, verify bool) error {
	if h.closed.Load() {
		return ErrClosed
	}
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	if !ok {
		return nil
	}
	_, err := b.ensure(ctx, h.fetch, lo, hi, verify)
	return err
}

// chunkRange returns the chunks overlapping [off, off+n) ∩ [0, size).
func (b *blob) chunkRange(off, n int64) (lo, hi int, ok bool) {
	off = max(off, 0)
	end := min(off+n, b.size)
	if n <= 0 || end <= off {
		return 0, 0, false
	}
	return int(off / b.chunk), int((end - 1) / b.chunk), true
}

// Present reports whether every chunk overlapping [off, off+n) is cached.
func (h *Blob) Present(off, n int64) bool {
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	return !ok || b.present.all(lo, hi)
}

// CachedBytes returns how many bytes of the content are cached.
func (h *Blob) CachedBytes() int64 { return h.b.cached.Load() }

// Complete reports whether the whole content is cached and was verified
// against the key.
func (h *Blob) Complete() bool { return h.b.complete.Load() }

// Invalidate drops the chunks overlapping [off, off+n), for a caller whose
// own verifier (an eStargz chunk digest) found them wrong; the next read
// fetches them again. A chunk being fetched is not affected. Only layers
// whose files are compressed chunks (eStargz) call it, never for a range
// handed out by FileOf.
func (h *Blob) Invalidate(off, n int64) {
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	if !ok {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := lo; i <= hi; i++ {
		b.dropLocked(i)
	}
}

// Verify fetches whatever is missing and waits until the whole content has
// been verified against the key. An error wrapping ErrDigestMismatch means
// the fetched content was wrong; it was discarded.
func (h *Blob) Verify(ctx context.Context) error {
	b := h.b
	for !b.complete.Load() {
		if h.closed.Load() {
			return ErrClosed
		}
		if err := h.Fetch(ctx, 0, b.size); err != nil {
			return err
		}
		r, err := b.kickVerify()
		if err != nil {
			return err
		}
		if r == nil {
			continue // complete, or a chunk was dropped meanwhile
		}
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if r.err != nil {
			return r.err
		}
	}
	// The run that completed the blob may still hold it (see verifyLoop).
	b.mu.Lock()
	r := b.vrun
	b.mu.Unlock()
	if r != nil {
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

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
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	err := b.flush()
	b.recMu.Lock()
	b.recClosed = true
	err = errors.Join(err, b.rec.Close(), b.st.close())
	b.recMu.Unlock()
	return err
}

// ensure makes chunks [lo, hi] present (and, with verify, checked) using
// fetch for what nobody is fetching yet. It starts at most one fetch at a
// time, so chunks it will get to later stay available to other callers
// (an on-demand reader is not stuck behind a long background Fetch).
// waited reports whether any fetch was run or waited for.
func (b *blob) ensure(ctx context.Context, fetch FetchFunc, lo, hi int, verify bool) (waited bool, err error) {
	for {
		progress := false
		var waits []*flight
		for c := lo; c <= hi; {
			var run *flight
			check := -1
			b.mu.Lock()
			if b.closed {
				b.mu.Unlock()
				return waited, ErrClosed
			}
			for ; c <= hi; c++ {
				if b.present.get(c) {
					if verify && !b.verified.get(c) {
						check = c
						c++
						break
					}
					continue
				}
				if fl := b.inflight[c]; fl != nil {
					if len(waits) == 0 || waits[len(waits)-1] != fl {
						waits = append(waits, fl)
					}
					continue
				}
				run = &flight{first: c, done: make(chan struct{})}
				for c <= hi && c-run.first < b.s.maxRun && !b.present.get(c) && b.inflight[c] == nil {
					b.inflight[c] = run
					c++
				}
				run.last = c - 1
				break
			}
			b.mu.Unlock()
			if check >= 0 {
				progress = true
				if err := b.verifyChunk(check); err != nil {
					return waited, err
				}
			}
			if run != nil {
				progress, waited = true, true
				if err := b.run(ctx, fetch, run); err != nil {
					return waited, err
				}
			}
		}
		for _, fl := range waits {
			progress, waited = true, true
			if testHookWait != nil {
				testHookWait()
			}
			select {
			case <-fl.done:
			case <-ctx.Done():
				return waited, ctx.Err()
			}
			if fl.err != nil {
				if isContextErr(fl.err) && ctx.Err() == nil {
					continue // the fetcher's context ended, not ours: next pass retries
				}
				return waited, fl.err
			}
		}
		if !progress {
			return waited, nil
		}
	}
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// run performs one fetch and publishes its chunks.
func (b *blob) run(ctx context.Context, fetch FetchFunc, fl *flight) error {
	off := int64(fl.first) * b.chunk
	end := min(b.size, int64(fl.last+1)*b.chunk)
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := (*bufp)[:end-off]
	err := fetch(ctx, buf, off)
	if err != nil {
		err = fmt.Errorf("cache: fetch %s [%d, %d): %w", b.key, off, end, err)
	} else if _, werr := b.st.WriteAt(buf, off); werr != nil {
		err = fmt.Errorf("cache: store %s [%d, %d): %w", b.key, off, end, werr)
	}
	var recs []byte
	if err == nil {
		recs = make([]byte, 0, recordSize*(fl.last-fl.first+1))
		for i := fl.first; i <= fl.last; i++ {
			s := int64(i)*b.chunk - off
			sum := checksum(buf[s : s+b.chunkLen(i)])
			b.sums[i] = sum // not yet visible: the chunk is neither present nor read by others
			recs = appendRecord(recs, uint64(i), sum)
		}
	}
	b.mu.Lock()
	for i := fl.first; i <= fl.last; i++ {
		delete(b.inflight, i)
	}
	if err == nil && b.closed {
		err = ErrClosed
	}
	if err == nil {
		for i := fl.first; i <= fl.last; i++ {
			b.present.set(i)
			b.verified.set(i)
		}
		n := end - off
		b.cached.Add(n)
		b.e.bytes.Add(n)
		b.s.usage.Add(n)
		b.queue(recs)
	}
	fl.err = err
	close(fl.done)
	full := b.cached.Load() == b.size
	b.mu.Unlock()
	if err != nil {
		return err
	}
	if full {
		b.kickVerify()
	}
	b.s.evict()
	return nil
}

// queue schedules records for the flusher. Callers hold b.mu, so records
// are queued in the order of the state changes they describe.
func (b *blob) queue(recs []byte) {
	b.pendMu.Lock()
	b.pending = append(b.pending, recs...)
	b.pendMu.Unlock()
	b.s.markDirty(b)
}

// flush makes the data written so far durable and then appends the
// records describing it.
func (b *blob) flush() error {
	b.recMu.Lock()
	defer b.recMu.Unlock()
	b.pendMu.Lock()
	p := b.pending
	b.pending = nil
	b.pendMu.Unlock()
	if len(p) == 0 || b.recClosed {
		return nil
	}
	if err := b.st.sync(); err != nil {
		return fmt.Errorf("cache: sync %s: %w", b.key, err)
	}
	if _, err := b.rec.Write(p); err != nil {
		return fmt.Errorf("cache: records of %s: %w", b.key, err)
	}
	return nil
}

// dropLocked forgets chunk i, on disk too. Callers hold b.mu.
func (b *blob) dropLocked(i int) {
	if b.closed || !b.present.get(i) {
		return
	}
	b.splice.Lock()
	b.gen.Add(1)
	b.present.clear(i)
	b.verified.clear(i)
	b.punch(i)
	b.gen.Add(1)
	b.splice.Unlock()
	n := b.chunkLen(i)
	b.cached.Add(-n)
	b.e.bytes.Add(-n)
	b.s.usage.Add(-n)
	b.complete.Store(false)
	b.queue(appendRecord(nil, recDrop|uint64(i), 0))
}

// verifyChunk checks a chunk recorded by an earlier process against its
// checksum, and drops it if it does not match.
func (b *blob) verifyChunk(i int) error {
	b.mu.Lock()
	if !b.present.get(i) || b.verified.get(i) {
		b.mu.Unlock()
		return nil
	}
	want, g := b.sums[i], b.gen.Load()
	b.mu.Unlock()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := (*bufp)[:b.chunkLen(i)]
	if _, err := b.st.ReadAt(buf, int64(i)*b.chunk); err != nil {
		return fmt.Errorf("cache: read blob %s chunk %d: %w", b.key, i, err)
	}
	got := checksum(buf)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.gen.Load() != g {
		return nil // dropped meanwhile; the caller looks again
	}
	if got == want {
		b.verified.set(i)
		return nil
	}
	slog.Warn("cache: corrupt chunk dropped", "key", b.key, "chunk", i, "off", int64(i)*b.chunk)
	b.dropLocked(i)
	return nil
}

// kickVerify starts hashing the whole content in the background if it is
// all present and not verified yet, and returns the run (nil if there is
// nothing to verify).
func (b *blob) kickVerify() (*verifyRun, error) {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.vrun != nil {
		return b.vrun, nil
	}
	if b.closed || s.closed {
		return nil, ErrClosed
	}
	if b.complete.Load() || b.cached.Load() != b.size {
		return nil, nil
	}
	r := &verifyRun{done: make(chan struct{})}
	b.vrun = r
	b.refs++ // keeps the files open while hashing
	s.wg.Add(1)
	go b.verifyLoop(r)
	return r, nil
}

func (b *blob) verifyLoop(r *verifyRun) {
	defer b.s.wg.Done()
	markComplete := false
	b.mu.Lock()
	for {
		g := b.gen.Load()
		if b.cached.Load() != b.size {
			// Dropped since the run was started: inconclusive, and the
			// hash below would read chunks being refetched. Whatever
			// makes the blob whole again starts another run.
			break
		}
		b.mu.Unlock()
		sum, err := b.hash(b.s.ctx)
		b.mu.Lock()
		if err != nil {
			r.err = err
			break
		}
		if b.gen.Load() != g {
			if b.cached.Load() == b.size {
				continue // a chunk was refetched meanwhile: hash again
			}
			break // inconclusive; the refetch will start another run
		}
		if sum == b.key {
			b.complete.Store(true)
			for i := 0; i < b.n; i++ {
				b.verified.set(i)
			}
			b.queue(appendRecord(nil, recComplete, 0))
			markComplete = true
			break
		}
		// Every chunk matched its checksum, so the fetched content itself
		// is wrong, and nothing tells which chunk: discard them all and,
		// from now on, serve only verified content.
		b.strict.Store(true)
		for i := 0; i < b.n; i++ {
			b.dropLocked(i)
		}
		r.err = fmt.Errorf("%w: blob %s hashes to %s", ErrDigestMismatch, b.key, sum)
		slog.Error("cache: blob content does not match its digest; discarded", "key", b.key, "got", sum)
		break
	}
	// vrun stays set until the run has let go of the blob: a Verify that
	// finds the blob complete meanwhile still waits for this run, so that
	// once Verify returns the blob's references are the callers' own.
	b.mu.Unlock()
	if markComplete {
		// Durably, so that a restart does not hash it again.
		if err := b.flush(); err == nil {
			b.recMu.Lock()
			if !b.recClosed {
				b.rec.Sync()
			}
			b.recMu.Unlock()
		}
	}
	b.s.releaseBlob(b)
	b.mu.Lock()
	b.vrun = nil
	b.mu.Unlock()
	close(r.done)
	if r.err == nil && !markComplete && b.cached.Load() == b.size {
		// Inconclusive, and the refetch that made the blob whole again
		// may have found this run still going instead of starting one.
		b.kickVerify()
	}
}

// hash computes the digest of the data file, with the key's algorithm.
// Chunks not yet checked in this process are checked against their
// checksums on the way: a corrupt one is dropped (which ends the run as
// inconclusive, since gen changes) rather than failing the whole content.
func (b *blob) hash(ctx context.Context) (digest.Digest, error) {
	alg := b.key.Algorithm()
	if !alg.Available() {
		return "", fmt.Errorf("cache: blob %s: digest algorithm unavailable", b.key)
	}
	h := alg.Hash()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := *bufp
	for off := int64(0); off < b.size; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := min(int64(len(buf)), b.size-off)
		g := b.gen.Load()
		if _, err := b.st.ReadAt(buf[:n], off); err != nil {
			return "", fmt.Errorf("cache: hash blob %s: %w", b.key, err)
		}
		for i := int(off / b.chunk); i <= int((off+n-1)/b.chunk); i++ {
			if b.verified.get(i) {
				continue
			}
			s := int64(i)*b.chunk - off
			got := checksum(buf[s : s+b.chunkLen(i)])
			b.mu.Lock()
			// A drop or a new segment raced with the read: the bytes
			// may not be the chunk's, and the caller hashes again.
			if g&1 == 0 && b.gen.Load() == g && b.present.get(i) && !b.verified.get(i) {
				if got == b.sums[i] {
					b.verified.set(i)
				} else {
					slog.Warn("cache: corrupt chunk dropped", "key", b.key, "chunk", i, "off", int64(i)*b.chunk)
					b.dropLocked(i)
				}
			}
			b.mu.Unlock()
		}
		h.Write(buf[:n])
		off += n
	}
	return digest.NewDigest(alg, h), nil
}
