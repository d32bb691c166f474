package lazy

import (
	"context"
	"os"
	"sync"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/prefetch"
)

// readAround is the layer.Source of a layer: its cached blob, with what a
// miss does. A read that misses the cache holds back background fill
// while it waits, and fetches the missSpan around it, then queues the
// rest of its span: weight files are read in large pieces (a tensor, the
// kernel's read-ahead), so the next read of a cold region is most likely
// close by, and one range request of a span costs the registry little
// more than one of a chunk. Small reads (headers, config files) fetch
// only their chunk at once and leave the span to the scheduler.
type readAround struct {
	*cache.Blob
	sched *prefetch.Scheduler

	mu        sync.Mutex
	deferring bool             // read-ahead is held back (see startReadAhead)
	deferred  []prefetch.Range // and these spans wait for it
}

var _ layer.FileSource = (*readAround)(nil)

// readAhead queues rg for the scheduler, or keeps it for startReadAhead.
func (r *readAround) readAhead(rg prefetch.Range) {
	r.mu.Lock()
	if r.deferring {
		r.deferred = append(r.deferred, rg)
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	r.sched.ReadAhead(r.Blob, rg)
}

// startReadAhead ends the deferral and queues the spans held back.
func (r *readAround) startReadAhead() {
	r.mu.Lock()
	held := r.deferred
	r.deferring, r.deferred = false, nil
	r.mu.Unlock()
	for _, rg := range held {
		r.sched.ReadAhead(r.Blob, rg)
	}
}

func (r *readAround) isDeferring() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.deferring
}

func (r *readAround) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	done, err := r.around(ctx, off, int64(len(p)))
	defer done()
	if err != nil {
		return 0, err
	}
	return r.Blob.ReadAt(ctx, p, off)
}

func (r *readAround) ReadFile(ctx context.Context, off, n int64) (*os.File, int64, func(), error) {
	done, err := r.around(ctx, off, n)
	defer done()
	if err != nil {
		return nil, 0, nil, err
	}
	return r.Blob.ReadFile(ctx, off, n)
}

// around prepares a read of [off, off+n): nothing if it is cached, else
// the fetch of its span, now or (small reads) after the read.
func (r *readAround) around(ctx context.Context, off, n int64) (done func(), err error) {
	if r.Present(off, n) {
		return func() {}, nil
	}
	demandDone := r.sched.Demand()
	span := r.sched.SpanSize()
	start := off / span * span
	end := min(r.Size(), (off+n+span-1)/span*span)
	ahead := func() {
		r.readAhead(prefetch.Range{Off: start, Len: end - start})
		demandDone()
	}
	if n <= smallRead {
		// After the read's own chunk has come: queued first, a span
		// fetch would take that chunk along and make the read wait for
		// the whole span.
		return ahead, nil
	}
	if r.isDeferring() {
		return demandDone, nil // the read fetches its own chunks
	}
	// A span is fetched in one request as several runs, and a Fetch
	// returns when all have come: the read waits for the missSpan around
	// it (at most its span), and the rest of its span follows as
	// read-ahead.
	wait := min(missSpan, span)
	ms := off / wait * wait
	me := min(r.Size(), (off+n+wait-1)/wait*wait)
	return ahead, r.Blob.Fetch(ctx, ms, me-ms)
}
