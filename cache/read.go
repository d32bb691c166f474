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
func (h *Blob) CachedBytes() int64 { return h.b.cached.Load() }

// chunkRange returns the chunks overlapping [off, off+n) ∩ [0, size).
func (b *blob) chunkRange(off, n int64) (lo, hi int, ok bool) {
	off = max(off, 0)
	end := min(off+n, b.size)
	if n <= 0 || end <= off {
		return 0, 0, false
	}
	return int(off / b.chunk), int((end - 1) / b.chunk), true
}
