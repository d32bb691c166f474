package cache

import "fmt"

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
