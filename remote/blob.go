package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"
)

// Blob is one blob of a repository, read by HTTP Range GETs. It is safe for
// concurrent use. Bytes are not verified against the digest here: a range
// cannot be, and the caller that assembles the whole blob can.
type Blob struct {
	src    *source
	digest digest.Digest
	size   int64
}

// OpenBlob returns the blob dgst of repo ("registry/path/name"), for callers
// that know both, such as the snapshotter from its labels. With size < 0 the
// size is asked of the registry (HEAD), or taken from the HEAD a Resolve
// with WithLayerHeads started for the blob (heads.go); otherwise no request
// is made until the first read.
func (c *Client) OpenBlob(ctx context.Context, repo string, dgst digest.Digest, size int64) (*Blob, error) {
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("blob digest %q: %w", dgst, err)
	}
	r, err := name.NewRepository(repo)
	if err != nil {
		return nil, fmt.Errorf("repository %q: %w", repo, err)
	}
	src, err := c.source(r)
	if err != nil {
		return nil, err
	}
	b := &Blob{src: src, digest: dgst, size: size}
	if size < 0 {
		n, ok, err := c.heads.take(ctx, r.Name(), dgst)
		if err != nil {
			return nil, err
		}
		if ok {
			b.size = n
			return b, nil
		}
		if b.size, err = b.head(ctx); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// Digest is the blob's digest.
func (b *Blob) Digest() digest.Digest { return b.digest }

// Size is the blob's size in bytes.
func (b *Blob) Size() int64 { return b.size }

// RangeIgnored reports whether a host serving this blob was seen ignoring
// Range requests. Reads still return the right bytes, but each one transfers
// the blob from its start, so a caller should prefer one sequential Open.
func (b *Blob) RangeIgnored() bool {
	for _, e := range b.src.endpoints {
		if e.state.rangeIgnored.Load() {
			return true
		}
	}
	return false
}

// String names the blob as repository@digest.
func (b *Blob) String() string { return b.src.repo.Name() + "@" + b.digest.String() }

func (b *Blob) head(ctx context.Context) (int64, error) {
	var size int64
	err := b.src.do(ctx, func(ctx context.Context, e *endpoint) (bool, error) {
		resp, body, err := e.roundTrip(ctx, http.MethodHead, e.url("blobs", b.digest.String()), nil)
		if err != nil {
			return false, err
		}
		defer body.Close()
		if err := checkStatus(resp, b.String(), ErrBlobNotFound, http.StatusOK); err != nil {
			return false, err
		}
		if resp.ContentLength < 0 {
			return false, permanent(fmt.Errorf("%w: HEAD %s: no Content-Length", ErrBadResponse, b))
		}
		size = resp.ContentLength
		return false, nil
	})
	if err != nil {
		return 0, fmt.Errorf("blob size: %w", err)
	}
	return size, nil
}

// ReadAt reads len(p) bytes at off with one Range GET, retried (a retry
// asks only for the bytes still missing). It follows io.ReaderAt: fewer than
// len(p) bytes come with an error, io.EOF at the end of the blob.
func (b *Blob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read blob %s: negative offset %d", b, off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= b.size {
		return 0, io.EOF
	}
	want := int(min(int64(len(p)), b.size-off))
	r := &resumingReader{ctx: ctx, b: b, off: off, end: off + int64(want)}
	defer r.Close()
	n, err := io.ReadFull(r, p[:want])
	if err != nil {
		if err == io.ErrUnexpectedEOF {
			err = fmt.Errorf("%w: read blob %s: short read", ErrBadResponse, b)
		}
		return n, err
	}
	if want < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// OpenRange returns a reader of the n bytes of the blob at off, fetched
// with one Range GET, resumed as Open's is. It connects at its first Read.
func (b *Blob) OpenRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n < 0 || off+n > b.size {
		return nil, fmt.Errorf("open blob %s: range [%d, %d) outside [0, %d]", b, off, off+n, b.size)
	}
	return &resumingReader{ctx: ctx, b: b, off: off, end: off + n}, nil
}

// Open returns a reader of the blob from off to its end. A transient
// failure mid-body is retried by asking again from the last byte received,
// so the reader sees the bytes unbroken. ctx governs every request the
// reader makes; Close must not be called concurrently with Read.
func (b *Blob) Open(ctx context.Context, off int64) (io.ReadCloser, error) {
	if off < 0 || off > b.size {
		return nil, fmt.Errorf("open blob %s: offset %d outside [0, %d]", b, off, b.size)
	}
	r := &resumingReader{ctx: ctx, b: b, off: off, end: b.size}
	if off == b.size {
		return r, nil
	}
	// Connect now so that a missing blob or refused access is reported by
	// Open rather than by the first Read.
	err := b.src.do(ctx, func(ctx context.Context, e *endpoint) (bool, error) {
		rc, err := b.openRange(ctx, e, r.off, r.end)
		r.rc = rc
		return false, err
	})
	if err != nil {
		return nil, fmt.Errorf("blob open at %d: %w", off, err)
	}
	return r, nil
}

// resumingReader reads [off, end) of a blob, resuming after a transient
// failure with a new request from the first byte not yet received.
type resumingReader struct {
	ctx    context.Context
	b      *Blob
	off    int64
	end    int64
	rc     io.ReadCloser // current response, nil between connections
	closed bool
	// slow counts responses cut off as too slow (WithMinRate). Resuming
	// after one is no fresh start: a dribble, resumed, is still one.
	slow int
}

var errClosed = errors.New("read of closed blob reader")

func (r *resumingReader) Read(p []byte) (int, error) {
	if r.closed {
		return 0, errClosed
	}
	if r.off >= r.end {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if rem := r.end - r.off; int64(len(p)) > rem {
		p = p[:rem]
	}
	n := 0
	err := r.b.src.do(r.ctx, func(ctx context.Context, e *endpoint) (bool, error) {
		if r.rc == nil {
			rc, err := r.b.openRange(ctx, e, r.off, r.end)
			if err != nil {
				return false, err
			}
			r.rc = rc
		}
		for n == 0 {
			m, err := r.rc.Read(p)
			n = m
			r.off += int64(m)
			if err == io.EOF && r.off == r.end {
				err = nil
			}
			if err != nil {
				r.rc.Close()
				r.rc = nil
				if errors.Is(err, errTooSlow) {
					if r.slow++; r.slow >= r.b.src.o.attempts {
						return false, permanent(err)
					}
				}
				if n > 0 {
					// Deliver what arrived; the next Read reconnects.
					return true, nil
				}
				return false, err
			}
		}
		return true, nil
	})
	if r.off == r.end && r.rc != nil {
		r.rc.Close()
		r.rc = nil
	}
	if err != nil {
		return n, fmt.Errorf("blob read at %d: %w", r.off, err)
	}
	return n, nil
}

func (r *resumingReader) Close() error {
	r.closed = true
	if r.rc != nil {
		r.rc.Close()
		r.rc = nil
	}
	return nil
}

// openRange sends one GET for the bytes [off, end) of the blob and returns
// a reader of exactly those bytes. A registry that ignores Range (200 with
// the whole blob) is remembered and served by skipping to off.
func (b *Blob) openRange(ctx context.Context, e *endpoint, off, end int64) (io.ReadCloser, error) {
	// A bounded range: "bytes=N-" is refused by some registries.
	hdr := http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, end-1)}}
	resp, body, err := e.roundTrip(ctx, http.MethodGet, e.url("blobs", b.digest.String()), hdr)
	if err != nil {
		return nil, err
	}
	if err := checkStatus(resp, b.String(), ErrBlobNotFound, http.StatusPartialContent, http.StatusOK); err != nil {
		body.Close()
		return nil, err
	}
	if resp.StatusCode == http.StatusOK {
		return b.skipTo(e, resp, body, off, end)
	}
	if err := checkContentRange(resp.Header.Get("Content-Range"), off, end-1, b.size); err != nil {
		body.Close()
		return nil, permanent(fmt.Errorf("%w: range of blob %s from %s: %v", ErrBadResponse, b, resp.Request.URL.Host, err))
	}
	return &rangeReader{body: body, remaining: end - off, drain: true}, nil
}

// skipTo serves [off, end) from a response with the whole blob by reading
// up to off, and remembers that e ignores Range.
func (b *Blob) skipTo(e *endpoint, resp *http.Response, body *body, off, end int64) (io.ReadCloser, error) {
	host := resp.Request.URL.Host
	if resp.ContentLength >= 0 && resp.ContentLength != b.size {
		body.Close()
		return nil, permanent(fmt.Errorf("%w: blob %s from %s: %d bytes, want %d", ErrBadResponse, b, host, resp.ContentLength, b.size))
	}
	e.state.rangeIgnored.Store(true)
	if _, err := io.CopyN(io.Discard, body, off); err != nil {
		body.Close()
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("skipping to %d of blob %s (range ignored by %s): %w", off, b, host, err)
	}
	return &rangeReader{body: body, remaining: end - off}, nil
}

// checkContentRange checks "bytes first-last/size" against the request.
func checkContentRange(v string, first, last, size int64) error {
	spec, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return fmt.Errorf("Content-Range %q", v)
	}
	rng, total, ok := strings.Cut(spec, "/")
	fs, ls, ok2 := strings.Cut(rng, "-")
	if !ok || !ok2 {
		return fmt.Errorf("Content-Range %q", v)
	}
	f, err1 := strconv.ParseInt(fs, 10, 64)
	l, err2 := strconv.ParseInt(ls, 10, 64)
	if err1 != nil || err2 != nil {
		return fmt.Errorf("Content-Range %q", v)
	}
	if f != first || l != last {
		return fmt.Errorf("Content-Range %q for requested bytes %d-%d", v, first, last)
	}
	if total != "*" {
		if t, err := strconv.ParseInt(total, 10, 64); err != nil || t != size {
			return fmt.Errorf("Content-Range %q for a blob of %d bytes", v, size)
		}
	}
	return nil
}

// rangeReader yields exactly remaining bytes of a response body; an early
// end is io.ErrUnexpectedEOF.
type rangeReader struct {
	body      *body
	remaining int64
	drain     bool // the response ends with our range: read its EOF to keep the connection
}

func (r *rangeReader) Read(p []byte) (int, error) {
	if r.remaining <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.remaining {
		p = p[:r.remaining]
	}
	n, err := r.body.Read(p)
	r.remaining -= int64(n)
	switch {
	case r.remaining == 0:
		return n, io.EOF
	case err == io.EOF:
		return n, io.ErrUnexpectedEOF
	}
	return n, err
}

func (r *rangeReader) Close() error {
	if r.drain && r.remaining == 0 {
		// Seeing the body's EOF returns the connection to the pool.
		var buf [64]byte
		r.body.resp.Body.Read(buf[:])
	}
	return r.body.Close()
}
