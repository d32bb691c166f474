package cache

import (
	"fmt"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
)

// Option tunes a Store.
type Option func(*options)

type options struct {
	maxBytes  int64
	chunkSize int64
	maxFetch  int64
}

const (
	defaultChunkSize = 1 << 20
	defaultMaxFetch  = 8 << 20
)

// WithMaxBytes bounds the data kept on disk; 0, the default, means
// unbounded. Data that no open Blob or Stream holds is evicted
// least-recently-used first; data that is held is never evicted, so the
// bound can be exceeded while it is.
func WithMaxBytes(n int64) Option {
	return func(o *options) { o.maxBytes = n }
}

// WithChunkSize sets the unit of presence tracking and fetching; default
// 1 MiB. Blobs cached with another chunk size are discarded on open.
func WithChunkSize(n int64) Option {
	return func(o *options) { o.chunkSize = n }
}

// WithMaxFetch sets the largest range one FetchFunc call is asked for when
// contiguous missing chunks are coalesced; default 8 MiB, and at least the
// chunk size.
func WithMaxFetch(n int64) Option {
	return func(o *options) { o.maxFetch = n }
}

func newOptions(opts []Option) (options, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if o.chunkSize == 0 {
		o.chunkSize = defaultChunkSize
	}
	if o.maxFetch == 0 {
		o.maxFetch = max(defaultMaxFetch, o.chunkSize)
	}
	if o.chunkSize < 0 || o.maxBytes < 0 || o.maxFetch < o.chunkSize {
		return o, fmt.Errorf("cache: invalid options: max bytes %d, chunk size %d, max fetch %d", o.maxBytes, o.chunkSize, o.maxFetch)
	}
	return o, nil
}

// BlobOption tunes one handle opened by Store.Blob.
type BlobOption func(*blobOptions)

type blobOptions struct {
	want  digest.Digest
	table *chunks.Table
	reuse bool
}

// WithContentDigest names the digest the whole content must hash to when
// the key is not it (by default it is the key): a caller that keeps bytes
// from a source it does not trust under a key of its own, namespaced by
// where they came from, still verifies them against the blob's digest.
// Every handle of a key must give the same content digest.
func WithContentDigest(d digest.Digest) BlobOption {
	return func(o *blobOptions) { o.want = d }
}

// WithTable makes t, the chunk table the image's manifest pins for the
// blob, the unit of trust of the handle: every range it fetches is widened
// to whole table chunks, each checked against t before any of its bytes
// is stored or served, and bytes stored by an earlier process are checked
// against t before they are served. The table must describe the blob's
// size, in chunks that are a multiple of the store's chunk size (else an
// error wrapping ErrTable), and be the table of every other handle of the
// key that has one (else ErrTableConflict). The cache keeps t: it must
// not change afterwards.
func WithTable(t *chunks.Table) BlobOption {
	return func(o *blobOptions) { o.table = t }
}

// WithReuseAfterVerify is for a handle without a table, whose bytes are
// served before the whole content is verified: bytes stored by an earlier
// process are served only once the whole content has verified, in this
// process or the one that stored them (a read of them waits for that, and
// fetches what it takes); bytes fetched by this process are served as
// they arrive. So what a restart finds on disk unverified is never served
// unverified again.
func WithReuseAfterVerify() BlobOption {
	return func(o *blobOptions) { o.reuse = true }
}

// StreamOption tunes one handle opened by Store.Stream.
type StreamOption func(*streamOptions)

type streamOptions struct {
	want digest.Digest
}

// WithStreamDigest names the digest the content must hash to when the key
// is not it (by default it is the key): a decompressed layer kept under
// its compressed blob's digest is verified against its diff ID. Every
// handle of a key must give the same digest.
func WithStreamDigest(d digest.Digest) StreamOption {
	return func(o *streamOptions) { o.want = d }
}

// validDigest reports whether d is a digest the cache can verify content
// against.
func validDigest(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return err
	}
	if !d.Algorithm().Available() {
		return fmt.Errorf("%s: digest algorithm unavailable", d)
	}
	return nil
}
