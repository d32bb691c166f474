package prefetch

import "testing"

func TestReadersFollowSeveralReadersOfOneFile(t *testing.T) {
	const span = 100
	file := Range{Off: 1000, Len: 100 * span}
	rs := NewReaders(span, 4*span)
	// Two readers, far apart in the file, each reading sequentially.
	starts := []int64{0, 50 * span}
	var got [2][]Range
	for step := range int64(4) {
		for i, start := range starts {
			if ahead, ok := rs.Observe(7, start+step*span, span, fileOf(file)); ok {
				got[i] = append(got[i], ahead)
			}
		}
	}
	for i, start := range starts {
		if len(got[i]) == 0 {
			t.Fatalf("reader %d at %d got no read-ahead", i, start)
		}
		if first := got[i][0]; first.Off < file.Off+start || first.Off > file.Off+start+2*span {
			t.Errorf("reader %d at %d: read-ahead %v does not follow it", i, start, first)
		}
	}
}

func TestReadersReplaceTheLeastRecentlyUsed(t *testing.T) {
	const span = 100
	file := Range{Len: 1000 * span}
	rs := NewReaders(span, 4*span)
	for i := range int64(maxReaders + 1) {
		rs.Observe(1, i*100*span, span, fileOf(file))
	}
	if n := len(rs.byFile[1]); n != maxReaders {
		t.Fatalf("%d readers kept, want %d", n, maxReaders)
	}
	for _, r := range rs.byFile[1] {
		if r.q.Near(0) {
			t.Errorf("the least recently used reader (at 0) was kept")
		}
	}
}

func fileOf(r Range) func() (Range, bool) { return func() (Range, bool) { return r, true } }

// A read that continues a reader does not ask where its file is: that
// lookup is for a new reader only.
func TestReadersAskForTheFileOnlyForANewReader(t *testing.T) {
	rs := NewReaders(100, 400)
	asked := 0
	file := func() (Range, bool) { asked++; return Range{Len: 10000}, true }
	for off := int64(0); off < 1000; off += 100 {
		rs.Observe(1, off, 100, file)
	}
	if asked != 1 {
		t.Fatalf("the file's range was asked for %d times, want once", asked)
	}
	if _, ok := rs.Observe(2, 0, 100, func() (Range, bool) { return Range{}, false }); ok {
		t.Fatal("read-ahead for a file without a range")
	}
}
