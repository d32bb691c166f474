package prefetch

import (
	"context"
	"fmt"
)

// Fill fetches ranges into t, in the given order, split into spans, at
// background priority: it never starts a span while read-ahead is waiting,
// shares the background workers and rate (WithBackgroundWorkers,
// WithBackgroundRate) with every other Fill, and
// keeps only a few spans queued so the order holds and a read-ahead is
// never stuck behind a long background queue.
//
// progress, when not nil, is called from Fill's goroutine with the number
// of bytes of ranges present so far (fetched, or found present) as spans
// complete. A failed span is retried once; Fill then returns its error.
// Fill returns ctx's error when cancelled, ErrClosed when the Scheduler is
// closed, and nil once every range is present. When it returns, no fetch
// that only it wanted is still running.
func (s *Scheduler) Fill(ctx context.Context, t Target, ranges []Range, progress func(done int64)) error {
	f := &fill{s: s, t: t, size: t.Size(), ranges: ranges}
	limit := 2 * s.opt.backgroundWorkers // a worker freed finds the next span queued
	ch := make(chan result, limit)
	attached := make(map[*waiter]struct{}, limit)
	var (
		done     int64
		firstErr error
		ctxDone  = ctx.Done()
	)
	report := func() {
		if progress != nil {
			progress(done)
		}
	}
	// abandon detaches from every pending span after an error or a cancel.
	abandon := func(err error) {
		firstErr, ctxDone = err, nil
		s.mu.Lock()
		for w := range attached {
			if s.detachLocked(w) {
				delete(attached, w)
			}
		}
		s.mu.Unlock()
	}

	for {
		for len(attached) < limit && firstErr == nil {
			if err := ctx.Err(); err != nil {
				abandon(err)
				break
			}
			p, attempt, ok := f.next()
			if !ok {
				break
			}
			if t.Present(p.Off, p.Len) {
				done += p.Len
				report()
				continue
			}
			if s.limiter != nil {
				if err := s.limiter.WaitN(ctx, int(p.Len)); err != nil {
					abandon(cmpErr(ctx.Err(), fmt.Errorf("prefetch: fill rate limit: %w", err)))
					break
				}
			}
			w := &waiter{ch: ch, attempt: attempt}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				abandon(ErrClosed)
				break
			}
			rest, queued := s.enqueueLocked(t, p, false, w)
			s.mu.Unlock()
			attached[w] = struct{}{}
			if rest.Len > 0 {
				f.push(rest, attempt)
			}
			if queued && s.onQueue != nil {
				s.onQueue(false)
			}
		}
		if len(attached) == 0 {
			return firstErr
		}
		select {
		case r := <-ch:
			delete(attached, r.w)
			switch {
			case r.err == nil:
				done += r.w.piece.Len
				report()
			case firstErr != nil:
				// Draining after an error: the outcome no longer matters.
			case s.isClosed():
				abandon(ErrClosed)
			case ctx.Err() != nil:
				abandon(ctx.Err())
			case r.w.attempt == 0:
				f.push(r.w.piece, 1)
			default:
				abandon(fmt.Errorf("prefetch: fill %s of %s: %w", r.w.piece, targetName(t), r.err))
			}
		case <-ctxDone:
			abandon(ctx.Err())
		}
	}
}

// fill walks a Fill's ranges span by span; retries and the rest of a
// partly covered span go first.
type fill struct {
	s       *Scheduler
	t       Target
	size    int64
	ranges  []Range
	cur     Range // what is left of ranges[0] after the spans handed out
	pending []pendingPiece
}

type pendingPiece struct {
	r       Range
	attempt int
}

func (f *fill) push(r Range, attempt int) {
	f.pending = append(f.pending, pendingPiece{r, attempt})
}

func (f *fill) next() (Range, int, bool) {
	if n := len(f.pending); n > 0 {
		p := f.pending[n-1]
		f.pending = f.pending[:n-1]
		return p.r, p.attempt, true
	}
	for f.cur.Len <= 0 {
		if len(f.ranges) == 0 {
			return Range{}, 0, false
		}
		f.cur = f.ranges[0].clip(f.size)
		f.ranges = f.ranges[1:]
	}
	p := firstSpan(f.cur, f.s.opt.span)
	f.cur = Range{Off: p.End(), Len: f.cur.End() - p.End()}
	return p, 0, true
}
