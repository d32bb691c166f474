package prefetch

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// failAfter bounds a wait that only a bug makes long: a receive that should
// already be possible fails the test instead of hanging it.
const failAfter = 10 * time.Second

// fakeTarget is an in-memory Target: a per-byte presence map and a fetch
// hook the test controls. Every Fetch call is recorded before the hook runs.
type fakeTarget struct {
	name string
	size int64

	mu      sync.Mutex
	present []bool
	calls   []Range
	hook    func(ctx context.Context, r Range) error // nil: succeed at once
}

func newFake(name string, size int64) *fakeTarget {
	return &fakeTarget{name: name, size: size, present: make([]bool, size)}
}

func (f *fakeTarget) String() string { return f.name }

func (f *fakeTarget) Size() int64 { return f.size }

func (f *fakeTarget) Present(off, n int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := max(off, 0); i < min(off+n, f.size); i++ {
		if !f.present[i] {
			return false
		}
	}
	return true
}

func (f *fakeTarget) Fetch(ctx context.Context, off, n int64) error {
	r := Range{Off: off, Len: n}
	f.mu.Lock()
	f.calls = append(f.calls, r)
	hook := f.hook
	f.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, r); err != nil {
			return err
		}
	}
	f.markPresent(r)
	return nil
}

func (f *fakeTarget) markPresent(r Range) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := r.Off; i < min(r.End(), f.size); i++ {
		f.present[i] = true
	}
}

func (f *fakeTarget) Calls() []Range {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// fetchEvent is one fetch that has started and waits for the test.
type fetchEvent struct {
	t       *fakeTarget
	r       Range
	ctx     context.Context // the fetch's
	release chan error      // send the fetch's outcome (nil: success)
}

// gate makes every fetch of the targets it is installed on announce itself
// on started and wait until the test releases it or its context ends.
type gate struct {
	started chan fetchEvent
}

func newGate(targets ...*fakeTarget) *gate {
	g := &gate{started: make(chan fetchEvent, 64)}
	for _, t := range targets {
		t.hook = func(ctx context.Context, r Range) error {
			ev := fetchEvent{t: t, r: r, ctx: ctx, release: make(chan error, 1)}
			g.started <- ev
			select {
			case err := <-ev.release:
				return err
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	return g
}

// next returns the next fetch to start.
func (g *gate) next(t *testing.T) fetchEvent {
	t.Helper()
	select {
	case ev := <-g.started:
		return ev
	case <-time.After(failAfter):
		t.Fatal("no fetch started")
		return fetchEvent{}
	}
}

// newTestScheduler returns a Scheduler closed at the end of the test, with
// queue events (true: read-ahead) delivered on the returned channel.
// The channel holds the first 1024 events; later ones are dropped.
func newTestScheduler(t testing.TB, opts ...Option) (*Scheduler, <-chan bool) {
	t.Helper()
	s := New(opts...)
	queued := make(chan bool, 1024)
	s.onQueue = func(high bool) {
		select {
		case queued <- high:
		default: // a test that waits for events reads them long before this fills
		}
	}
	t.Cleanup(s.Close)
	return s, queued
}

// waitQueued waits for n queue events of the given priority.
func waitQueued(t *testing.T, queued <-chan bool, high bool, n int) {
	t.Helper()
	for n > 0 {
		select {
		case h := <-queued:
			if h == high {
				n--
			}
		case <-time.After(failAfter):
			t.Fatalf("still waiting for %d queue events (high=%v)", n, high)
		}
	}
}

// goFill runs Fill in a goroutine and returns its result channel.
func goFill(ctx context.Context, s *Scheduler, t Target, ranges []Range, progress func(int64)) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- s.Fill(ctx, t, ranges, progress) }()
	return errc
}

func wait[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(failAfter):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}

// checkNoLeaks fails the test when the goroutine count does not come back
// to base. Goroutines that have finished their work may not have exited
// yet, hence a bounded poll.
func checkNoLeaks(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(failAfter)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, want %d:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
}

func rng(off, n int64) Range { return Range{Off: off, Len: n} }

func fmtRanges(rs []Range) string { return fmt.Sprint(rs) }

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
