// Package chunks is weightsnap's chunk table: the digest of every
// fixed-size chunk of a layer blob, carried in an annotation of the layer
// (in the image config, or on the layer's descriptor in images of earlier
// versions; package annotations). The manifest's digest pins the table,
// and the table pins every chunk, so a lazy reader can check each range it
// fetches before serving it, long before the whole blob has been read.
// Its size: at the default 4 MiB chunks a 16 GiB blob has 4096 chunks,
// 128 KiB of digests, 171 KiB in base64.
//
// Why BLAKE3 for new tables: a cold read is bounded by the CPU of a small
// node, and checking every chunk was the largest part of the daemon's
// work per byte. BLAKE3 hashes at twice sha256's speed on one core here
// (3.9 against 2.0 GB/s, with sha256 in SHA-NI) and is a 256-bit
// cryptographic hash too. Tables of sha256 digests, which earlier
// versions wrote, are still read. The implementation (zeebo/blake3) hashes
// on the calling goroutine and keeps its speed on bytes fresh from the
// network; one that spread a chunk over goroutines with AVX-512 fell to
// sha256's speed on bytes not already in the CPU's cache.
package chunks

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/zeebo/blake3"
)

// Hash is the digest algorithm of a table.
type Hash string

const (
	// BLAKE3 tables are what pack and convert write.
	BLAKE3 Hash = "blake3"
	// SHA256 tables were written by earlier versions.
	SHA256 Hash = "sha256"
)

// The layer annotations holding a Table, one per Hash: on the layer
// descriptor, or in the image config (package annotations).
const (
	// Annotation holds a table of BLAKE3 digests.
	Annotation = "dev.weightsnap.chunks.v2"
	// AnnotationSHA256 holds a table of sha256 digests.
	AnnotationSHA256 = "dev.weightsnap.chunks.v1"
)

// Annotations are the keys a table can be found under, in the order Find
// looks for them.
var Annotations = []string{Annotation, AnnotationSHA256}

// DigestSize is the length of a chunk digest, in either Hash.
const DigestSize = 32

const (
	// DefaultChunkSize balances the table's size against what a cold read
	// must fetch before it can be checked: 4 MiB is half a fetch span.
	DefaultChunkSize = 4 << 20
	// minChunkSize and maxChunkSize bound what a table may claim: a
	// hostile table must not make a reader fetch or hold gigabytes to
	// check one chunk, nor carry millions of digests.
	minChunkSize = 64 << 10
	maxChunkSize = 64 << 20
	// MaxAnnotation bounds the annotation's length (8 MiB of base64: 6 MiB
	// of digests, 196608 chunks; 768 GiB at 4 MiB chunks).
	MaxAnnotation = 8 << 20
)

// ErrInvalid is wrapped by errors about a table that cannot be used.
var ErrInvalid = errors.New("invalid chunk table")

// ErrMismatch is wrapped by errors about a chunk whose bytes do not match
// the table.
var ErrMismatch = errors.New("chunk does not match its digest")

// Table is the digests of a blob's chunks: chunk i is the blob's bytes
// [i*ChunkSize, min((i+1)*ChunkSize, Size)).
type Table struct {
	Hash      Hash
	ChunkSize int64
	Size      int64
	Digests   [][DigestSize]byte
}

// encoded is the annotation's JSON. The digests, concatenated, are in
// base64 under their algorithm's name: one of the fields is set.
type encoded struct {
	ChunkSize int64  `json:"chunkSize"`
	Size      int64  `json:"size"`
	BLAKE3    string `json:"blake3,omitempty"`
	SHA256    string `json:"sha256,omitempty"`
}

// newHash returns a hash of algorithm h, or nil if h is none.
func newHash(h Hash) hash.Hash {
	switch h {
	case BLAKE3:
		return blake3.New()
	case SHA256:
		return sha256.New()
	}
	return nil
}

// NewHash returns a hash of t's algorithm, for a chunk read in pieces.
func (t *Table) NewHash() hash.Hash { return newHash(t.Hash) }

// sum returns the digest of p in t's algorithm.
func (t *Table) sum(p []byte) [DigestSize]byte {
	if t.Hash == SHA256 {
		return sha256.Sum256(p)
	}
	return blake3.Sum256(p)
}

// Key is the annotation t is carried in.
func (t *Table) Key() string {
	if t.Hash == SHA256 {
		return AnnotationSHA256
	}
	return Annotation
}

// Len is the number of chunks.
func (t *Table) Len() int { return len(t.Digests) }

// Range returns the blob range of chunk i.
func (t *Table) Range(i int) (off, n int64) {
	off = int64(i) * t.ChunkSize
	return off, min(t.ChunkSize, t.Size-off)
}

// Check reports whether p is the content of chunk i.
func (t *Table) Check(i int, p []byte) error { return t.CheckTee(i, p, nil) }

// teePiece is the piece of a chunk CheckTee hashes and then writes: small
// enough to stay in a core's cache in between.
const teePiece = 256 << 10

// CheckTee is Check that also writes p to w (if not nil), a piece at a
// time right after hashing it, so that w (a checksum) reads each piece
// from the CPU's cache rather than from memory: at a cold read's rate,
// memory is a cost too.
func (t *Table) CheckTee(i int, p []byte, w io.Writer) error {
	if i < 0 || i >= len(t.Digests) {
		return fmt.Errorf("%w: chunk %d of %d", ErrInvalid, i, len(t.Digests))
	}
	if _, n := t.Range(i); int64(len(p)) != n {
		return fmt.Errorf("%w: chunk %d has %d bytes, want %d", ErrMismatch, i, len(p), n)
	}
	var sum [DigestSize]byte
	if w == nil {
		sum = t.sum(p)
	} else {
		h := t.NewHash()
		for q := p; len(q) > 0; q = q[min(len(q), teePiece):] {
			piece := q[:min(len(q), teePiece)]
			h.Write(piece)
			w.Write(piece)
		}
		h.Sum(sum[:0])
	}
	if sum != t.Digests[i] {
		off, _ := t.Range(i)
		return fmt.Errorf("%w: chunk %d at offset %d", ErrMismatch, i, off)
	}
	return nil
}

// Encode returns the annotation value of t, to be carried under t.Key().
func (t *Table) Encode() string {
	raw := make([]byte, 0, len(t.Digests)*DigestSize)
	for _, d := range t.Digests {
		raw = append(raw, d[:]...)
	}
	e := encoded{ChunkSize: t.ChunkSize, Size: t.Size}
	if t.Hash == SHA256 {
		e.SHA256 = base64.StdEncoding.EncodeToString(raw)
	} else {
		e.BLAKE3 = base64.StdEncoding.EncodeToString(raw)
	}
	b, _ := json.Marshal(e)
	return string(b)
}

// Find returns the table in a layer descriptor's annotations ann, for a
// blob of blobSize bytes: the first of Annotations that parses. An error
// wrapping ErrInvalid says why there is none.
func Find(ann map[string]string, blobSize int64) (*Table, error) {
	var err error // the first annotation's
	for _, key := range Annotations {
		s, ok := ann[key]
		if !ok {
			continue
		}
		t, perr := Parse(key, s, blobSize)
		if perr == nil {
			return t, nil
		}
		if err == nil {
			err = fmt.Errorf("%s: %w", key, perr)
		}
	}
	if err == nil {
		err = fmt.Errorf("%w: no chunk table annotation", ErrInvalid)
	}
	return nil, err
}

// Parse decodes the value s of annotation key (one of Annotations) of a
// blob of blobSize bytes (as its descriptor says), refusing any table
// that does not describe exactly that blob with sane chunks.
func Parse(key, s string, blobSize int64) (*Table, error) {
	if len(s) > MaxAnnotation {
		return nil, fmt.Errorf("%w: %d bytes", ErrInvalid, len(s))
	}
	var e encoded
	if err := json.Unmarshal([]byte(s), &e); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	var h Hash
	var digests string
	switch key {
	case Annotation:
		h, digests = BLAKE3, e.BLAKE3
	case AnnotationSHA256:
		h, digests = SHA256, e.SHA256
	default:
		return nil, fmt.Errorf("%w: annotation %q", ErrInvalid, key)
	}
	if e.ChunkSize < minChunkSize || e.ChunkSize > maxChunkSize {
		return nil, fmt.Errorf("%w: chunk size %d", ErrInvalid, e.ChunkSize)
	}
	if e.Size != blobSize || blobSize < 0 {
		return nil, fmt.Errorf("%w: table of %d bytes for a blob of %d", ErrInvalid, e.Size, blobSize)
	}
	raw, err := base64.StdEncoding.DecodeString(digests)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	n := (blobSize + e.ChunkSize - 1) / e.ChunkSize
	if int64(len(raw)) != n*DigestSize {
		return nil, fmt.Errorf("%w: %d %s digest bytes for %d chunks", ErrInvalid, len(raw), h, n)
	}
	t := &Table{Hash: h, ChunkSize: e.ChunkSize, Size: blobSize, Digests: make([][DigestSize]byte, n)}
	for i := range t.Digests {
		copy(t.Digests[i][:], raw[i*DigestSize:])
	}
	return t, nil
}

// Compute reads a blob of size bytes from r and returns its table of
// digests in algorithm h.
func Compute(r io.Reader, size, chunkSize int64, h Hash) (*Table, error) {
	w, err := NewWriter(chunkSize, h)
	if err != nil {
		return nil, err
	}
	if n, err := io.CopyN(w, r, size); err != nil {
		return nil, fmt.Errorf("chunk table: reading at %d: %w", n, err)
	}
	return w.Table(), nil
}

// Writer computes the table of what is written through it, for a blob
// whose size is known only at the end (pack writes layers this way).
type Writer struct {
	h     hash.Hash
	n     int64 // bytes of the current chunk hashed so far
	table Table
}

// NewWriter returns a Writer of a table with chunkSize chunks and digests
// in algorithm h.
func NewWriter(chunkSize int64, h Hash) (*Writer, error) {
	if chunkSize < minChunkSize || chunkSize > maxChunkSize {
		return nil, fmt.Errorf("%w: chunk size %d", ErrInvalid, chunkSize)
	}
	hh := newHash(h)
	if hh == nil {
		return nil, fmt.Errorf("%w: hash %q", ErrInvalid, h)
	}
	return &Writer{h: hh, table: Table{Hash: h, ChunkSize: chunkSize}}, nil
}

func (w *Writer) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		k := min(int64(len(p)), w.table.ChunkSize-w.n)
		w.h.Write(p[:k])
		w.n += k
		w.table.Size += k
		p = p[k:]
		if w.n == w.table.ChunkSize {
			w.table.Digests = append(w.table.Digests, w.sum())
		}
	}
	return n, nil
}

func (w *Writer) sum() (d [DigestSize]byte) {
	w.h.Sum(d[:0])
	w.h.Reset()
	w.n = 0
	return d
}

// Table returns the table of everything written; the Writer is done.
func (w *Writer) Table() *Table {
	if w.n > 0 {
		w.table.Digests = append(w.table.Digests, w.sum())
	}
	return &w.table
}
