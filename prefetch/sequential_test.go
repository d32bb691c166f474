package prefetch

import "testing"

const mib = 1 << 20

func TestSequentialWindowGrowsAndResets(t *testing.T) {
	q := NewSequential(Range{Off: 0, Len: 1 << 30}, 8*mib, 64*mib)
	type step struct {
		off, n int64
		want   Range
		ok     bool
	}
	r := func(off, n int64) Range { return Range{Off: off * mib, Len: n * mib} }
	steps := []step{
		{0, mib, r(1, 15), true},         // first read: 2 spans ahead, to a span boundary
		{mib, mib, Range{}, false},       // inside the first window: nothing new
		{8 * mib, mib, r(16, 8), true},   // the window slides by whole spans
		{16 * mib, mib, r(24, 24), true}, // a window consumed: 16 → 32 MiB
		{12 * mib, mib, Range{}, false},  // out of order, within slack
		{24 * mib, mib, r(48, 8), true},
		{32 * mib, mib, r(56, 8), true},
		{40 * mib, mib, r(64, 8), true},
		{48 * mib, mib, r(72, 40), true},   // consumed again: 32 → 64 MiB
		{56 * mib, mib, r(112, 8), true},   // capped at 64 MiB ahead
		{500 * mib, mib, Range{}, false},   // random: reset
		{501 * mib, mib, r(502, 10), true}, // confirmed, window back at 16 MiB, to a boundary
	}
	for i, s := range steps {
		got, ok := q.Observe(s.off, s.n)
		if ok != s.ok || got != s.want {
			t.Fatalf("step %d: Observe(%d MiB, %d) = %v, %v; want %v, %v", i, s.off/mib, s.n, got, ok, s.want, s.ok)
		}
	}
}

func TestSequentialStopsAtFileEnd(t *testing.T) {
	q := NewSequential(Range{Off: 0, Len: 20 * mib}, 8*mib, 64*mib)
	if got, ok := q.Observe(0, mib); !ok || got != (Range{mib, 15 * mib}) {
		t.Fatalf("first: %v %v", got, ok)
	}
	// Less than a span left, but it is the file's tail: hand it out once
	// the window reaches it.
	if got, ok := q.Observe(4*mib, mib); !ok || got != (Range{16 * mib, 4 * mib}) {
		t.Fatalf("tail: %v %v", got, ok)
	}
	if got, ok := q.Observe(5*mib, mib); ok {
		t.Fatalf("after the tail: %v, want nothing", got)
	}
}

// TestSequentialSpanAligned checks that a file at an odd blob offset gets
// read-ahead in whole blob spans after the first request.
func TestSequentialSpanAligned(t *testing.T) {
	const base, size = 5000, 200 * mib
	q := NewSequential(Range{Off: base, Len: size}, 8*mib, 0)
	next := int64(base + 64*1024)
	for off := int64(0); off < size; off += 64 * 1024 {
		got, ok := q.Observe(off, 64*1024)
		if !ok {
			continue
		}
		if got.Off != next {
			t.Fatalf("read at %d: ahead %v, want it to start at %d", off, got, next)
		}
		if got.End() != base+size && got.End()%(8*mib) != 0 {
			t.Fatalf("read at %d: ahead %v ends off a span boundary", off, got)
		}
		next = got.End()
	}
	if next != base+size {
		t.Fatalf("read-ahead stopped at %d, want the file end %d", next, base+size)
	}
}

func TestSequentialRandomFirstRead(t *testing.T) {
	q := NewSequential(Range{Off: 0, Len: 1 << 30}, 8*mib, 0)
	if got, ok := q.Observe(300*mib, 4096); ok {
		t.Fatalf("a first read in the middle read ahead %v", got)
	}
	// Window 16 MiB from 300 MiB + 8 KiB, down to a span boundary.
	if got, ok := q.Observe(300*mib+4096, 4096); !ok || got != (Range{300*mib + 8192, 12*mib - 8192}) {
		t.Fatalf("the confirming read: %v %v, want up to 312 MiB", got, ok)
	}
}
