package layer

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/weightsnap/weightsnap/chunks"
)

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// pumpBufSize is the unit in which skipped file data is copied from the
// decompressor into the stream.
const pumpBufSize = 1 << 20

// streamLayer is a compressed tar without an index: one background
// goroutine streams it once into a Stream, indexing headers as they pass.
type streamLayer struct {
	idx       *index
	st        Stream
	exp       expansion
	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// openStream serves a gzip or zstd (or uncompressed) tar that has no
// index. The writer of the Stream keyed by d.Digest streams the blob from
// open in one background goroutine, decompressing into the Stream while
// indexing the tar headers as they pass: Lookup returns as soon as the
// entry has been seen, ReadDir waits for the end, ReadAt waits until the
// stream has passed the bytes. A reader of a stream that another opener
// writes only waits and reads, indexing from the Stream's bytes. If the
// Stream is complete and the index is in meta, nothing is streamed.
// Failures (truncated or corrupt data, a diff ID mismatch at Seal) are
// reported to every waiter.
//
// With a chunk table (WithTable), every chunk of the blob is checked
// before it is decompressed, so every byte served is; without one, bytes
// read before the stream completes are covered only by the checks at its
// end: the blob digest, then the diff ID at Seal. A blob that decompresses
// past what WithMaxExpansion allows is aborted as corrupt.
func openStream(ctx context.Context, d Descriptor, o options) (Layer, error) {
	if err := d.DiffID.Validate(); err != nil {
		return nil, fmt.Errorf("stream layer %s: diff ID: %w", d.Digest, err)
	}
	if err := d.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("stream layer: blob digest: %w", err)
	}
	// Kept under the blob's digest, not the DiffID the image claims: an
	// image that claims another's DiffID streams its own blob, and its
	// Seal fails.
	st, writer, err := o.streams.Stream(d.Digest, d.DiffID)
	if err != nil {
		return nil, fmt.Errorf("stream layer %s: open stream: %w", d.Digest, err)
	}
	open, meta, exp := o.open, o.meta, o.expansion
	name := tarIndexName(d.Digest.String())
	x := loadIndex(ctx, meta, name, d.Digest.String())
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	l := &streamLayer{idx: x, st: st, exp: exp, cancel: cancel, done: make(chan struct{})}
	build := x == nil
	if build {
		l.idx = newIndex(d.Digest.String())
	}
	switch {
	case writer:
		if open == nil {
			err := fmt.Errorf("stream layer %s: no way to open the blob", d.Digest)
			st.Abort(err)
			st.Close()
			cancel()
			return nil, err
		}
		go l.write(bg, d, o.table, open, build, meta, name)
	case build:
		go l.follow(bg, d, meta, name)
	default:
		close(l.done)
	}
	return l, nil
}

// write streams the blob into the Stream, as the Stream's writer.
func (l *streamLayer) write(ctx context.Context, d Descriptor, table *chunks.Table, open func(context.Context) (io.ReadCloser, error), build bool, meta MetaStore, name string) {
	defer close(l.done)
	err := l.pump(ctx, d, table, open, build)
	if err == nil {
		if err = l.st.Seal(); err != nil {
			err = fmt.Errorf("%w: stream layer %s: sealing %s: %w", ErrVerify, d.Digest, d.DiffID, err)
		}
	} else {
		err = fmt.Errorf("stream layer %s: %w", d.Digest, err)
		l.st.Abort(err)
	}
	if err != nil {
		slog.ErrorContext(ctx, "layer: streaming failed", "layer", d.Digest, "diffid", d.DiffID, "error", err)
	}
	l.idx.finish(err)
	if err == nil && build {
		saveIndex(ctx, meta, name, l.idx)
	}
}

// pump streams the blob d describes into the Stream, decompressing only
// bytes checked against table, when there is one, and the whole blob
// against its digest at the end.
func (l *streamLayer) pump(ctx context.Context, d Descriptor, table *chunks.Table, open func(context.Context) (io.ReadCloser, error), build bool) error {
	rc, err := open(ctx)
	if err != nil {
		return fmt.Errorf("opening blob: %w", err)
	}
	defer rc.Close()
	blob, bound := l.exp.bound(newCheckedReader(rc, d.Digest, table), d.Size)
	br := bufio.NewReaderSize(blob, 64<<10)
	magic, _ := br.Peek(4)
	var dec io.Reader = br
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		gz, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("%w: gzip: %v", ErrCorrupt, err)
		}
		defer gz.Close()
		dec = gz
	case bytes.HasPrefix(magic, zstdMagic):
		zd, err := zstd.NewReader(br, zstd.WithDecoderMaxWindow(zstdMaxWindow))
		if err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		defer zd.Close()
		dec = zd
	}
	p := &pumpReader{ctx: ctx, r: bound(dec), w: l.st, buf: make([]byte, pumpBufSize)}
	if build {
		if err := walkTar(ctx, p, -1, l.idx); err != nil {
			return err
		}
	}
	// The rest (padding after the end-of-archive marker, or all of it when
	// the index came from meta) is content too: the diff ID covers it.
	for {
		_, err := p.Read(p.buf)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// pumpReader reads the decompressed tar and writes every byte read to
// the Stream. Its Seek copies the skipped bytes in large blocks, which is
// how archive/tar skips file data through it.
type pumpReader struct {
	ctx context.Context
	r   io.Reader
	w   Stream
	pos int64
	buf []byte
	err error // write error, sticky
}

func (p *pumpReader) position() int64 { return p.pos }

func (p *pumpReader) Read(b []byte) (int, error) {
	if p.err != nil {
		return 0, p.err
	}
	if err := p.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := p.r.Read(b)
	if n > 0 {
		if _, werr := p.w.Write(b[:n]); werr != nil {
			p.err = fmt.Errorf("writing stream: %w", werr)
			return 0, p.err
		}
		p.pos += int64(n)
	}
	if err != nil && err != io.EOF && !errors.Is(err, ErrCorrupt) {
		err = fmt.Errorf("%w: decompressing at %d: %w", ErrCorrupt, p.pos, err)
	}
	return n, err
}

func (p *pumpReader) Seek(off int64, whence int) (int64, error) {
	if whence != io.SeekCurrent || off < 0 {
		return p.pos, errors.New("pumpReader: only forward relative seeks")
	}
	for off > 0 {
		b := p.buf
		if int64(len(b)) > off {
			b = b[:off]
		}
		n, err := p.Read(b)
		off -= int64(n)
		if err == io.EOF {
			// archive/tar reads the last byte after seeking and then
			// reports the truncation.
			break
		}
		if err != nil {
			return p.pos, err
		}
	}
	return p.pos, nil
}

// follow indexes the tar from the Stream's bytes while another opener
// writes it (or after it was written, when the index record is missing).
func (l *streamLayer) follow(ctx context.Context, d Descriptor, meta MetaStore, name string) {
	defer close(l.done)
	size := int64(-1)
	if l.st.Done() {
		size = l.st.Written()
	}
	r := &seekReader{ctx: ctx, readAt: l.st.ReadAt, size: size}
	err := walkTar(ctx, r, size, l.idx)
	if err == nil {
		// Wait for the writer's verdict: reading past the end returns
		// io.EOF once the stream is sealed, the failure otherwise.
		var one [1]byte
		_, err = l.st.ReadAt(ctx, one[:], 1<<62)
		if err == io.EOF && l.st.Done() {
			err = nil
		} else if err == nil || err == io.EOF {
			err = fmt.Errorf("%w: stream %s ended unsealed", ErrCorrupt, d.DiffID)
		}
	}
	if err != nil {
		err = fmt.Errorf("stream layer %s: %w", d.Digest, err)
		slog.ErrorContext(ctx, "layer: indexing stream failed", "layer", d.Digest, "diffid", d.DiffID, "error", err)
	}
	l.idx.finish(err)
	if err == nil {
		saveIndex(ctx, meta, name, l.idx)
	}
}

func (l *streamLayer) Lookup(ctx context.Context, name string) (*Entry, error) {
	return l.idx.lookup(ctx, name)
}

func (l *streamLayer) ReadDir(ctx context.Context, dir string) ([]*Entry, error) {
	return l.idx.readDir(ctx, dir)
}

func (l *streamLayer) ReadAt(ctx context.Context, e *Entry, p []byte, off int64) (int, error) {
	return readContiguous(ctx, l.idx, l.st.ReadAt, -1, e, p, off)
}

// Close stops the background streaming (aborting the Stream if this
// layer was still writing it: other readers of the Stream then see the
// error) and releases the Stream.
func (l *streamLayer) Size() int64 { return l.idx.contentSize() }

func (l *streamLayer) Close() error {
	var err error
	l.closeOnce.Do(func() {
		l.cancel()
		<-l.done
		err = l.st.Close()
	})
	return err
}
