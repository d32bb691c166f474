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
			if ahead, ok := rs.Observe(7, file, start+step*span, span); ok {
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
		rs.Observe(1, file, i*100*span, span)
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
