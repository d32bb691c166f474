package prefetch

import (
	"context"
	"sync"
	"testing"
	"time"
)

// latencyTarget is a Target whose every fetch takes a fixed time, as a
// range request to a registry does. Presence is tracked per fetched offset,
// which is exact for the span-aligned requests the benchmarks make.
type latencyTarget struct {
	size    int64
	latency time.Duration

	mu      sync.Mutex
	present map[int64]bool
}

func (l *latencyTarget) Size() int64 { return l.size }

func (l *latencyTarget) Present(off, n int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.present[off]
}

func (l *latencyTarget) Fetch(ctx context.Context, off, n int64) error {
	select {
	case <-time.After(l.latency):
	case <-ctx.Done():
		return ctx.Err()
	}
	l.mu.Lock()
	l.present[off] = true
	l.mu.Unlock()
	return nil
}

// BenchmarkReadAhead measures what a reader's ReadAhead call costs: the
// scheduling, not the fetch (which runs on the workers meanwhile).
func BenchmarkReadAhead(b *testing.B) {
	const span = 1 << 20
	for _, bc := range []struct {
		name string
		next func(i int) Range
	}{
		// Every call queues a new span.
		{"new-span", func(i int) Range { return Range{Off: int64(i) * span, Len: span} }},
		// A sequential reader's repeated calls: mostly queued, in flight or present.
		{"repeat", func(i int) Range { return Range{Off: int64(i/64) * span, Len: 8 * span} }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := New(WithSpanSize(span))
			defer s.Close()
			t := &latencyTarget{size: 1 << 50, latency: 2 * time.Millisecond, present: make(map[int64]bool)}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.ReadAhead(t, bc.next(i))
				i++
			}
		})
	}
}

// BenchmarkFill streams a 256 MiB blob through Fill with 8 MiB spans that
// each take 20 ms: the throughput shows the background workers overlap.
func BenchmarkFill(b *testing.B) {
	const size = 256 << 20
	b.SetBytes(size)
	for b.Loop() {
		s := New(WithBackgroundWorkers(8))
		t := &latencyTarget{size: size, latency: 20 * time.Millisecond, present: make(map[int64]bool)}
		if err := s.Fill(context.Background(), t, []Range{{0, size}}, nil); err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}
