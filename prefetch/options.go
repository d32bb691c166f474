package prefetch

import "log/slog"

// Option configures a Scheduler made by New.
type Option func(*options)

type options struct {
	workers, backgroundWorkers int
	span                       int64
	backgroundRate             int64
	log                        *slog.Logger
}

// WithWorkers sets how many fetches run at once node-wide, read-ahead and
// background together (default DefaultWorkers).
func WithWorkers(n int) Option { return func(o *options) { o.workers = n } }

// WithBackgroundWorkers sets how many of the workers background fill may
// use at once (default DefaultBackgroundWorkers, at most the workers), so
// read-ahead always finds a free worker.
func WithBackgroundWorkers(n int) Option { return func(o *options) { o.backgroundWorkers = n } }

// WithSpanSize sets the size of one fetch (default DefaultSpanSize). Spans
// are aligned to multiples of it in the blob, so read-ahead and fill of the
// same bytes meet on the same span.
func WithSpanSize(n int64) Option { return func(o *options) { o.span = n } }

// WithBackgroundRate caps background fill node-wide, in bytes per second
// (default 0: unlimited). Read-ahead is never capped: a reader waits for it.
func WithBackgroundRate(bytesPerSecond int64) Option {
	return func(o *options) { o.backgroundRate = bytesPerSecond }
}

// WithLogger sets where read-ahead failures are logged (default
// slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

func makeOptions(opts []Option) options {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if o.workers <= 0 {
		o.workers = DefaultWorkers
	}
	if o.backgroundWorkers <= 0 {
		o.backgroundWorkers = DefaultBackgroundWorkers
	}
	o.backgroundWorkers = min(o.backgroundWorkers, o.workers)
	if o.span <= 0 {
		o.span = DefaultSpanSize
	}
	if o.log == nil {
		o.log = slog.Default()
	}
	return o
}
