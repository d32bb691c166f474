package cache

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/weightsnap/weightsnap/metrics"
)

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
	missed, err := b.pinRange(ctx, &h.a, off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	n, err := b.st.ReadAt(p, off)
	b.pin.RUnlock()
	if err != nil {
		return n, fmt.Errorf("cache: read blob %s at %d: %w", b.key, off, err)
	}
	countRead(n, missed)
	return n, eof
}

// ReadFile makes [off, off+n) present and checked, exactly as ReadAt
// would, and returns the file that holds those bytes and their offset in
// it, so that a caller can move them without copying (splice into FUSE).
// The bytes stay in place until release is called, which the caller must
// do once it has read them, before any other call on the Blob or its
// Store (Close waits for it); the file belongs to the Blob. A range past the end is clamped; off at or past
// the end is io.EOF. A range that crosses a segment's boundary is not in
// one file and is an error.
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
	missed, err := b.pinRange(ctx, &h.a, off, n)
	if err != nil {
		return nil, 0, nil, err
	}
	f, fileOff, ok := b.st.fileOf(off, n)
	if !ok {
		b.pin.RUnlock()
		return nil, 0, nil, fmt.Errorf("cache: blob %s: range %d+%d crosses a segment boundary", b.key, off, n)
	}
	countRead(int(n), missed)
	return f, fileOff, b.unpin, nil
}

// pinRange makes the chunks of [off, off+n) servable to a, fetching or
// checking those that are not, and returns with them pinned: until
// b.pin.RUnlock, they stay servable and their bytes stay where b.st maps
// them. missed reports whether a fetch was run or waited for.
func (b *blob) pinRange(ctx context.Context, a *access, off, n int64) (missed bool, err error) {
	lo, hi := int(off/b.chunk), int((off+n-1)/b.chunk)
	for {
		b.pin.RLock()
		if !b.filesClosed && a.servable.all(lo, hi) {
			return missed, nil
		}
		b.pin.RUnlock()
		waited, err := b.makeServable(ctx, a, lo, hi)
		if err != nil {
			return missed, err
		}
		missed = missed || waited
	}
}

// makeServable makes chunks [lo, hi] servable to a, unless one is dropped
// meanwhile: by verifying the whole content in strict mode, or for a
// handle WithReuseAfterVerify when one of them was stored by an earlier
// process; otherwise by fetching what is missing and checking what is
// stored.
func (b *blob) makeServable(ctx context.Context, a *access, lo, hi int) (waited bool, err error) {
	b.mu.Lock()
	whole := !b.complete && (b.strict || a.reuse && b.storedBeforeLocked(lo, hi))
	b.mu.Unlock()
	if whole {
		return true, b.verify(ctx, a)
	}
	return b.ensure(ctx, a, lo, hi, true)
}

// storedBeforeLocked reports whether one of chunks [lo, hi] is present but
// was not fetched in this process, nor vouched for by the table or the
// whole content since. Callers hold b.mu.
func (b *blob) storedBeforeLocked(lo, hi int) bool {
	for i := lo; i <= hi; i++ {
		if b.present.get(i) && !b.fresh.get(i) {
			return true
		}
	}
	return false
}

// readPinned reads p at off, whichever chunks it covers, with the pin
// held: for checks, whose bytes need not be servable yet.
func (b *blob) readPinned(p []byte, off int64) error {
	b.pin.RLock()
	defer b.pin.RUnlock()
	if b.filesClosed {
		return ErrClosed
	}
	_, err := b.st.ReadAt(p, off)
	return err
}

func countRead(n int, missed bool) {
	if missed {
		missBytes.Add(float64(n))
	} else {
		hitBytes.Add(float64(n))
	}
}

var (
	hitBytes  = metrics.CacheBytes.WithLabelValues("hit")
	missBytes = metrics.CacheBytes.WithLabelValues("miss")
)

// Present reports whether every chunk overlapping [off, off+n) is cached.
func (h *Blob) Present(off, n int64) bool {
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	return !ok || b.present.all(lo, hi)
}

// CachedBytes returns how many bytes of the content are cached.
func (h *Blob) CachedBytes() int64 { return h.b.cachedBytes() }

func (b *blob) cachedBytes() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cached
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
