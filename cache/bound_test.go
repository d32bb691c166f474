package cache

import (
	"context"
	"os"
	"sync/atomic"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
)

// fakeFS is a file system of size bytes holding the store's data (its
// Usage) and others bytes of someone else's.
type fakeFS struct {
	size   int64
	others atomic.Int64
	store  atomic.Pointer[Store]
}

// options make the store see f, looked at every 5 ms.
func (f *fakeFS) option() Option {
	return func(o *options) {
		o.statfs = func(string) (fsStat, error) {
			used := f.others.Load()
			if s := f.store.Load(); s != nil {
				used += s.Usage()
			}
			return fsStat{size: f.size, avail: f.size - used}, nil
		}
		o.statfsEvery = 5 * time.Millisecond
	}
}

func (f *fakeFS) open(t *testing.T, dir string, opts ...Option) *Store {
	t.Helper()
	s := openStore(t, dir, testOptions(append(opts, f.option())...)...)
	f.store.Store(s)
	return s
}

// fillBlob caches the whole blob of seed, n bytes, and closes it.
func fillBlob(t *testing.T, s *Store, seed uint64, n int) digest.Digest {
	t.Helper()
	data, key := content(seed, n)
	b, err := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Close()
	return key
}

// onDisk reports whether the store's directory holds key's blob.
func onDisk(dir string, key digest.Digest) bool {
	_, rec := blobFiles(dir, key)
	_, err := os.Stat(rec)
	return err == nil
}

func TestBounds(t *testing.T) {
	const size = 1000
	for _, c := range []struct {
		name              string
		o                 options
		maxBytes, minFree int64
	}{
		{"none", options{}, 0, 0},
		{"bytes", options{maxBytes: 300, minFree: 50}, 300, 50},
		{"share", options{maxShare: 0.5, minFreeShare: 0.2}, 500, 200},
		{"smaller bound", options{maxBytes: 300, maxShare: 0.5}, 300, 0},
		{"smaller share", options{maxBytes: 800, maxShare: 0.5}, 500, 0},
		{"larger floor", options{minFree: 300, minFreeShare: 0.2}, 0, 300},
		{"tiny share", options{maxShare: 0.0001}, 1, 0},
	} {
		maxBytes, minFree := c.o.bounds(size)
		if maxBytes != c.maxBytes || minFree != c.minFree {
			t.Errorf("%s: bounds = %d, %d; want %d, %d", c.name, maxBytes, minFree, c.maxBytes, c.minFree)
		}
	}
	for _, bad := range []Option{WithMaxShare(1.5), WithMaxShare(-0.1), WithMinFreeShare(2), WithMinFree(-1)} {
		if _, err := newOptions([]Option{bad}); err == nil {
			t.Error("invalid option accepted")
		}
	}
}

func TestMaxShareBoundsTheStore(t *testing.T) {
	fs := &fakeFS{size: 10 * testChunk}
	dir := t.TempDir()
	s := fs.open(t, dir, WithMaxShare(0.5), WithMinFree(2*testChunk))
	if c := s.Capacity(); c != 5*testChunk {
		t.Fatalf("Capacity = %d, want %d", c, 5*testChunk)
	}
	k0 := fillBlob(t, s, 100, 2*testChunk)
	k1 := fillBlob(t, s, 101, 2*testChunk)
	k2 := fillBlob(t, s, 102, 2*testChunk) // 6 chunks > 5: the oldest goes
	if s.Usage() != 4*testChunk || onDisk(dir, k0) || !onDisk(dir, k1) || !onDisk(dir, k2) {
		t.Fatalf("usage %d; on disk: %v %v %v, want the oldest evicted", s.Usage(), onDisk(dir, k0), onDisk(dir, k1), onDisk(dir, k2))
	}
}

// When others fill the file system, the store gives up its least recently
// used data to keep the floor free, without any activity of its own.
func TestEvictionKeepsFreeSpaceFloor(t *testing.T) {
	fs := &fakeFS{size: 100 * testChunk}
	dir := t.TempDir()
	s := fs.open(t, dir, WithMinFree(10*testChunk))
	if c := s.Capacity(); c != 90*testChunk {
		t.Fatalf("Capacity = %d, want %d", c, 90*testChunk)
	}
	var keys []digest.Digest
	for i := range 3 {
		keys = append(keys, fillBlob(t, s, uint64(110+i), 2*testChunk))
	}
	if s.Usage() != 6*testChunk {
		t.Fatalf("Usage = %d with 94 chunks free", s.Usage())
	}
	// 11 chunks free: nothing to do.
	fs.others.Store(83 * testChunk)
	time.Sleep(50 * time.Millisecond)
	if s.Usage() != 6*testChunk {
		t.Fatalf("Usage = %d with the floor kept", s.Usage())
	}
	// 7 free: the two least recently used blobs go (one frees only 2).
	fs.others.Store(87 * testChunk)
	deadline := time.Now().Add(5 * time.Second)
	for s.Usage() > 2*testChunk && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if s.Usage() != 2*testChunk || onDisk(dir, keys[0]) || onDisk(dir, keys[1]) || !onDisk(dir, keys[2]) {
		t.Fatalf("usage %d; on disk %v %v %v; want the two oldest evicted", s.Usage(), onDisk(dir, keys[0]), onDisk(dir, keys[1]), onDisk(dir, keys[2]))
	}
	// A fetch that would take the floor evicts as it lands.
	fs.others.Store(88 * testChunk) // 10 free, 8 after the fetch
	k := fillBlob(t, s, 120, 2*testChunk)
	if onDisk(dir, keys[2]) || !onDisk(dir, k) {
		t.Fatal("the fetch under the floor did not evict the older blob")
	}
}

func TestDemotedIsEvictedFirst(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testOptions(WithMaxBytes(6*testChunk))...)
	old := fillBlob(t, s, 130, 2*testChunk)
	data, gone := content(131, 2*testChunk)
	b := openBlob(t, s, gone, int64(len(data)), newSource(data).fetch)
	verify(t, b)
	recent := fillBlob(t, s, 132, 2*testChunk)
	s.Demote(gone) // while open: it takes effect when closed
	b.Close()
	fillBlob(t, s, 133, 2*testChunk) // 8 chunks > 6: one goes
	if onDisk(dir, gone) || !onDisk(dir, old) || !onDisk(dir, recent) {
		t.Fatalf("on disk: old %v, demoted %v, recent %v; want the demoted one evicted", onDisk(dir, old), onDisk(dir, gone), onDisk(dir, recent))
	}

	// Demoting a closed key holds after a restart too; opening it again
	// undoes a demotion.
	s.Demote(recent)
	undone := fillBlob(t, s, 130, 2*testChunk) // old, used again
	s.Demote(undone)
	openBlob(t, s, undone, 2*testChunk, noFetch(t)).Close()
	s.Close()
	s = openStore(t, dir, testOptions(WithMaxBytes(4*testChunk))...)
	if onDisk(dir, recent) || !onDisk(dir, old) {
		t.Fatalf("after a restart: demoted on disk %v, the other %v; want the demoted one evicted", onDisk(dir, recent), onDisk(dir, old))
	}
}
