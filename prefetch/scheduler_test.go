package prefetch

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
)

func TestReadAheadDedupe(t *testing.T) {
	s, _ := newTestScheduler(t, WithWorkers(1), WithBackgroundWorkers(1), WithSpanSize(100))
	ft := newFake("a", 1000)
	ft.markPresent(rng(300, 100))
	g := newGate(ft)

	s.ReadAhead(ft, rng(0, 400))
	first := g.next(t)
	if first.r != rng(0, 100) {
		t.Fatalf("first fetch %v, want [0,100)", first.r)
	}
	// Running, queued and present spans must all be skipped.
	s.ReadAhead(ft, rng(0, 400))
	s.ReadAhead(ft, rng(100, 50)) // covered by the queued [100,200)
	s.ReadAhead(ft, rng(120, 80)) // its own task, found present when its turn comes
	first.release <- nil
	for _, want := range []Range{rng(100, 100), rng(200, 100)} {
		ev := g.next(t)
		if ev.r != want {
			t.Fatalf("fetch %v, want %v (calls %v)", ev.r, want, ft.Calls())
		}
		ev.release <- nil
	}
	// Present now: nothing is queued again. The marker runs after anything
	// still queued, since one worker takes read-ahead first come first served.
	s.ReadAhead(ft, rng(0, 300))
	s.ReadAhead(ft, rng(900, 100))
	ev := g.next(t)
	if ev.r != rng(900, 100) {
		t.Fatalf("fetch %v, want the marker [900,1000) (calls %v)", ev.r, ft.Calls())
	}
	ev.release <- nil
	want := []Range{rng(0, 100), rng(100, 100), rng(200, 100), rng(900, 100)}
	if got := ft.Calls(); !slices.Equal(got, want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
}

func TestReadAheadWidensQueuedSpan(t *testing.T) {
	s, _ := newTestScheduler(t, WithWorkers(1), WithSpanSize(100))
	ft := newFake("a", 1000)
	g := newGate(ft)
	s.ReadAhead(ft, rng(500, 10)) // occupies the only worker
	blocker := g.next(t)
	s.ReadAhead(ft, rng(0, 30))
	s.ReadAhead(ft, rng(0, 80)) // same key, still queued: widened, not queued twice
	blocker.release <- nil
	if ev := g.next(t); ev.r != rng(0, 80) {
		t.Fatalf("fetch %v, want [0,80)", ev.r)
	} else {
		ev.release <- nil
	}
	s.ReadAhead(ft, rng(900, 1)) // marker
	g.next(t).release <- nil
	if got, want := ft.Calls(), []Range{rng(500, 10), rng(0, 80), rng(900, 1)}; !slices.Equal(got, want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
}

func TestReadAheadOutranksBackground(t *testing.T) {
	s, queued := newTestScheduler(t, WithWorkers(1), WithBackgroundWorkers(1), WithSpanSize(100))
	bg, fg := newFake("bg", 300), newFake("fg", 1000)
	g := newGate(bg, fg)

	errc := goFill(t.Context(), s, bg, []Range{rng(0, 300)}, nil)
	first := g.next(t)
	waitQueued(t, queued, false, 2) // [0,100) taken, [100,200) waiting
	s.ReadAhead(fg, rng(500, 100))
	first.release <- nil

	var order []string
	for range 3 {
		ev := g.next(t)
		order = append(order, ev.t.name+ev.r.String())
		ev.release <- nil
	}
	if err := wait(t, errc, "Fill"); err != nil {
		t.Fatal(err)
	}
	want := []string{"fg[500,600)", "bg[100,200)", "bg[200,300)"}
	if !slices.Equal(order, want) {
		t.Fatalf("order after the first background span: %v, want %v", order, want)
	}
}

func TestReadAheadPromotesQueuedBackground(t *testing.T) {
	s, queued := newTestScheduler(t, WithWorkers(1), WithBackgroundWorkers(1), WithSpanSize(100))
	ft, other := newFake("a", 300), newFake("other", 100)
	g := newGate(ft, other)
	errc := goFill(t.Context(), s, ft, []Range{rng(0, 300)}, nil)
	first := g.next(t)
	waitQueued(t, queued, false, 2)
	s.ReadAhead(other, rng(0, 100))
	s.ReadAhead(ft, rng(100, 100)) // queued for background: promoted behind other
	first.release <- nil
	var order []string
	for range 3 {
		ev := g.next(t)
		order = append(order, ev.t.name+ev.r.String())
		ev.release <- nil
	}
	if err := wait(t, errc, "Fill"); err != nil {
		t.Fatal(err)
	}
	if want := []string{"other[0,100)", "a[100,200)", "a[200,300)"}; !slices.Equal(order, want) {
		t.Fatalf("order %v, want %v", order, want)
	}
	if n := len(ft.Calls()); n != 3 {
		t.Fatalf("%d fetches of a, want 3: %v", n, ft.Calls())
	}
}

func TestBackgroundWorkersLimit(t *testing.T) {
	const bgLimit = 2
	s, queued := newTestScheduler(t, WithWorkers(bgLimit+1), WithBackgroundWorkers(bgLimit), WithSpanSize(10))
	bg, fg := newFake("bg", 200), newFake("fg", 10)
	g := newGate(bg, fg)

	var mu sync.Mutex
	running, maxRunning := 0, 0
	inner := bg.hook
	bg.hook = func(ctx context.Context, r Range) error {
		mu.Lock()
		running++
		maxRunning = max(maxRunning, running)
		mu.Unlock()
		defer func() {
			mu.Lock()
			running--
			mu.Unlock()
		}()
		return inner(ctx, r)
	}

	errc := goFill(t.Context(), s, bg, []Range{rng(0, 200)}, nil)
	var held []fetchEvent
	for range bgLimit {
		held = append(held, g.next(t))
	}
	waitQueued(t, queued, false, 2*bgLimit) // more background spans are waiting
	// The one free worker must serve read-ahead, not a third background span.
	s.ReadAhead(fg, rng(0, 10))
	ev := g.next(t)
	if ev.t != fg {
		t.Fatalf("free worker started %s%v while %d background fetches ran", ev.t.name, ev.r, bgLimit)
	}
	ev.release <- nil
	for _, h := range held {
		h.release <- nil
	}
	for range 20 - bgLimit {
		g.next(t).release <- nil
	}
	if err := wait(t, errc, "Fill"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if maxRunning != bgLimit {
		t.Fatalf("max concurrent background fetches %d, want %d", maxRunning, bgLimit)
	}
	if !bg.Present(0, 200) {
		t.Fatal("Fill returned before the blob was present")
	}
}

func TestFillInModelOrder(t *testing.T) {
	s, _ := newTestScheduler(t, WithWorkers(1), WithBackgroundWorkers(1), WithSpanSize(4<<10))
	files, size := hfModel()
	ranges := ModelOrder(files, size)
	ft := newFake("model", size)
	ft.markPresent(rng(0, 512)) // already cached: counted as done, not fetched

	var progress []int64
	if err := s.Fill(t.Context(), ft, ranges, func(done int64) { progress = append(progress, done) }); err != nil {
		t.Fatal(err)
	}
	var want []Range
	for _, r := range ranges {
		for p := range spans(r, 4<<10) {
			if p != rng(0, 512) {
				want = append(want, p)
			}
		}
	}
	if len(want) < 10 {
		t.Fatalf("only %d spans: the test model is too small to show an order", len(want))
	}
	if got := ft.Calls(); !slices.Equal(got, want) {
		t.Fatalf("fetch order\n got %v\nwant %v", got, want)
	}
	if !ft.Present(0, size) {
		t.Fatal("blob not present after Fill")
	}
	if !slices.IsSorted(progress) || progress[len(progress)-1] != size {
		t.Fatalf("progress %v, want increasing to %d", progress, size)
	}
}

func TestFillRetriesOnce(t *testing.T) {
	s, _ := newTestScheduler(t, WithWorkers(2), WithBackgroundWorkers(2), WithSpanSize(100))
	boom := errors.New("boom")
	for _, tc := range []struct {
		name     string
		failures int
		wantErr  bool
	}{
		{"transient", 1, false},
		{"permanent", 100, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ft := newFake(tc.name, 300)
			var mu sync.Mutex
			left := tc.failures
			ft.hook = func(ctx context.Context, r Range) error {
				mu.Lock()
				defer mu.Unlock()
				if r.Off == 100 && left > 0 {
					left--
					return boom
				}
				return nil
			}
			err := s.Fill(t.Context(), ft, []Range{rng(0, 300)}, nil)
			if tc.wantErr != (err != nil) || (err != nil && !errors.Is(err, boom)) {
				t.Fatalf("Fill: %v, want error %v wrapping %v", err, tc.wantErr, boom)
			}
			n := 0
			for _, c := range ft.Calls() {
				if c.Off == 100 {
					n++
				}
			}
			if n != 2 {
				t.Fatalf("span [100,200) fetched %d times, want 2 (calls %v)", n, ft.Calls())
			}
		})
	}
}

func TestFillCancel(t *testing.T) {
	s, _ := newTestScheduler(t, WithWorkers(2), WithBackgroundWorkers(1), WithSpanSize(100))
	ft := newFake("a", 1000)
	g := newGate(ft)
	ctx, cancel := context.WithCancel(t.Context())
	errc := goFill(ctx, s, ft, []Range{rng(0, 1000)}, nil)
	g.next(t) // running; never released: only the cancel ends it
	cancel()
	if err := wait(t, errc, "Fill"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Fill: %v, want context.Canceled", err)
	}
	// Its queued span was dropped: the scheduler runs the next work at once.
	s.ReadAhead(ft, rng(900, 100))
	if ev := g.next(t); ev.r != rng(900, 100) {
		t.Fatalf("fetch %v after cancel, want the read-ahead [900,1000)", ev.r)
	} else {
		ev.release <- nil
	}
}

func TestReadAheadErrorLoggedAndDropped(t *testing.T) {
	var logs syncBuffer
	s, _ := newTestScheduler(t, WithWorkers(1), WithSpanSize(100), WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	ft := newFake("a", 200)
	boom := errors.New("boom")
	ft.hook = func(ctx context.Context, r Range) error {
		if r.Off == 0 {
			return boom
		}
		return nil
	}
	s.ReadAhead(ft, rng(0, 200))
	// The failed read-ahead is not remembered: a Fill of the same bytes
	// fetches them again, and sees the error itself.
	if err := s.Fill(t.Context(), ft, []Range{rng(0, 100)}, nil); !errors.Is(err, boom) {
		t.Fatalf("Fill: %v, want %v", err, boom)
	}
	if err := s.Fill(t.Context(), ft, []Range{rng(100, 100)}, nil); err != nil {
		t.Fatalf("Fill of the good span: %v", err)
	}
	if n := len(ft.Calls()); n < 3 {
		t.Fatalf("%d fetches, want the failed read-ahead and two Fill attempts: %v", n, ft.Calls())
	}
	s.Close() // the worker has logged once it exits
	if out := logs.String(); !strings.Contains(out, "read-ahead failed") || !strings.Contains(out, "target=a off=0 len=100") {
		t.Fatalf("log %q lacks the failed read-ahead with its fields", out)
	}
}

func TestCloseNoLeaks(t *testing.T) {
	base := runtime.NumGoroutine()
	s := New(WithWorkers(8), WithBackgroundWorkers(2), WithSpanSize(100), WithBackgroundRate(1<<30))
	ft := newFake("a", 10000)
	g := newGate(ft)
	errc := goFill(context.Background(), s, ft, []Range{rng(0, 5000)}, nil)
	s.ReadAhead(ft, rng(5000, 5000))
	for range 8 {
		g.next(t) // all workers busy; more is queued; none is released
	}
	s.Close()
	if err := wait(t, errc, "Fill"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Fill after Close: %v, want ErrClosed", err)
	}
	if err := s.Fill(context.Background(), ft, []Range{rng(0, 10000)}, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Fill on a closed scheduler: %v, want ErrClosed", err)
	}
	s.ReadAhead(ft, rng(0, 10000)) // a no-op, not a panic
	s.Close()                      // idempotent
	checkNoLeaks(t, base)
}

func TestForget(t *testing.T) {
	s, queued := newTestScheduler(t, WithWorkers(1), WithBackgroundWorkers(1), WithSpanSize(100))
	gone, kept := newFake("gone", 1000), newFake("kept", 1000)
	g := newGate(gone, kept)
	s.ReadAhead(gone, rng(0, 300))
	running := g.next(t)
	errc := goFill(t.Context(), s, gone, []Range{rng(500, 100)}, nil)
	waitQueued(t, queued, false, 1)
	s.ReadAhead(kept, rng(0, 100))

	s.Forget(gone)
	wait(t, running.ctx.Done(), "the running read-ahead to be cancelled")
	// The queued read-ahead of gone is dropped; a Fill's span is not.
	var order []string
	for range 2 {
		ev := g.next(t)
		order = append(order, ev.t.name+ev.r.String())
		ev.release <- nil
	}
	if err := wait(t, errc, "Fill"); err != nil {
		t.Fatal(err)
	}
	if want := []string{"kept[0,100)", "gone[500,600)"}; !slices.Equal(order, want) {
		t.Fatalf("fetches after Forget %v, want %v", order, want)
	}
	if got, want := gone.Calls(), []Range{rng(0, 100), rng(500, 100)}; !slices.Equal(got, want) {
		t.Fatalf("fetches of the forgotten target %v, want %v", got, want)
	}
}

// While a reader waits on the registry, background fill starts nothing;
// read-ahead still runs. When the reader is done, background resumes.
func TestDemandHoldsBackBackground(t *testing.T) {
	s, queued := newTestScheduler(t, WithWorkers(2), WithBackgroundWorkers(2), WithSpanSize(100))
	bg, fg := newFake("bg", 200), newFake("fg", 1000)
	g := newGate(bg, fg)

	done := s.Demand()
	errc := goFill(t.Context(), s, bg, []Range{rng(0, 200)}, nil)
	waitQueued(t, queued, false, 2) // idle workers would take these at once
	s.ReadAhead(fg, rng(500, 100))
	ev := g.next(t)
	if ev.t != fg {
		t.Fatalf("while a reader waits, %s%v started; want only read-ahead", ev.t.name, ev.r)
	}
	ev.release <- nil
	done()
	for range 2 {
		ev := g.next(t)
		if ev.t != bg {
			t.Fatalf("after the reader: %s%v, want background", ev.t.name, ev.r)
		}
		ev.release <- nil
	}
	if err := wait(t, errc, "Fill"); err != nil {
		t.Fatal(err)
	}
}
