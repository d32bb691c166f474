package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"
)

// rangeSource is a RangeReaderFunc over a source's data that records its
// requests. A request is cut off with an error after cut bytes if cut is
// positive, and the byte at flip (if not negative) is altered in every
// request that covers it.
type rangeSource struct {
	data []byte
	cut  int64
	flip int64

	mu    sync.Mutex
	calls []call
}

func (r *rangeSource) open(_ context.Context, off, n int64) (io.ReadCloser, error) {
	r.mu.Lock()
	r.calls = append(r.calls, call{off, n})
	r.mu.Unlock()
	if off < 0 || off+n > int64(len(r.data)) {
		return nil, errors.New("request past the end")
	}
	p := bytes.Clone(r.data[off : off+n])
	if r.flip >= off && r.flip < off+n {
		p[r.flip-off] ^= 0x5a
	}
	var rd io.Reader = bytes.NewReader(p)
	if r.cut > 0 && r.cut < n {
		rd = io.MultiReader(bytes.NewReader(p[:r.cut]), failReader{errors.New("connection reset")})
	}
	return io.NopCloser(rd), nil
}

func (r *rangeSource) Calls() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

type failReader struct{ err error }

func (f failReader) Read([]byte) (int, error) { return 0, f.err }

// A Fetch of many runs through a handle with a RangeReaderFunc makes one
// request for them all; reads then find every byte, as fetched, with and
// without a table (of two store chunks per table chunk).
func TestFetchChainsRunsInOneRequest(t *testing.T) {
	for _, withTable := range []bool{false, true} {
		s := openStore(t, t.TempDir(), testOptions()...)
		data, key := content(21, 19*testChunk+100)
		rs := &rangeSource{data: data, flip: -1}
		opts := []BlobOption{WithRangeReader(rs.open)}
		if withTable {
			opts = append(opts, WithTable(tableOf(data, 2*testChunk)))
		}
		b := openBlob(t, s, key, int64(len(data)), noFetch(t), opts...)
		if err := b.Fetch(t.Context(), 0, int64(len(data))); err != nil {
			t.Fatalf("table %v: Fetch: %v", withTable, err)
		}
		if got, want := rs.Calls(), []call{{0, int64(len(data))}}; !slices.Equal(got, want) {
			t.Errorf("table %v: requests %v, want %v", withTable, got, want)
		}
		readAll(t, b, data, 3000)
		verify(t, b)
	}
}

// A request cut off midway keeps the runs it delivered whole, fails the
// Fetch, and leaves the rest missing, not wrong: the next Fetch asks for
// them alone and every byte read is the source's.
func TestChainCutOffKeepsWhatArrived(t *testing.T) {
	for _, withTable := range []bool{false, true} {
		s := openStore(t, t.TempDir(), testOptions()...)
		data, key := content(22, 16*testChunk)
		rs := &rangeSource{data: data, flip: -1, cut: 6 * testChunk}
		opts := []BlobOption{WithRangeReader(rs.open)}
		if withTable {
			opts = append(opts, WithTable(tableOf(data, 2*testChunk)))
		}
		b := openBlob(t, s, key, int64(len(data)), noFetch(t), opts...)
		if err := b.Fetch(t.Context(), 0, int64(len(data))); err == nil {
			t.Fatalf("table %v: Fetch through a request cut off: no error", withTable)
		}
		// Runs are 4 chunks: the first arrived whole, the second did not.
		if !b.Present(0, 4*testChunk) || b.Present(4*testChunk, testChunk) {
			t.Fatalf("table %v: after the cut, chunks [0, 4) present %v, chunk 4 present %v; want the first run only",
				withTable, b.Present(0, 4*testChunk), b.Present(4*testChunk, testChunk))
		}
		rs.cut = 0
		if err := b.Fetch(t.Context(), 0, int64(len(data))); err != nil {
			t.Fatalf("table %v: second Fetch: %v", withTable, err)
		}
		if got, want := rs.Calls()[1:], []call{{4 * testChunk, 12 * testChunk}}; !slices.Equal(got, want) {
			t.Errorf("table %v: requests after the cut %v, want %v", withTable, got, want)
		}
		readAll(t, b, data, 5000)
		verify(t, b)
	}
}

// A table chunk that arrives wrong in a chained request is fetched again
// through the FetchFunc and checked; the runs around it are kept, and no
// wrong byte is stored or served.
func TestChainedChunkThatFailsItsCheckIsFetchedAgain(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(23, 16*testChunk)
	rs := &rangeSource{data: data, flip: 9*testChunk + 7}
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch, WithRangeReader(rs.open), WithTable(tableOf(data, 2*testChunk)))
	if err := b.Fetch(t.Context(), 0, int64(len(data))); err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if got, want := src.Calls(), []call{{8 * testChunk, 2 * testChunk}}; !slices.Equal(got, want) {
		t.Errorf("FetchFunc calls %v, want the one table chunk that failed, %v", got, want)
	}
	readAll(t, b, data, 4096)
	verify(t, b)
	if n := len(src.Calls()); n != 1 {
		t.Errorf("%d FetchFunc calls after reading the blob, want 1", n)
	}
}
