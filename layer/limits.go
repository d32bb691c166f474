package layer

// Every bound on what a layer's content can make this package spend, with
// its reason: a blob, a TOC and a tar are untrusted, and a hostile one
// must fail with an error naming its layer, not take the memory or the
// disk of every other mount.

import (
	"archive/tar"
	"fmt"
	"io"
	"math"
	"sync/atomic"
)

// Bounds of an index (index.go), whatever the format.
const (
	// maxEntries bounds the names of one layer's index (files, implied
	// directories, hard links): each costs a few hundred bytes of memory,
	// and no real layer has a million files.
	maxEntries = 1 << 20
	// maxIndexBytes bounds what the headers of one layer bring into its
	// index besides the entries themselves: names, link targets and PAX
	// records (xattrs), each of which archive/tar allows up to 1 MiB.
	// Counted as headers arrive, replaced entries included.
	maxIndexBytes = 256 << 20
	// paxRecordCost is the memory of a map entry of a PAX record beyond
	// its key and value, so that a million tiny xattrs count too.
	paxRecordCost = 64
	// maxNameLen is Linux's PATH_MAX: a longer name or link target could
	// not be extracted to a disk either, and it bounds the directories
	// that one name implies.
	maxNameLen = 4096
	// maxLinks is ext4's bound on the names of an inode: an extracting
	// snapshotter could not create more either.
	maxLinks = 65000
	// maxRefusalsLogged bounds the warnings about refused entries of one
	// layer, which a hostile layer could otherwise emit by the million.
	maxRefusalsLogged = 100
)

// Bounds of an eStargz or zstd:chunked TOC (toc.go) and of its chunks
// (stargz.go).
const (
	// maxTOCJSON bounds a decompressed TOC. An entry is about 300 bytes
	// of indented JSON, so this is room for some 200,000 files, far more
	// than a layer of model weights holds (a 10 GB file in 4 MiB chunks
	// is 2,500 entries).
	maxTOCJSON = 64 << 20
	// maxTOCSize bounds the compressed TOC, which is read as the
	// decompressor asks: JSON compresses, so a TOC that needs more than
	// maxTOCJSON compressed bytes is not one.
	maxTOCSize = maxTOCJSON
	// maxTOCEntries bounds the entries decoded from a TOC: an entry takes
	// a few hundred bytes decoded even when its JSON is "{}".
	maxTOCEntries = 1 << 20
	// maxChunkSize bounds a chunk's decompressed size, which a read of
	// it allocates: eStargz chunks are 4 MiB by default.
	maxChunkSize = 64 << 20
	// maxCompressedSpan bounds the compressed stream a chunk is read from
	// (which may hold the headers of the entries that follow) and the
	// offset of the chunk in it; the stream is read as the decompressor
	// asks, chunkReadSize at a time, never held whole.
	maxCompressedSpan = 256 << 20
	// chunkReadSize is the most of a compressed stream one Source read
	// asks for: a default chunk in one read.
	chunkReadSize = 8 << 20
	// recentBytes bounds the decompressed, verified chunks a layer keeps
	// (four default chunks, and always the last one), so that a
	// sequential reader in small reads decompresses and verifies each
	// chunk once.
	recentBytes = 16 << 20
)

// zstdMaxWindow bounds the memory a hostile zstd frame of a streamed
// layer or a chunk can demand: the decoder allocates the window the frame
// declares.
const zstdMaxWindow = 128 << 20

// Bounds of a streamed layer (stream.go).
const (
	// DefaultMaxExpansion bounds how many times the size of its blob a
	// streamed layer may decompress to, unless WithMaxExpansion says
	// otherwise. Model weights barely compress (1.1 to 1.5 times), code
	// and text 3 to 10 times; a gzip bomb inflates 1,000 times, zstd far
	// more. A layer that compresses better (large files of zeros) needs
	// WithMaxExpansion.
	DefaultMaxExpansion = 100
	// DefaultMaxStreamSize bounds a streamed layer's decompressed size
	// whatever its ratio: 1 TiB holds the largest models shipped as one
	// layer (a trillion 8-bit parameters), and more than a node caches.
	DefaultMaxStreamSize = 1 << 40
	// expansionFloor is what any streamed layer may decompress to
	// whatever its ratio: a small tar compresses beyond any ratio, its
	// headers and padding being mostly zeros.
	expansionFloor = 16 << 20
)

// expansion bounds the decompressed size of a streamed layer.
type expansion struct{ ratio, limit int64 }

var defaultExpansion = expansion{DefaultMaxExpansion, DefaultMaxStreamSize}

// allowed is how many bytes a blob of n bytes may decompress to.
func (e expansion) allowed(n int64) int64 {
	a := int64(math.MaxInt64)
	if n <= a/e.ratio {
		a = n * e.ratio
	}
	return min(max(a, expansionFloor), e.limit)
}

// bound wraps the blob rc, of declared size (0 if unknown), and returns
// it with a function that wraps its decompressed stream. Reading more
// than the declared size, or more decompressed bytes than allowed, fails
// with ErrCorrupt. Without a declared size, the ratio applies to what
// was read of the blob so far.
func (e expansion) bound(rc io.Reader, declared int64) (io.Reader, func(io.Reader) io.Reader) {
	blobMax := int64(math.MaxInt64)
	if declared > 0 {
		blobMax = declared
	}
	blob := &boundedReader{r: rc, max: func() int64 { return blobMax },
		err: fmt.Errorf("%w: blob longer than the %d bytes of its descriptor", ErrCorrupt, declared)}
	wrap := func(dec io.Reader) io.Reader {
		return &boundedReader{r: dec, max: func() int64 { return e.allowed(max(declared, blob.n.Load())) },
			err: fmt.Errorf("%w: decompresses to more than %d times its size or %d bytes", ErrCorrupt, e.ratio, e.limit)}
	}
	return blob, wrap
}

// clip shortens a name for a log line: a tar name can be 1 MiB long.
func clip(s string) string {
	const n = 256
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// charge counts hdr against the bounds of the index.
func (x *index) charge(hdr *tar.Header) error {
	if len(x.byName) >= maxEntries {
		return fmt.Errorf("%w: more than %d entries", ErrCorrupt, maxEntries)
	}
	x.held += int64(len(hdr.Name) + len(hdr.Linkname))
	for k, v := range hdr.PAXRecords {
		x.held += int64(len(k)+len(v)) + paxRecordCost
	}
	if x.held > maxIndexBytes {
		return fmt.Errorf("%w: more than %d bytes of names, link targets and PAX records", ErrCorrupt, maxIndexBytes)
	}
	return nil
}

// boundedReader passes r through until more than max() bytes have come
// out of it, then fails with err: the reader learns that its input is too
// large before it holds that input.
type boundedReader struct {
	r io.Reader
	// n is the number of bytes read so far; another bound reads it, from
	// the goroutine of a decoder reading ahead.
	n   atomic.Int64
	max func() int64
	err error
}

func (b *boundedReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if b.n.Add(int64(n)) > b.max() {
		return 0, b.err
	}
	return n, err
}
