package lazy

import (
	"os"
	"time"

	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
)

// Tuning. Each is a trade-off measured on weight files; the reasons are
// where they are used.
const (
	// passthroughMin is the smallest file that gets a cache file of its
	// own, to be passed through once cached: weight files, not the many
	// small ones, whose reads the page cache absorbs anyway.
	passthroughMin = 4 << 20
	// fillDelay is how long after its first mount a layer nobody reads
	// waits before its background fill starts. A pull is followed by the
	// creation of the containers that use the image, which needs the
	// node's CPU; the first read of the layer starts the fill at once.
	fillDelay = 2 * time.Second
	// maxWarming bounds the layers Warm opens at once.
	maxWarming = 4
	// defaultWarmHold is how long a layer opened by Warm stays open for
	// the mount it was opened for.
	defaultWarmHold = time.Minute
	// closeGrace bounds how long Close waits for the FUSE servers of the
	// layers it unmounted to exit: moments, unless something still holds
	// a layer, which can be for ever.
	closeGrace = time.Second
	// smallRead is the largest read a cache miss serves before the rest
	// of its span (see source.go).
	smallRead = 64 << 10
	// missSpan is what a larger read that misses the cache waits for,
	// aligned around it: the cache's largest run, which lands as one.
	missSpan = 8 << 20
)

// Option configures a Manager made by New.
type Option func(*options)

type options struct {
	prefetch       []prefetch.Option
	maxReadAhead   int64
	backgroundFill bool
	passthrough    bool
	warmHold       time.Duration
	unverified     Unverified
	expansion      int64 // layer.WithMaxExpansion's ratio; 0: its default
	streamMax      int64 // and its limit; 0: half the cache
	holder         Holder
	stateDir       string
	local          remote.LocalContent
}

// Holder keeps the FUSE connections of mounts alive across restarts of
// the process serving them; *holder.Client is one.
type Holder interface {
	Put(key string, meta []byte, f *os.File) error
	Drop(key string) error
}

// WithHolder hands the connection of every mount to h, under its
// mountpoint, so that a successor of this process can Resume it; the
// open tables of the mounts (see fs.WithOpenTable) are kept in stateDir.
func WithHolder(h Holder, stateDir string) Option {
	return func(o *options) { o.holder, o.stateDir = h, stateDir }
}

// WithLocalContent has an image's resolve take its manifest and config
// from local, content this node already holds by digest (containerd's
// content store), before it asks the registry: see remote.WithLocalContent.
// The context of a Mount or Warm reaches local.
func WithLocalContent(local remote.LocalContent) Option {
	return func(o *options) { o.local = local }
}

// WithPrefetch configures the node-wide read-ahead and fill scheduler.
func WithPrefetch(opts ...prefetch.Option) Option {
	return func(o *options) { o.prefetch = append(o.prefetch, opts...) }
}

// WithMaxReadAhead bounds how far ahead of a sequential reader fetches go
// (default prefetch.DefaultMaxWindow).
func WithMaxReadAhead(n int64) Option { return func(o *options) { o.maxReadAhead = n } }

// WithBackgroundFill turns on or off fetching whole layers into the cache
// after they are mounted (default on).
func WithBackgroundFill(on bool) Option { return func(o *options) { o.backgroundFill = on } }

// WithPassthrough turns on or off FUSE passthrough of the large files of a
// layer cached whole and verified (default on).
func WithPassthrough(on bool) Option { return func(o *options) { o.passthrough = on } }

// WithWarmHold sets how long a layer opened by Warm stays open, waiting
// for its mount (default one minute).
func WithWarmHold(d time.Duration) Option { return func(o *options) { o.warmHold = d } }

// WithUnverifiedLayers sets what is done with a layer that only its blob
// digest covers (default UnverifiedRefuse).
func WithUnverifiedLayers(u Unverified) Option { return func(o *options) { o.unverified = u } }

// WithMaxExpansion bounds what a streamed gzip or zstd layer may
// decompress to: ratio times its blob, and limit bytes in all (0: the
// layer package's default ratio; half the cache's capacity), so that a
// small bomb cannot evict every cached model.
func WithMaxExpansion(ratio, limit int64) Option {
	return func(o *options) { o.expansion, o.streamMax = ratio, limit }
}

func makeOptions(opts []Option) options {
	o := options{backgroundFill: true, passthrough: true}
	for _, opt := range opts {
		opt(&o)
	}
	if o.maxReadAhead <= 0 {
		o.maxReadAhead = prefetch.DefaultMaxWindow
	}
	if o.warmHold <= 0 {
		o.warmHold = defaultWarmHold
	}
	return o
}
