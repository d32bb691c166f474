// Package chunks is weightsnap's chunk table: the sha256 of every
// fixed-size chunk of a layer blob, carried in an annotation on the layer's
// descriptor in the image manifest. The manifest's digest pins the table,
// and the table pins every chunk, so a lazy reader can check each range it
// fetches before serving it, long before the whole blob has been read.
//
// Why an annotation: it is part of the manifest, so a pod that names the
// image by digest gets exactly that table; a registry's garbage collector
// keeps what a manifest references and the annotation needs nothing
// kept besides the manifest; and adding it to an existing image means
// pushing a new manifest only, never the weight blobs again. Its size: at
// the default 4 MiB chunks a 16 GiB blob has 4096 chunks, 128 KiB of
// digests, 171 KiB in base64, well under the 4 MiB registries accept for a
// manifest.
package chunks

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Annotation is the layer descriptor annotation holding a Table.
const Annotation = "dev.weightsnap.chunks.v1"

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
	ChunkSize int64
	Size      int64
	Digests   [][sha256.Size]byte
}

// encoded is the annotation's JSON.
type encoded struct {
	ChunkSize int64  `json:"chunkSize"`
	Size      int64  `json:"size"`
	SHA256    string `json:"sha256"` // base64 of the digests, concatenated
}

// Len is the number of chunks.
func (t *Table) Len() int { return len(t.Digests) }

// Range returns the blob range of chunk i.
func (t *Table) Range(i int) (off, n int64) {
	off = int64(i) * t.ChunkSize
	return off, min(t.ChunkSize, t.Size-off)
}

// Check reports whether p is the content of chunk i.
func (t *Table) Check(i int, p []byte) error {
	if i < 0 || i >= len(t.Digests) {
		return fmt.Errorf("%w: chunk %d of %d", ErrInvalid, i, len(t.Digests))
	}
	if _, n := t.Range(i); int64(len(p)) != n {
		return fmt.Errorf("%w: chunk %d has %d bytes, want %d", ErrMismatch, i, len(p), n)
	}
	if sha256.Sum256(p) != t.Digests[i] {
		off, _ := t.Range(i)
		return fmt.Errorf("%w: chunk %d at offset %d", ErrMismatch, i, off)
	}
	return nil
}

// Encode returns the annotation value of t.
func (t *Table) Encode() string {
	raw := make([]byte, 0, len(t.Digests)*sha256.Size)
	for _, d := range t.Digests {
		raw = append(raw, d[:]...)
	}
	b, _ := json.Marshal(encoded{ChunkSize: t.ChunkSize, Size: t.Size, SHA256: base64.StdEncoding.EncodeToString(raw)})
	return string(b)
}

// Parse decodes the annotation value s of a blob of blobSize bytes (as its
// descriptor says), refusing any table that does not describe exactly
// that blob with sane chunks.
func Parse(s string, blobSize int64) (*Table, error) {
	if len(s) > MaxAnnotation {
		return nil, fmt.Errorf("%w: %d bytes", ErrInvalid, len(s))
	}
	var e encoded
	if err := json.Unmarshal([]byte(s), &e); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if e.ChunkSize < minChunkSize || e.ChunkSize > maxChunkSize {
		return nil, fmt.Errorf("%w: chunk size %d", ErrInvalid, e.ChunkSize)
	}
	if e.Size != blobSize || blobSize < 0 {
		return nil, fmt.Errorf("%w: table of %d bytes for a blob of %d", ErrInvalid, e.Size, blobSize)
	}
	raw, err := base64.StdEncoding.DecodeString(e.SHA256)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	n := (blobSize + e.ChunkSize - 1) / e.ChunkSize
	if int64(len(raw)) != n*sha256.Size {
		return nil, fmt.Errorf("%w: %d digest bytes for %d chunks", ErrInvalid, len(raw), n)
	}
	t := &Table{ChunkSize: e.ChunkSize, Size: blobSize, Digests: make([][sha256.Size]byte, n)}
	for i := range t.Digests {
		copy(t.Digests[i][:], raw[i*sha256.Size:])
	}
	return t, nil
}

// Compute reads a blob of size bytes from r and returns its table.
func Compute(r io.Reader, size, chunkSize int64) (*Table, error) {
	if chunkSize < minChunkSize || chunkSize > maxChunkSize {
		return nil, fmt.Errorf("%w: chunk size %d", ErrInvalid, chunkSize)
	}
	t := &Table{ChunkSize: chunkSize, Size: size}
	h := sha256.New()
	for off := int64(0); off < size; off += chunkSize {
		h.Reset()
		if _, err := io.CopyN(h, r, min(chunkSize, size-off)); err != nil {
			return nil, fmt.Errorf("chunk table: reading at %d: %w", off, err)
		}
		var d [sha256.Size]byte
		h.Sum(d[:0])
		t.Digests = append(t.Digests, d)
	}
	return t, nil
}

// Writer computes the table of what is written through it, for a blob
// whose size is known only at the end (pack writes layers this way).
type Writer struct {
	h     hash.Hash
	n     int64 // bytes of the current chunk hashed so far
	table Table
}

// NewWriter returns a Writer of a table with chunkSize chunks.
func NewWriter(chunkSize int64) *Writer {
	return &Writer{h: sha256.New(), table: Table{ChunkSize: chunkSize}}
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

func (w *Writer) sum() (d [sha256.Size]byte) {
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
