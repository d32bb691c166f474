package refmap

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// counter is a value type whose opens and closes are counted.
type counter struct {
	mu     sync.Mutex
	opens  int
	closes []string
}

func (c *counter) open(v string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) {
		c.mu.Lock()
		c.opens++
		c.mu.Unlock()
		return v, nil
	}
}

func (c *counter) close(k, v string) {
	c.mu.Lock()
	c.closes = append(c.closes, k)
	c.mu.Unlock()
}

func (c *counter) counts() (int, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.opens, len(c.closes)
}

func TestSharedOpenClosesOnLastRelease(t *testing.T) {
	var c counter
	m := New(c.close)
	ctx := context.Background()
	a, err := m.Acquire(ctx, "k", c.open("v1"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Acquire(ctx, "k", c.open("v2"))
	if err != nil {
		t.Fatal(err)
	}
	if a.Value() != "v1" || b.Value() != "v1" {
		t.Fatalf("values %q, %q: want the first open's for both", a.Value(), b.Value())
	}
	if n := m.Refs("k"); n != 2 {
		t.Fatalf("Refs = %d with two references, want 2", n)
	}
	a.Release()
	a.Release() // a second release of one Ref does not count
	if n := m.Refs("k"); n != 1 {
		t.Fatalf("Refs = %d after one of two releases, want 1", n)
	}
	if opens, closes := c.counts(); opens != 1 || closes != 0 {
		t.Fatalf("after one of two releases: %d opens, %d closes; want 1, 0", opens, closes)
	}
	if got := m.Open(); !slices.Equal(got, []string{"k"}) {
		t.Fatalf("Open() = %v", got)
	}
	b.Release()
	if opens, closes := c.counts(); opens != 1 || closes != 1 {
		t.Fatalf("after the last release: %d opens, %d closes; want 1, 1", opens, closes)
	}
	if got := m.Open(); len(got) != 0 {
		t.Fatalf("Open() = %v after the last release", got)
	}
	if n := m.Refs("k"); n != 0 {
		t.Fatalf("Refs = %d after the last release, want 0", n)
	}
	r, err := m.Acquire(ctx, "k", c.open("v3"))
	if err != nil || r.Value() != "v3" {
		t.Fatalf("reopen: %v, %v; want a new open", r, err)
	}
	r.Release()
}

func TestConcurrentAcquireOpensOnce(t *testing.T) {
	var c counter
	m := New(c.close)
	gate := make(chan struct{})
	var opens atomic.Int32
	open := func(context.Context) (string, error) {
		opens.Add(1)
		<-gate
		return "v", nil
	}
	var wg sync.WaitGroup
	refs := make([]*Ref[string, string], 8)
	for i := range refs {
		wg.Go(func() {
			r, err := m.Acquire(context.Background(), "k", open)
			if err != nil {
				t.Error(err)
				return
			}
			refs[i] = r
		})
	}
	close(gate)
	wg.Wait()
	if n := opens.Load(); n != 1 {
		t.Fatalf("%d opens for 8 concurrent acquires", n)
	}
	for _, r := range refs {
		r.Release()
	}
	if _, closes := c.counts(); closes != 1 {
		t.Fatalf("%d closes, want 1", closes)
	}
}

func TestFailedOpenIsNotKept(t *testing.T) {
	var c counter
	m := New(c.close)
	boom := errors.New("boom")
	_, err := m.Acquire(context.Background(), "k", func(context.Context) (string, error) { return "", boom })
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want boom", err)
	}
	r, err := m.Acquire(context.Background(), "k", c.open("v"))
	if err != nil || r.Value() != "v" {
		t.Fatalf("after a failed open: %v, %v", r, err)
	}
	r.Release()
	if _, closes := c.counts(); closes != 1 {
		t.Fatalf("%d closes: a failed open must not be closed, the good one must", closes)
	}
}

// A waiter must not inherit the error of an opener whose context ended:
// it opens the key itself.
func TestCancelledOpenerDoesNotFailWaiters(t *testing.T) {
	var c counter
	m := New(c.close)
	openerCtx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	opener := func(ctx context.Context) (string, error) {
		close(started)
		<-ctx.Done()
		return "", ctx.Err()
	}
	errc := make(chan error, 1)
	go func() {
		_, err := m.Acquire(openerCtx, "k", opener)
		errc <- err
	}()
	<-started
	type result struct {
		r   *Ref[string, string]
		err error
	}
	waiter := make(chan result, 1)
	go func() {
		r, err := m.Acquire(context.Background(), "k", c.open("mine"))
		waiter <- result{r, err}
	}()
	// The waiter may take its reference before or after the cancel; both
	// orders must end with the waiter opening the key itself.
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("opener: %v, want its own cancellation", err)
	}
	res := <-waiter
	if res.err != nil || res.r.Value() != "mine" {
		t.Fatalf("waiter got %v, %v; want its own open", res.r, res.err)
	}
	res.r.Release()
}

func TestAcquireWhileClosingWaitsAndReopens(t *testing.T) {
	closing := make(chan struct{})
	unblock := make(chan struct{})
	var closes atomic.Int32
	m := New(func(k, v string) {
		closes.Add(1)
		if v == "first" {
			close(closing)
			<-unblock
		}
	})
	ctx := context.Background()
	r, _ := m.Acquire(ctx, "k", func(context.Context) (string, error) { return "first", nil })
	go r.Release()
	<-closing
	got := make(chan string, 1)
	go func() {
		r2, err := m.Acquire(ctx, "k", func(context.Context) (string, error) { return "second", nil })
		if err != nil {
			got <- err.Error()
			return
		}
		got <- r2.Value()
		r2.Release()
	}()
	select {
	case v := <-got:
		t.Fatalf("acquire returned %q while the value was closing", v)
	default:
	}
	close(unblock)
	if v := <-got; v != "second" {
		t.Fatalf("acquire after close = %q, want a new open", v)
	}
	if n := closes.Load(); n != 2 {
		t.Fatalf("%d closes, want 2", n)
	}
}

func TestAcquireContextEndsWhileWaiting(t *testing.T) {
	var c counter
	m := New(c.close)
	gate := make(chan struct{})
	started := make(chan struct{})
	go func() {
		r, err := m.Acquire(context.Background(), "k", func(context.Context) (string, error) {
			close(started)
			<-gate
			return "v", nil
		})
		if err == nil {
			r.Release()
		}
	}()
	<-started
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.Acquire(ctx, "k", c.open("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	close(gate)
}

func TestReleaseAfterLingersUntilClose(t *testing.T) {
	var c counter
	m := New(c.close)
	r, _ := m.Acquire(context.Background(), "k", c.open("v"))
	r.ReleaseAfter(time.Hour)
	if _, closes := c.counts(); closes != 0 {
		t.Fatal("closed before its linger time")
	}
	if got := m.Open(); len(got) != 1 {
		t.Fatalf("Open() = %v while lingering", got)
	}
	m.Close()
	if _, closes := c.counts(); closes != 1 {
		t.Fatal("Close did not end the linger")
	}
	if _, err := m.Acquire(context.Background(), "k", c.open("v")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Acquire after Close: %v", err)
	}
}

func TestReleaseAfterFires(t *testing.T) {
	closed := make(chan string, 1)
	m := New(func(k, v string) { closed <- k })
	r, _ := m.Acquire(context.Background(), "k", func(context.Context) (string, error) { return "v", nil })
	r.ReleaseAfter(time.Millisecond)
	if k := <-closed; k != "k" {
		t.Fatalf("closed %q", k)
	}
	m.Close() // nothing left to release
}
