package cache

import (
	"fmt"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
)

// Option tunes a Store.
type Option func(*options)

type options struct {
	maxBytes     int64
	maxShare     float64
	minFree      int64
	minFreeShare float64
	chunkSize    int64
	maxFetch     int64
	// statfs and statfsEvery are replaced by tests: they say what the
	// file system holding the store looks like, without needing one.
	statfs      func(dir string) (fsStat, error)
	statfsEvery time.Duration
}

const (
	defaultChunkSize = 1 << 20
	defaultMaxFetch  = 8 << 20
	// defaultStatfsEvery is how long a look at the file system's free
	// space is trusted, corrected by what the store wrote and removed
	// since: others' writes are seen that late.
	defaultStatfsEvery = time.Second
)

// WithMaxBytes bounds the data kept on disk; 0, the default, means
// unbounded. Data that no open Blob or Stream holds is evicted
// least-recently-used first; data that is held is never evicted, so the
// bound can be exceeded while it is.
func WithMaxBytes(n int64) Option {
	return func(o *options) { o.maxBytes = n }
}

// WithMaxShare bounds the data kept on disk to share (0 < share ≤ 1) of
// the size of the file system the store lives on, as found at Open. With
// WithMaxBytes too, the smaller bound holds. Eviction is as WithMaxBytes's.
func WithMaxShare(share float64) Option {
	return func(o *options) { o.maxShare = share }
}

// WithMinFree keeps at least n bytes free on the file system the store
// lives on: when less is free, whoever filled it, data no open Blob or
// Stream holds is evicted, least-recently-used first, until n bytes are
// free again or nothing more can go. The free space is looked at after
// writes and every statfsEvery. 0, the default, keeps no floor.
func WithMinFree(n int64) Option {
	return func(o *options) { o.minFree = n }
}

// WithMinFreeShare is WithMinFree of share (0 < share ≤ 1) of the file
// system's size, as found at Open. With WithMinFree too, the larger floor
// holds.
func WithMinFreeShare(share float64) Option {
	return func(o *options) { o.minFreeShare = share }
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
	if o.statfs == nil {
		o.statfs = statfs
	}
	if o.statfsEvery == 0 {
		o.statfsEvery = defaultStatfsEvery
	}
	if o.chunkSize < 0 || o.maxBytes < 0 || o.maxFetch < o.chunkSize || o.minFree < 0 {
		return o, fmt.Errorf("cache: invalid options: max bytes %d, min free %d, chunk size %d, max fetch %d", o.maxBytes, o.minFree, o.chunkSize, o.maxFetch)
	}
	if !validShare(o.maxShare) || !validShare(o.minFreeShare) {
		return o, fmt.Errorf("cache: invalid options: max share %v, min free share %v: want a fraction in [0, 1]", o.maxShare, o.minFreeShare)
	}
	return o, nil
}

// BlobOption tunes one handle opened by Store.Blob.
type BlobOption func(*blobOptions)

type blobOptions struct {
	want  digest.Digest
	table *chunks.Table
	reuse bool
	open  RangeReaderFunc
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

// WithRangeReader gives the handle a second way to fetch: open reads n
// bytes at off in one request. A Fetch of several runs of missing chunks
// (read-ahead, background fill) then claims them all and fetches them
// through one reader, each run stored, checked and served as its bytes
// arrive, in a buffer of one run: a registry's work per request (the CNCF
// registry's was about half its CPU per byte at 8 MiB ranges) is paid once
// for them. Reads, and a chunk that fails its check, still use the
// FetchFunc.
func WithRangeReader(open RangeReaderFunc) BlobOption {
	return func(o *blobOptions) { o.open = open }
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
