package cache

import (
	"bytes"
	"context"
	"errors"
	"os"
	"sync"
	"testing"

	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightsnap/weightsnap/metrics"
)

func TestEvictionLRU(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testOptions(WithMaxBytes(5*testChunk))...)
	blobs := make([]*source, 3)
	for i := range blobs {
		data, _ := content(uint64(20+i), 2*testChunk)
		blobs[i] = newSource(data)
	}
	fill := func(i int) {
		t.Helper()
		data, key := content(uint64(20+i), 2*testChunk)
		b, err := s.Blob(key, int64(len(data)), blobs[i].fetch)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Verify(context.Background()); err != nil {
			t.Fatal(err)
		}
		b.Close()
	}
	evicted0 := testutil.ToFloat64(metrics.CacheEvictedBytes)
	fill(0)
	fill(1)
	fill(0) // 0 is now more recently used than 1
	if s.Usage() != 4*testChunk {
		t.Fatalf("Usage = %d", s.Usage())
	}
	fill(2) // 6 chunks > 5: the LRU key, 1, goes
	if s.Usage() != 4*testChunk {
		t.Fatalf("Usage after eviction = %d, want %d", s.Usage(), 4*testChunk)
	}
	if d := testutil.ToFloat64(metrics.CacheEvictedBytes) - evicted0; d != 2*testChunk {
		t.Fatalf("evicted bytes metric grew by %v", d)
	}
	for i, want := range []int64{2 * testChunk, 0, 2 * testChunk} {
		data, key := content(uint64(20+i), 2*testChunk)
		b := openBlob(t, s, key, int64(len(data)), noFetch(t))
		if b.CachedBytes() != want {
			t.Errorf("blob %d: %d bytes cached, want %d", i, b.CachedBytes(), want)
		}
	}
}

func TestEvictionSparesOpenBlobs(t *testing.T) {
	const bound = 3 * testChunk
	s := openStore(t, t.TempDir(), testOptions(WithMaxBytes(bound))...)
	var open []*Blob
	for i := range 3 {
		data, key := content(uint64(30+i), 2*testChunk)
		b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
		// Verify rather than Fetch: the background verification holds a
		// reference, and the test needs the blobs' references settled.
		if err := b.Verify(context.Background()); err != nil {
			t.Fatal(err)
		}
		open = append(open, b)
	}
	// Everything is referenced: the bound is exceeded rather than reads failing.
	if s.Usage() != 6*testChunk {
		t.Fatalf("Usage = %d, want %d", s.Usage(), 6*testChunk)
	}
	for _, b := range open {
		if b.CachedBytes() != 2*testChunk {
			t.Fatal("an open blob lost data")
		}
	}
	open[0].Close()
	open[1].Close()
	if s.Usage() > bound {
		t.Fatalf("Usage = %d after releasing, bound %d", s.Usage(), bound)
	}
	if open[2].CachedBytes() != 2*testChunk {
		t.Fatal("the open blob was evicted")
	}
}

func TestEvictionAtOpenWithSmallerBound(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, testOptions()...)
	for i := range 3 {
		data, key := content(uint64(40+i), 2*testChunk)
		b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch)
		if err := b.Verify(context.Background()); err != nil {
			t.Fatal(err)
		}
		b.Close()
	}
	s.Close()
	s = openStore(t, dir, testOptions(WithMaxBytes(4*testChunk))...)
	if s.Usage() != 4*testChunk {
		t.Fatalf("Usage = %d, want %d", s.Usage(), 4*testChunk)
	}
	// The oldest, blob 0, went.
	data, key := content(40, 2*testChunk)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	if b.CachedBytes() != 0 {
		t.Fatal("least recently used blob not evicted")
	}
}

func TestOpenLockedDir(t *testing.T) {
	dir := t.TempDir()
	openStore(t, dir, testOptions()...)
	if s, err := Open(dir, testOptions()...); err == nil {
		s.Close()
		t.Fatal("second Open of the same dir succeeded")
	}
	info, err := os.Stat(dir)
	if err != nil || info.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode = %v (%v), want 0700", info.Mode().Perm(), err)
	}
}

func TestMeta(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, testOptions()...)
	if _, err := s.GetMeta("layer/x.json"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("GetMeta of absent = %v", err)
	}
	if err := s.PutMeta("layer/x.json", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := s.PutMeta("layer/x.json", []byte("two")); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "../x", "/abs", "a/../../b", "a//b", ".tmp-x"} {
		if err := s.PutMeta(bad, nil); err == nil {
			t.Errorf("PutMeta(%q) accepted", bad)
		}
	}
	s.Close()
	s = openStore(t, dir, testOptions()...)
	if b, err := s.GetMeta("layer/x.json"); err != nil || string(b) != "two" {
		t.Fatalf("GetMeta after restart = %q, %v", b, err)
	}
}

// Concurrent opens of one key share one blob: its files are opened once.
func TestConcurrentOpensShareOneBlob(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(94, 4*testChunk)
	const n = 16
	handles := make([]*Blob, n)
	var wg sync.WaitGroup
	for i := range handles {
		wg.Go(func() { handles[i] = openBlob(t, s, key, int64(len(data)), newSource(data).fetch) })
	}
	wg.Wait()
	for _, h := range handles[1:] {
		if h.b != handles[0].b {
			t.Fatal("two in-memory blobs for one key")
		}
	}
}

// Keys opened, filled, closed and evicted from many goroutines at once
// keep their bytes right and the usage count exact.
func TestOpenCloseEvictChurn(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions(WithMaxBytes(6*testChunk))...)
	type blobData struct {
		data []byte
		key  digest.Digest
	}
	var blobs []blobData
	for i := range 4 {
		data, key := content(uint64(100+i), 3*testChunk)
		blobs = append(blobs, blobData{data, key})
	}
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() {
			for i := range 30 {
				d := blobs[(g+i)%len(blobs)]
				b, err := s.Blob(d.key, int64(len(d.data)), newSource(d.data).fetch)
				if err != nil {
					t.Error(err)
					return
				}
				off := int64(i%3) * testChunk
				p := make([]byte, testChunk)
				if _, err := b.ReadAt(context.Background(), p, off); err != nil || !bytes.Equal(p, d.data[off:off+testChunk]) {
					t.Errorf("read %d of blob %d: wrong bytes (err %v)", off, (g+i)%len(blobs), err)
				}
				b.Close()
			}
		})
	}
	wg.Wait()
	var sum int64
	for _, d := range blobs {
		b := openBlob(t, s, d.key, int64(len(d.data)), noFetch(t))
		sum += b.CachedBytes()
	}
	if u := s.Usage(); u != sum {
		t.Fatalf("Usage = %d, but the blobs hold %d", u, sum)
	}
}
