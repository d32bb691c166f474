package layer

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

var (
	// errNoTOC: the blob has no eStargz/zstd:chunked footer.
	errNoTOC = fmt.Errorf("%w: no eStargz TOC", ErrUnsupported)
	// errUnverifiable: the TOC lacks chunk digests (legacy stargz), so
	// chunks cannot be verified; such a blob is served as a stream.
	errUnverifiable = fmt.Errorf("%w: TOC without chunk digests", ErrUnsupported)
)

// stargzLayer is an eStargz (or zstd:chunked) blob: the TOC at its end is
// the index, file contents are read chunk by chunk, each decompressed and
// verified against its chunk digest.
type stargzLayer struct {
	idx *index
	src Source

	mu     sync.Mutex
	recent []recentChunk // most recent first
}

type recentChunk struct {
	off, inner int64
	data       []byte
}

func stargzIndexName(dgst string) string {
	if dgst == "" {
		return ""
	}
	return fmt.Sprintf("layer-index.estargz.v%d.%s", indexVersion, sanitize(dgst))
}

// openStargz opens an eStargz or zstd:chunked blob: the TOC is read from
// the blob's end (and checked against the layer's TOC digest or
// zstd:chunked manifest checksum annotation when it has one); file chunks
// are fetched on demand and verified against their chunk digests. The
// index is saved in meta.
//
// The TOC is parsed with estargz's decompressors rather than estargz.Open
// because the index needs the raw names and the TOC order: estargz.Open
// silently confines names like "../x" (this package refuses them) and
// exposes children only as maps, which would make inode numbers unstable.
func openStargz(ctx context.Context, d Descriptor, src Source, meta MetaStore) (Layer, error) {
	name := stargzIndexName(d.Digest.String())
	if x := loadIndex(ctx, meta, name, d.Digest.String()); x != nil {
		return &stargzLayer{idx: x, src: src}, nil
	}
	toc, tocOff, err := readTOC(ctx, d, src)
	if err != nil {
		return nil, fmt.Errorf("estargz layer %s: %w", d.Digest, err)
	}
	x := newIndex(d.Digest.String())
	if err := indexTOC(ctx, x, toc, tocOff); err != nil {
		return nil, fmt.Errorf("estargz layer %s: %w", d.Digest, err)
	}
	x.finish(nil)
	saveIndex(ctx, meta, name, x)
	return &stargzLayer{idx: x, src: src}, nil
}

// tocHeader is the tar header an eStargz TOC entry stands for.
func tocHeader(te *estargz.TOCEntry) *tar.Header {
	h := &tar.Header{
		Name:     te.Name,
		Linkname: te.LinkName,
		Size:     te.Size,
		Mode:     te.Mode,
		Uid:      te.UID,
		Gid:      te.GID,
		Devmajor: int64(te.DevMajor),
		Devminor: int64(te.DevMinor),
		ModTime:  epoch,
	}
	if t, err := time.Parse(time.RFC3339, te.ModTime3339); err == nil {
		h.ModTime = t
	}
	switch te.Type {
	case "dir":
		h.Typeflag = tar.TypeDir
	case "reg":
		h.Typeflag = tar.TypeReg
	case "symlink":
		h.Typeflag = tar.TypeSymlink
	case "hardlink":
		h.Typeflag = tar.TypeLink
	case "char":
		h.Typeflag = tar.TypeChar
	case "block":
		h.Typeflag = tar.TypeBlock
	case "fifo":
		h.Typeflag = tar.TypeFifo
	default:
		h.Typeflag = 0xff // refused by the index as unknown
	}
	if h.Typeflag != tar.TypeReg {
		h.Size = 0
	}
	if len(te.Xattrs) > 0 {
		h.PAXRecords = make(map[string]string, len(te.Xattrs))
		for k, v := range te.Xattrs {
			h.PAXRecords["SCHILY.xattr."+k] = string(v)
		}
	}
	return h
}

// indexTOC feeds the TOC entries to x and records each file's chunks.
func indexTOC(ctx context.Context, x *index, toc *estargz.JTOC, tocOff int64) error {
	// A chunk's compressed stream ends where the next one starts.
	var offs []int64
	for _, te := range toc.Entries {
		if te != nil && (te.Type == "reg" || te.Type == "chunk") && te.Offset > 0 {
			offs = append(offs, te.Offset)
		}
	}
	offs = append(offs, tocOff)
	slices.Sort(offs)
	offs = slices.Compact(offs)
	end := func(off int64) int64 {
		i := sort.Search(len(offs), func(i int) bool { return offs[i] > off })
		if i == len(offs) {
			return -1
		}
		return offs[i]
	}
	newChunk := func(te *estargz.TOCEntry, fileSize int64) chunkRef {
		size := te.ChunkSize
		if size == 0 {
			size = fileSize - te.ChunkOffset
		}
		return chunkRef{FileOff: te.ChunkOffset, Size: size, Off: te.Offset, End: end(te.Offset), InnerOff: te.InnerOffset, Digest: te.ChunkDigest}
	}

	var cur *Entry
	var chunks []chunkRef
	flush := func() error {
		if cur == nil {
			return nil
		}
		if err := checkChunks(cur, chunks, tocOff); err != nil {
			return err
		}
		x.mu.Lock()
		x.chunks[cur.Ino] = chunks
		x.mu.Unlock()
		cur, chunks = nil, nil
		return nil
	}
	for _, te := range toc.Entries {
		if te == nil {
			continue
		}
		if te.Type == "chunk" {
			if cur != nil {
				chunks = append(chunks, newChunk(te, cur.Size))
			}
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		if n, _ := cleanName(te.Name); n == estargz.PrefetchLandmark || n == estargz.NoPrefetchLandmark {
			continue // estargz's build markers, not content
		}
		e, err := x.add(ctx, tocHeader(te), -1)
		if err != nil {
			return err
		}
		if te.Type == "reg" && e != nil && e.Type == TypeReg && e.Size > 0 {
			cur = e
			chunks = []chunkRef{newChunk(te, e.Size)}
		}
	}
	return flush()
}

// checkChunks checks that chunks tile e's content and are readable within
// the bounds above, so reads never trust a hostile TOC.
func checkChunks(e *Entry, chunks []chunkRef, tocOff int64) error {
	var next int64
	for _, c := range chunks {
		if c.Digest == "" {
			return fmt.Errorf("%q: %w", e.Name, errUnverifiable)
		}
		if _, err := digest.Parse(c.Digest); err != nil {
			return fmt.Errorf("%w: %q: chunk digest: %v", ErrCorrupt, e.Name, err)
		}
		if c.FileOff != next || c.Size <= 0 || c.Size > maxChunkSize || c.Off <= 0 || c.End <= c.Off ||
			c.End > tocOff || c.End-c.Off > maxCompressedSpan || c.InnerOff < 0 || c.InnerOff > maxCompressedSpan {
			return fmt.Errorf("%w: %q: bad chunk %+v", ErrCorrupt, e.Name, c)
		}
		next += c.Size
	}
	if next != e.Size {
		return fmt.Errorf("%w: %q: chunks cover %d of %d bytes", ErrCorrupt, e.Name, next, e.Size)
	}
	return nil
}

func (l *stargzLayer) Lookup(ctx context.Context, name string) (*Entry, error) {
	return l.idx.lookup(ctx, name)
}

func (l *stargzLayer) ReadDir(ctx context.Context, dir string) ([]*Entry, error) {
	return l.idx.readDir(ctx, dir)
}

func (l *stargzLayer) ReadAt(ctx context.Context, e *Entry, p []byte, off int64) (int, error) {
	if e == nil || e.Type != TypeReg || off < 0 {
		return 0, &fs.PathError{Op: "read", Path: entryName(e), Err: syscall.EINVAL}
	}
	if off >= e.Size {
		return 0, io.EOF
	}
	chunks := l.idx.chunksOf(e.Ino)
	i := sort.Search(len(chunks), func(i int) bool { return chunks[i].FileOff+chunks[i].Size > off })
	n := 0
	for n < len(p) && off < e.Size {
		if i >= len(chunks) || chunks[i].FileOff > off {
			return n, fmt.Errorf("%w: %q: no chunk at %d", ErrCorrupt, e.Name, off)
		}
		data, err := l.chunk(ctx, chunks[i])
		if err != nil {
			return n, fmt.Errorf("read %q at %d: %w", e.Name, off, err)
		}
		k := copy(p[n:], data[off-chunks[i].FileOff:])
		n += k
		off += int64(k)
		i++
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// chunk returns the verified content of c. Content that does not verify
// is dropped from the source (Source.Invalidate) and fetched once more;
// if it is still wrong the read fails.
func (l *stargzLayer) chunk(ctx context.Context, c chunkRef) ([]byte, error) {
	l.mu.Lock()
	for i, r := range l.recent {
		if r.off == c.Off && r.inner == c.InnerOff && int64(len(r.data)) == c.Size {
			copy(l.recent[1:i+1], l.recent[:i])
			l.recent[0] = r
			l.mu.Unlock()
			return r.data, nil
		}
	}
	l.mu.Unlock()
	for attempt := 0; ; attempt++ {
		data, err := l.fetchChunk(ctx, c)
		if err == nil {
			l.mu.Lock()
			l.remember(recentChunk{off: c.Off, inner: c.InnerOff, data: data})
			l.mu.Unlock()
			return data, nil
		}
		if !errors.Is(err, ErrVerify) || attempt > 0 {
			return nil, err
		}
		slog.WarnContext(ctx, "layer: chunk failed verification, fetching again", "layer", l.idx.layer, "offset", c.Off, "length", c.End-c.Off, "error", err)
		l.src.Invalidate(c.Off, c.End-c.Off)
	}
}

// remember puts r first in the recent chunks, keeping as many after it
// as fit in recentBytes; l.mu is held.
func (l *stargzLayer) remember(r recentChunk) {
	l.recent = append([]recentChunk{r}, l.recent...)
	held := len(r.data)
	for i := 1; i < len(l.recent); i++ {
		if held += len(l.recent[i].data); held > recentBytes {
			clear(l.recent[i:]) // let the chunks go
			l.recent = l.recent[:i]
			break
		}
	}
}

func (l *stargzLayer) fetchChunk(ctx context.Context, c chunkRef) ([]byte, error) {
	// Re-checked here because the chunk may come from a meta record.
	dg, err := digest.Parse(c.Digest)
	if err != nil || c.Size <= 0 || c.Size > maxChunkSize || c.Off < 0 || c.End <= c.Off || c.End-c.Off > maxCompressedSpan || c.InnerOff < 0 || c.InnerOff > maxCompressedSpan {
		return nil, fmt.Errorf("%w: bad chunk %+v", ErrCorrupt, c)
	}
	// The compressed span is read as the decompressor asks for it: it may
	// run far past the chunk (over the headers of the entries that
	// follow), and compressed data is seldom much larger than the data,
	// so the first read asks for the chunk and a little more.
	step := min(c.End-c.Off, c.InnerOff+c.Size+64<<10, chunkReadSize)
	span := &seekReader{ctx: ctx, readAt: l.src.ReadAt, size: c.End, pos: c.Off, step: step}
	data, err := decompressChunk(bufio.NewReaderSize(span, 64<<10), c)
	if err != nil && span.err != nil {
		return nil, fmt.Errorf("fetching chunk [%d,%d): %w", c.Off, c.End, span.err)
	}
	if err != nil {
		return nil, err
	}
	v := dg.Verifier()
	v.Write(data)
	if !v.Verified() {
		return nil, fmt.Errorf("%w: chunk at %d+%d does not match %s", ErrVerify, c.Off, c.InnerOff, c.Digest)
	}
	return data, nil
}

// decompressChunk returns the c.Size bytes at c.InnerOff of the gzip or
// zstd stream r.
func decompressChunk(r *bufio.Reader, c chunkRef) ([]byte, error) {
	magic, _ := r.Peek(len(zstdMagic))
	var dec io.Reader
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		gz, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("%w: chunk at %d: gzip: %v", ErrVerify, c.Off, err)
		}
		defer gz.Close()
		dec = gz
	case bytes.HasPrefix(magic, zstdMagic):
		zd, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(zstdMaxWindow))
		if err != nil {
			return nil, fmt.Errorf("chunk at %d: zstd: %w", c.Off, err)
		}
		defer zd.Close()
		dec = zd
	default:
		return nil, fmt.Errorf("%w: chunk at %d is neither gzip nor zstd", ErrVerify, c.Off)
	}
	if _, err := io.CopyN(io.Discard, dec, c.InnerOff); err != nil {
		return nil, fmt.Errorf("%w: chunk at %d: decompressing: %v", ErrVerify, c.Off, err)
	}
	data := make([]byte, c.Size)
	if _, err := io.ReadFull(dec, data); err != nil {
		return nil, fmt.Errorf("%w: chunk at %d: decompressing: %v", ErrVerify, c.Off, err)
	}
	return data, nil
}

func (l *stargzLayer) Size() int64 { return l.idx.contentSize() }

func (l *stargzLayer) Close() error { return nil }
