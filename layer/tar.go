package layer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"syscall"

	"github.com/weightsnap/weightsnap/tarheaders"
)

// headerReadSize is how much a header walk reads at once: a few headers
// of small files per read, and little waste past the header of a large
// file, whose data the walk seeks over.
const headerReadSize = 8 << 10

// readAtFunc is the shape of Source.ReadAt and Stream.ReadAt.
type readAtFunc func(ctx context.Context, p []byte, off int64) (int, error)

// readFull fills p from off, tolerating short reads that a ReaderAt may
// return with a nil error.
func readFull(ctx context.Context, readAt readAtFunc, p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		m, err := readAt(ctx, p[n:], off+int64(n))
		n += m
		if err != nil {
			return n, err
		}
		if m == 0 {
			return n, io.ErrNoProgress
		}
	}
	return n, nil
}

// seekReader presents random-access bytes as an io.ReadSeeker for
// archive/tar, which then seeks over file data instead of reading it.
type seekReader struct {
	ctx    context.Context
	readAt readAtFunc
	size   int64 // the end; -1 while unknown (a stream still being written)
	pos    int64
	step   int64 // how much one read asks; headerReadSize if 0
	err    error // the last error of readAt other than io.EOF
	buf    []byte
	bufOff int64
}

func (r *seekReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if r.size >= 0 && r.pos >= r.size {
		return 0, io.EOF
	}
	if r.pos < r.bufOff || r.pos >= r.bufOff+int64(len(r.buf)) {
		n := int64(headerReadSize)
		if r.step > 0 {
			n = r.step
		}
		if r.size >= 0 {
			n = min(n, r.size-r.pos)
		}
		if cap(r.buf) < int(n) {
			r.buf = make([]byte, n)
		}
		m, err := readFull(r.ctx, r.readAt, r.buf[:n], r.pos)
		if err != nil && err != io.EOF {
			r.err = err
		}
		r.buf, r.bufOff = r.buf[:m], r.pos
		if m == 0 {
			if err == nil {
				err = io.EOF
			}
			return 0, err
		}
	}
	n := copy(p, r.buf[r.pos-r.bufOff:])
	r.pos += int64(n)
	return n, nil
}

func (r *seekReader) Seek(off int64, whence int) (int64, error) {
	pos, err := seekPos(r.pos, off, whence)
	if err != nil {
		return 0, err
	}
	r.pos = pos
	return pos, nil
}

// seekPos is where Seek(off, whence) moves a reader at pos: archive/tar
// seeks from the start or the current position only.
func seekPos(pos, off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += pos
	default:
		return 0, errors.New("tar walk: unsupported whence")
	}
	if off < 0 {
		return 0, errors.New("tar walk: negative position")
	}
	return off, nil
}

// posReader is a reader for walkTar that knows its position and can
// skip forward: archive/tar reads exactly the header blocks before
// returning a header, so the position is then the offset of the entry's
// data, and it seeks over file data.
type posReader interface {
	io.ReadSeeker
	position() int64
}

func (r *seekReader) position() int64 { return r.pos }

// tailReader tracks how many zero bytes end what was read, to tell the
// end-of-archive marker from a tar cut short.
type tailReader struct {
	posReader
	zeros int64
}

func (t *tailReader) Read(p []byte) (int, error) {
	n, err := t.posReader.Read(p)
	i := n
	for i > 0 && p[i-1] == 0 {
		i--
	}
	if i == 0 {
		t.zeros += int64(n)
	} else {
		t.zeros = int64(n - i)
	}
	return n, err
}

func (t *tailReader) Seek(off int64, whence int) (int64, error) {
	t.zeros = 0
	return t.posReader.Seek(off, whence)
}

// walkTar feeds every header of the tar read through r to x. limit is
// the size of the uncompressed tar when known (-1 otherwise), to reject
// sizes that cannot be. It returns at the end-of-archive marker.
func walkTar(ctx context.Context, pr posReader, limit int64, x *index) error {
	r := &tailReader{posReader: pr}
	tr := tar.NewReader(r)
	end := int64(0) // end of the last entry's data, padded
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // (GODEBUG tarinsecurepath=0) the index refuses such names itself
		}
		if err == io.EOF {
			// archive/tar also reports a clean EOF for a tar cut at an
			// entry boundary: insist on the end-of-archive marker.
			if r.position() < end+512 || r.zeros < 512 {
				return fmt.Errorf("%w: tar truncated after %d bytes (no end-of-archive marker)", ErrCorrupt, r.position())
			}
			return nil
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, tar.ErrHeader) || errors.Is(err, tar.ErrFieldTooLong) {
				return fmt.Errorf("%w: reading tar header at %d: %v", ErrCorrupt, r.position(), err)
			}
			return fmt.Errorf("reading tar header at %d: %w", r.position(), err)
		}
		off := r.position()
		size := hdr.Size
		if hdr.Typeflag == tar.TypeLink || hdr.Typeflag == tar.TypeSymlink || hdr.Typeflag == tar.TypeChar ||
			hdr.Typeflag == tar.TypeBlock || hdr.Typeflag == tar.TypeDir || hdr.Typeflag == tar.TypeFifo {
			size = 0 // header-only types: archive/tar skips no data for them
		}
		if size < 0 || (limit >= 0 && size > limit-off) {
			return fmt.Errorf("%w: entry %q claims %d bytes at offset %d of a %d byte tar", ErrCorrupt, hdr.Name, hdr.Size, off, limit)
		}
		end = off + (size+511)&^511
		if _, err := x.add(ctx, hdr, off); err != nil {
			return err
		}
	}
}

// tarLayer is an uncompressed tar blob: a file's bytes are a contiguous
// range of the blob.
type tarLayer struct {
	idx *index
	src Source
	// confirm is set when idx was taken from the tar header annotation:
	// content is read only once it is confirmed.
	confirm *Confirmation
}

// tarIndexName is the meta record of the index of the uncompressed tar
// whose digest is dgst; openTar and openStream share it.
func tarIndexName(dgst string) string {
	if dgst == "" {
		return ""
	}
	return fmt.Sprintf("layer-index.tar.v%d.%s", indexVersion, sanitize(dgst))
}

// sanitize makes a digest usable as a flat record name.
func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == ':' || c == '/' {
			b[i] = '.'
		}
	}
	return string(b)
}

// openTar indexes an uncompressed tar blob by walking its headers with
// small range reads (headers and PAX/GNU long-name records only; file data
// is seeked over, never read). The index is saved in meta under a
// versioned name and reused by the next open. With claimed, a tar header
// annotation is walked instead of the blob (claimed.go); an annotation
// that cannot serve the walk is ignored.
func openTar(ctx context.Context, d Descriptor, src Source, meta MetaStore, claimed bool) (*tarLayer, error) {
	name := tarIndexName(d.Digest.String())
	if x := loadIndex(ctx, meta, name, d.Digest.String()); x != nil {
		return &tarLayer{idx: x, src: src}, nil
	}
	if _, ok := d.Annotations[tarheaders.Annotation]; ok && claimed {
		x, regions, err := claimedIndex(ctx, d, src.Size())
		if err == nil {
			save := func(ctx context.Context) { saveIndex(ctx, meta, name, x) }
			return &tarLayer{idx: x, src: src, confirm: newConfirmation(d.Digest.String(), regions, src, save)}, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		slog.DebugContext(ctx, "layer: tar header annotation not usable, walking the tar", "layer", d.Digest, "err", err)
	}
	x := newIndex(d.Digest.String())
	r := &seekReader{ctx: ctx, readAt: src.ReadAt, size: src.Size()}
	if err := walkTar(ctx, r, src.Size(), x); err != nil {
		return nil, fmt.Errorf("index tar layer %s: %w", d.Digest, err)
	}
	x.finish(nil)
	saveIndex(ctx, meta, name, x)
	return &tarLayer{idx: x, src: src}, nil
}

func (l *tarLayer) Lookup(ctx context.Context, name string) (*Entry, error) {
	return l.idx.lookup(ctx, name)
}

func (l *tarLayer) ReadDir(ctx context.Context, dir string) ([]*Entry, error) {
	return l.idx.readDir(ctx, dir)
}

func (l *tarLayer) ReadAt(ctx context.Context, e *Entry, p []byte, off int64) (int, error) {
	if err := l.confirmed(ctx); err != nil {
		return 0, err
	}
	return readContiguous(ctx, l.idx, l.src.ReadAt, l.src.Size(), e, p, off)
}

// confirmed waits until the index's file ranges may be read: at once
// for an index read from the blob, once confirmed for a claimed one.
func (l *tarLayer) confirmed(ctx context.Context) error {
	if l.confirm == nil {
		return nil
	}
	return l.confirm.Wait(ctx)
}

func (l *tarLayer) Size() int64 { return l.idx.contentSize() }

func (l *tarLayer) Close() error {
	if l.confirm != nil {
		l.confirm.close()
	}
	return nil
}

// readContiguous reads e's content, which starts at the offset recorded
// for its inode in the tar that readAt reads (of size limit, -1 unknown).
func readContiguous(ctx context.Context, x *index, readAt readAtFunc, limit int64, e *Entry, p []byte, off int64) (int, error) {
	base, err := contentRange(x, e, off, limit)
	if err != nil {
		return 0, err
	}
	if off >= e.Size {
		return 0, io.EOF
	}
	want := p
	if rest := e.Size - off; int64(len(want)) > rest {
		want = want[:rest]
	}
	n, err := readFull(ctx, readAt, want, base+off)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF // the index promised these bytes
	}
	if err != nil {
		return n, fmt.Errorf("read %q at %d: %w", e.Name, off, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// contentRange checks a read of e at off and returns where e's content
// starts.
func contentRange(x *index, e *Entry, off int64, limit int64) (int64, error) {
	if e == nil || e.Type != TypeReg {
		return 0, &fs.PathError{Op: "read", Path: entryName(e), Err: syscall.EINVAL}
	}
	if off < 0 {
		return 0, &fs.PathError{Op: "read", Path: e.Name, Err: syscall.EINVAL}
	}
	base, ok := x.dataOffset(e.Ino)
	if !ok {
		return 0, fmt.Errorf("read %q: inode %d not in this layer", e.Name, e.Ino)
	}
	if base < 0 || e.Size < 0 || (limit >= 0 && e.Size > limit-base) {
		return 0, fmt.Errorf("%w: %q: content range [%d,+%d) outside the blob", ErrCorrupt, e.Name, base, e.Size)
	}
	return base, nil
}

func entryName(e *Entry) string {
	if e == nil {
		return "<nil>"
	}
	return e.Name
}
