package layer

import (
	"context"
	"errors"
	"os"

	digest "github.com/opencontainers/go-digest"
)

// Source is random-access bytes of a layer blob, typically a registry
// blob seen through the node cache.
type Source interface {
	// ReadAt reads len(p) bytes at off with io.ReaderAt semantics.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	// Size is the size of the blob in bytes.
	Size() int64
	// Invalidate drops [off, off+n), found wrong by a digest that covers
	// it, so that the next read fetches it again. A Source that keeps
	// nothing does nothing.
	Invalidate(off, n int64)
}

// FileSource is a Source that can hand out the local file holding a
// range, and the range's offset in that file, instead of copying the
// bytes out (the node cache does). The bytes stay in place until release
// is called. Open finds out whether its Source is one.
type FileSource interface {
	Source
	ReadFile(ctx context.Context, off, n int64) (f *os.File, fileOff int64, release func(), err error)
}

// Stream is sequentially written, concurrently readable storage of one
// decompressed blob: readers wait for the bytes they ask for until the
// writer has written them, sealed the stream or aborted it.
type Stream interface {
	// Write appends p; only the writer (see StreamStore) calls it.
	Write(p []byte) (int, error)
	// Seal ends the stream; it fails if the content does not match the
	// stream's key, in which case waiting readers get that error.
	Seal() error
	// Abort ends the stream with err, reported to every waiting reader.
	Abort(err error)
	// ReadAt waits until [off, off+len(p)) is written (or the stream
	// ended) and reads it with io.ReaderAt semantics.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	// Written is the number of bytes written so far.
	Written() int64
	// Done reports whether the stream was sealed successfully.
	Done() bool
	// Close releases this handle of the stream.
	Close() error
}

// StreamStore provides Streams, each under a key (a layer's blob digest)
// and checked against the digest of its content (the layer's diff ID) at
// Seal. The first opener of a key that is not yet complete is the writer
// (the bool result); other openers only read.
type StreamStore interface {
	// Stream opens the stream named key, whose content must hash to
	// content at Seal.
	Stream(key, content digest.Digest) (Stream, bool, error)
}

// MetaStore keeps small derived records (serialized indexes) so that a
// remount or a daemon restart does not rebuild them.
type MetaStore interface {
	PutMeta(name string, data []byte) error
	// GetMeta returns an error satisfying errors.Is(err, fs.ErrNotExist)
	// when name is absent.
	GetMeta(name string) ([]byte, error)
}

// Descriptor describes the layer blob to open, as in an OCI manifest.
type Descriptor struct {
	// Digest is the digest of the blob as stored in the registry.
	Digest digest.Digest
	// Size is the size of the blob in bytes, 0 if unknown. Open refuses
	// a Source of another size, and a streamed blob longer than it.
	Size int64
	// MediaType is the blob's media type from the manifest.
	MediaType string
	// DiffID is the digest of the uncompressed tar (from the image
	// config); required to stream a layer, whose Stream is keys its Stream by it.
	DiffID digest.Digest
	// Annotations are the layer descriptor's annotations, with those the
	// image config holds for the layer (remote.Layer.Annotations).
	Annotations map[string]string
}

var (
	// ErrCorrupt is wrapped by errors about a malformed layer: truncated
	// or corrupt tar or compressed data, an impossible size, a bad TOC.
	ErrCorrupt = errors.New("corrupt layer")
	// ErrVerify is wrapped by errors about content that does not match
	// the digest covering it, even after it was fetched again.
	ErrVerify = errors.New("layer content does not match its digest")
	// ErrUnsupported is wrapped by errors about a layer format or tar
	// feature this package does not serve (e.g. sparse files).
	ErrUnsupported = errors.New("unsupported layer")
)
