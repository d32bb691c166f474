package prefetch

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"iter"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// ErrClosed is returned by Fill once the Scheduler is closed.
var ErrClosed = errors.New("prefetch: scheduler closed")

// Scheduler runs the fetches ahead of readers for every Target of the
// process: one per process, so the caps it enforces are node-wide. It keeps
// two queues of span fetches. Read-ahead is served first by any worker;
// background fill is started only when no read-ahead is waiting and fewer
// than the background workers (WithBackgroundWorkers) run. A span queued or in flight
// for a (target, offset) is never queued twice.
//
// Targets are used as map keys, so they must be comparable (a pointer, as
// *cache.Blob is).
type Scheduler struct {
	opt     options
	limiter *rate.Limiter // nil when the background rate is unlimited
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	mu        sync.Mutex
	cond      *sync.Cond // signalled when work is queued or a background slot frees
	closed    bool
	high, low list.List // of *task, oldest first
	tasks     map[taskKey]*task
	bgRunning int
	demand    int // readers waiting on the registry: background holds back
	// quietUntil: background starts nothing before this, a short while
	// after the last reader's miss; quietTimer wakes the workers then.
	quietUntil time.Time
	quietTimer *time.Timer

	// onQueue, set by tests before use, is called after a span is queued.
	onQueue func(high bool)
}

type taskKey struct {
	t   Target
	off int64
}

// task is one span fetch, queued or running.
type task struct {
	t         Target
	off, end  int64
	high      bool          // in (or taken from) the read-ahead queue
	readahead bool          // read-ahead asked for it: its errors are logged
	bg        bool          // running in a background slot
	elem      *list.Element // its place in a queue while queued
	cancel    context.CancelFunc
	done      bool
	waiters   []*waiter
}

// waiter is one Fill's interest in a task's outcome.
type waiter struct {
	ch      chan<- result // buffered: a worker's send never blocks
	tk      *task
	piece   Range // the part of the Fill's ranges the task covers
	attempt int
}

type result struct {
	w   *waiter
	err error
}

// New starts the workers of a Scheduler; Close stops them.
func New(opts ...Option) *Scheduler {
	opt := makeOptions(opts)
	s := &Scheduler{opt: opt, tasks: make(map[taskKey]*task)}
	s.cond = sync.NewCond(&s.mu)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if opt.backgroundRate > 0 {
		// The burst must hold one span, or WaitN would refuse it.
		s.limiter = rate.NewLimiter(rate.Limit(opt.backgroundRate), int(opt.span))
	}
	for range opt.workers {
		s.wg.Go(s.work)
	}
	return s
}

// Close stops the workers: queued spans are dropped (Fills waiting on them
// return ErrClosed), running fetches have their contexts cancelled, and
// Close returns once every worker has exited.
func (s *Scheduler) Close() {
	s.mu.Lock()
	var orphans []*waiter
	if !s.closed {
		s.closed = true
		s.cancel()
		for _, q := range []*list.List{&s.high, &s.low} {
			for e := q.Front(); e != nil; e = e.Next() {
				tk := e.Value.(*task)
				tk.elem, tk.done = nil, true
				orphans = append(orphans, tk.waiters...)
				tk.waiters = nil
				delete(s.tasks, taskKey{tk.t, tk.off})
			}
			q.Init()
		}
		s.cond.Broadcast()
	}
	s.mu.Unlock()
	for _, w := range orphans {
		w.ch <- result{w, ErrClosed}
	}
	s.wg.Wait()
}

// Demand tells the scheduler that a reader is waiting on the registry
// (a cache miss): no background span starts until every such reader has
// called the returned function, so that the bandwidth and CPU go to it.
func (s *Scheduler) Demand() (done func()) {
	s.mu.Lock()
	s.demand++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.demand--
			s.hushLocked()
			s.mu.Unlock()
		})
	}
}

// quiet is how long background fill waits after a reader's last miss: a
// reader that misses comes back in bursts (the kernel's read-ahead
// windows, one tensor after another), and a background span started
// between two of them competes with the next for bandwidth and CPU. A
// reader that read-ahead keeps ahead of does not miss, and background runs
// beside it.
const quiet = 50 * time.Millisecond

// hushLocked starts or extends the quiet period. Callers hold s.mu.
func (s *Scheduler) hushLocked() {
	s.quietUntil = time.Now().Add(quiet)
	if s.quietTimer == nil {
		s.quietTimer = time.AfterFunc(quiet, s.wakeAfterQuiet)
	}
}

// quietLocked reports whether background must wait; past the quiet period
// it is not. Callers hold s.mu.
func (s *Scheduler) quietLocked() bool {
	return time.Now().Before(s.quietUntil)
}

// wakeAfterQuiet wakes the workers at the end of the quiet period, or
// re-arms itself if the period was extended meanwhile.
func (s *Scheduler) wakeAfterQuiet() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if left := time.Until(s.quietUntil); left > 0 && !s.closed {
		s.quietTimer = time.AfterFunc(left, s.wakeAfterQuiet)
		return
	}
	s.quietTimer = nil
	s.cond.Broadcast()
}

// ReadAhead queues fetches of r, split into spans, ahead of all background
// work, and returns at once. Spans already present, queued or in flight are
// skipped; a span queued for background fill is promoted. A failed
// read-ahead is logged and dropped: the reader fetches the range itself and
// sees the error then.
func (s *Scheduler) ReadAhead(t Target, r Range) {
	r = r.clip(t.Size())
	for p := range spans(r, s.opt.span) {
		if t.Present(p.Off, p.Len) {
			continue
		}
		queued := false
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return
		}
		for p.Len > 0 {
			var q bool
			p, q = s.enqueueLocked(t, p, true, nil)
			queued = queued || q
		}
		s.mu.Unlock()
		if queued && s.onQueue != nil {
			s.onQueue(true)
		}
	}
}

// Forget drops the read-ahead queued for t and cancels the read-ahead of t
// in flight, without waiting: for a target about to be closed, whose
// readers are gone. Spans a Fill waits for are left to that Fill, which its
// caller ends by cancelling its context.
func (s *Scheduler) Forget(t Target) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, tk := range s.tasks {
		if k.t != t || len(tk.waiters) > 0 {
			continue
		}
		delete(s.tasks, k)
		if tk.elem != nil {
			if tk.high {
				s.high.Remove(tk.elem)
			} else {
				s.low.Remove(tk.elem)
			}
			tk.elem, tk.done = nil, true
		} else {
			tk.cancel()
		}
	}
}

// enqueueLocked makes a task cover the start of p: a new one, or the
// task already queued or running at p.Off. A queued task is widened to p
// and, for read-ahead, promoted; a running task shorter than p leaves
// the rest of p, which is returned (Len 0 when there is none). w, when not
// nil, is attached to the task that covers p. s.mu must be held.
func (s *Scheduler) enqueueLocked(t Target, p Range, high bool, w *waiter) (rest Range, queued bool) {
	k := taskKey{t, p.Off}
	tk := s.tasks[k]
	switch {
	case tk == nil:
		tk = &task{t: t, off: p.Off, end: p.End(), high: high}
		if high {
			tk.elem = s.high.PushBack(tk)
		} else {
			tk.elem = s.low.PushBack(tk)
		}
		s.tasks[k] = tk
		queued = true
	case tk.elem != nil:
		tk.end = max(tk.end, p.End())
		if high && !tk.high {
			s.low.Remove(tk.elem)
			tk.elem, tk.high = s.high.PushBack(tk), true
			queued = true
		}
	case p.End() > tk.end:
		rest = Range{Off: tk.end, Len: p.End() - tk.end}
		p.Len = tk.end - p.Off
	}
	if high {
		tk.readahead = true
	}
	if w != nil {
		w.tk, w.piece = tk, p
		tk.waiters = append(tk.waiters, w)
	}
	if queued {
		s.cond.Signal()
	}
	return rest, queued
}

// work runs queued tasks until Close.
func (s *Scheduler) work() {
	for {
		s.mu.Lock()
		for !s.closed && s.high.Len() == 0 &&
			(s.low.Len() == 0 || s.bgRunning >= s.opt.backgroundWorkers || s.demand > 0 || s.quietLocked()) {
			s.cond.Wait()
		}
		if s.closed {
			s.mu.Unlock()
			return
		}
		var tk *task
		if s.high.Len() > 0 {
			tk = s.high.Remove(s.high.Front()).(*task)
		} else {
			tk = s.low.Remove(s.low.Front()).(*task)
			tk.bg = true
			s.bgRunning++
		}
		tk.elem = nil
		ctx, cancel := context.WithCancel(s.ctx)
		tk.cancel = cancel
		r := Range{Off: tk.off, Len: tk.end - tk.off}
		s.mu.Unlock()

		// Another task may have fetched these bytes while this one waited.
		var err error
		if !tk.t.Present(r.Off, r.Len) {
			err = tk.t.Fetch(ctx, r.Off, r.Len)
		}
		cancelled := ctx.Err() != nil // its error is no failure of the fetch
		cancel()

		s.mu.Lock()
		if tk.bg {
			s.bgRunning--
			if s.low.Len() > 0 {
				s.cond.Signal()
			}
		}
		if k := (taskKey{tk.t, tk.off}); s.tasks[k] == tk {
			delete(s.tasks, k)
		}
		tk.done = true
		waiters, readahead := tk.waiters, tk.readahead
		tk.waiters = nil
		closed := s.closed
		s.mu.Unlock()

		for _, w := range waiters {
			w.ch <- result{w, err}
		}
		if err != nil && readahead && !closed && !cancelled {
			s.opt.log.Warn("prefetch: read-ahead failed",
				"target", targetName(tk.t), "off", r.Off, "len", r.Len, "err", err)
		}
	}
}

// detachLocked withdraws w from its task, dropping a queued task nobody
// else wants and cancelling a running one. It reports whether w is gone;
// when not, the task's result is still to come to w. s.mu must be held.
func (s *Scheduler) detachLocked(w *waiter) bool {
	tk := w.tk
	if tk.done {
		return false
	}
	if len(tk.waiters) > 1 || tk.readahead {
		tk.waiters = deleteWaiter(tk.waiters, w)
		return true
	}
	delete(s.tasks, taskKey{tk.t, tk.off})
	if tk.elem != nil {
		if tk.high {
			s.high.Remove(tk.elem)
		} else {
			s.low.Remove(tk.elem)
		}
		tk.elem, tk.done, tk.waiters = nil, true, nil
		return true
	}
	tk.cancel()
	return false
}

func (s *Scheduler) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// firstSpan returns the start of r up to the next multiple of span.
func firstSpan(r Range, span int64) Range {
	end := min((r.Off/span+1)*span, r.End())
	return Range{Off: r.Off, Len: end - r.Off}
}

// spans splits r at multiples of span.
func spans(r Range, span int64) iter.Seq[Range] {
	return func(yield func(Range) bool) {
		for r.Len > 0 {
			p := firstSpan(r, span)
			if !yield(p) {
				return
			}
			r = Range{Off: p.End(), Len: r.End() - p.End()}
		}
	}
}

func deleteWaiter(ws []*waiter, w *waiter) []*waiter {
	for i, x := range ws {
		if x == w {
			return append(ws[:i], ws[i+1:]...)
		}
	}
	return ws
}

// cmpErr returns the first non-nil error.
func cmpErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// targetName names a target in logs and errors.
func targetName(t Target) string {
	if s, ok := t.(fmt.Stringer); ok {
		return s.String()
	}
	return fmt.Sprintf("%T(%p)", t, t)
}

// SpanSize is the size of one fetch: read-ahead is handed out in spans.
func (s *Scheduler) SpanSize() int64 { return s.opt.span }
