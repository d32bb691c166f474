package prefetch

import "sync"

// Sequential watches the reads of one open file, whose bytes are the
// contiguous blob range file, and says what to read ahead. A read that
// starts near where the stream has got to is sequential; each time the
// reader has consumed a whole window, the window doubles, from 2 spans up
// to the maximum. Any other read is random and resets it. Read-ahead is handed out up to span boundaries of the blob as
// the reader advances, so that each fetch the scheduler makes is a whole
// span. It is safe for concurrent use: the
// kernel sends a file's reads concurrently and slightly out of order.
type Sequential struct {
	file      Range
	span      int64
	minWindow int64
	maxWindow int64

	mu     sync.Mutex
	pos    int64 // furthest end read by the stream, relative to file
	issued int64 // end of what has been handed out to read ahead, relative
	window int64
	growAt int64 // the window doubles once the reader reaches this, relative
}

// NewSequential returns a detector for the file occupying file in the
// blob. span is the scheduler's span size and maxWindow the most to read
// ahead of the reader (at least span); 0 takes DefaultSpanSize and
// DefaultMaxWindow.
func NewSequential(file Range, span, maxWindow int64) *Sequential {
	if span <= 0 {
		span = DefaultSpanSize
	}
	if maxWindow <= 0 {
		maxWindow = DefaultMaxWindow
	}
	// Less than a span would never reach a span boundary ahead.
	maxWindow = max(maxWindow, span)
	minWindow := min(2*span, maxWindow)
	return &Sequential{file: file, span: span, minWindow: minWindow, maxWindow: maxWindow, window: minWindow, growAt: minWindow}
}

// Observe records a read of n bytes at off (relative to the file) and
// returns the blob range (absolute) to read ahead; ok is false when the
// read is not sequential or nothing new needs requesting. A file's first
// read at offset 0 counts as sequential.
func (q *Sequential) Observe(off, n int64) (ahead Range, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	end := min(off+n, q.file.Len)
	// Reads in flight together reach us out of order, by up to the
	// kernel's own read-ahead; a span of slack on each side absorbs that.
	if off < q.pos-q.span || off > q.pos+q.span {
		q.window = q.minWindow
		q.pos, q.issued = end, end
		q.growAt = end + q.window
		return Range{}, false
	}
	q.pos = max(q.pos, end)
	// Grow once the reader has consumed a window's worth, not on every
	// read: the kernel sends a window as many reads at once, and doubling
	// on each would fetch far past a reader that stops (one tensor).
	if q.pos >= q.growAt {
		q.window = min(2*q.window, q.maxWindow)
		q.growAt = q.pos + q.window
	}
	q.issued = max(q.issued, q.pos)
	want := q.pos + q.window
	if want < q.file.Len {
		// End on a span boundary of the blob, so the next request starts
		// on one and the scheduler fetches whole spans, not halves of one.
		want = (q.file.Off+want)/q.span*q.span - q.file.Off
	} else {
		want = q.file.Len
	}
	if want <= q.issued {
		return Range{}, false
	}
	ahead = Range{Off: q.file.Off + q.issued, Len: want - q.issued}
	q.issued = want
	return ahead, true
}

// Near reports whether a read at off (relative to the file) continues the
// stream this Sequential follows, so that a caller watching several
// readers of one file can tell them apart.
func (q *Sequential) Near(off int64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return off >= q.pos-q.span && off <= q.pos+q.span
}
