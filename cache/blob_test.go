package cache

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"

	digest "github.com/opencontainers/go-digest"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightsnap/weightsnap/metrics"
)

func TestReadMissThenHit(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(1, 10*testChunk+123)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)

	hit0 := testutil.ToFloat64(hitBytes)
	buf := make([]byte, 100)
	n, err := b.ReadAt(context.Background(), buf, 2*testChunk+10)
	if err != nil || n != 100 || !bytes.Equal(buf, data[2*testChunk+10:][:100]) {
		t.Fatalf("ReadAt = %d, %v; or wrong bytes", n, err)
	}
	if got := src.Calls(); len(got) != 1 || got[0] != (call{2 * testChunk, testChunk}) {
		t.Fatalf("fetch calls = %v, want one of chunk 2", got)
	}
	if !b.Present(2*testChunk, testChunk) || b.Present(0, 3*testChunk) || b.CachedBytes() != testChunk {
		t.Fatalf("Present/CachedBytes wrong: cached %d", b.CachedBytes())
	}
	if s.Usage() != testChunk {
		t.Fatalf("Usage = %d, want %d", s.Usage(), testChunk)
	}
	// Same range again: a hit.
	if _, err := b.ReadAt(context.Background(), buf, 2*testChunk+10); err != nil {
		t.Fatal(err)
	}
	if len(src.Calls()) != 1 {
		t.Fatalf("hit fetched: %v", src.Calls())
	}
	if d := testutil.ToFloat64(hitBytes) - hit0; d != 100 {
		t.Fatalf("hit bytes metric grew by %v, want 100", d)
	}
	// Reads at the end follow io.ReaderAt.
	tail := make([]byte, 200)
	n, err = b.ReadAt(context.Background(), tail, int64(len(data))-50)
	if n != 50 || err != io.EOF || !bytes.Equal(tail[:50], data[len(data)-50:]) {
		t.Fatalf("tail ReadAt = %d, %v", n, err)
	}
	if n, err := b.ReadAt(context.Background(), tail, int64(len(data))); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at size = %d, %v", n, err)
	}
	readAll(t, b, data, 3000)
	verify(t, b)
}

func TestFetchCoalescesMissingRuns(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(2, 11*testChunk)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	if _, err := b.ReadAt(context.Background(), make([]byte, 1), 5*testChunk); err != nil {
		t.Fatal(err)
	}
	if err := b.Fetch(context.Background(), 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	want := []call{
		{5 * testChunk, testChunk},
		{0, 4 * testChunk}, {4 * testChunk, testChunk}, // the present chunk 5 splits the run
		{6 * testChunk, 4 * testChunk}, {10 * testChunk, testChunk}, // MaxFetch is 4 chunks
	}
	if got := src.Calls(); !slices.Equal(got, want) {
		t.Fatalf("fetch calls = %v, want %v", got, want)
	}
	verify(t, b)
	readAll(t, b, data, 1<<16)
	if len(src.Calls()) != len(want) {
		t.Fatal("reading a complete blob fetched")
	}
}

func TestSingleFlight(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(3, 8*testChunk)
	src := newSource(data)
	src.block = make(chan struct{})
	const readers = 16
	var waiting sync.WaitGroup
	waiting.Add(readers - 1)
	testHookWait = func() { waiting.Done() }
	t.Cleanup(func() { testHookWait = nil })

	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	var wg sync.WaitGroup
	errs := make([]error, readers)
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Every reader wants bytes of chunk 3, at different offsets.
			off := int64(3*testChunk + i*100)
			p := make([]byte, 200)
			if _, err := b.ReadAt(context.Background(), p, off); err != nil {
				errs[i] = err
			} else if !bytes.Equal(p, data[off:off+200]) {
				errs[i] = errors.New("wrong bytes")
			}
		}()
	}
	waiting.Wait() // 15 readers wait for the one fetch
	close(src.block)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("reader %d: %v", i, err)
		}
	}
	if got := src.Calls(); len(got) != 1 {
		t.Fatalf("fetch calls = %v, want 1", got)
	}
}

func TestFetchErrorPropagatesAndStoresNothing(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(4, 4*testChunk)
	src := newSource(data)
	boom := errors.New("registry says 503")
	src.fail.Store(&boom)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	_, err := b.ReadAt(context.Background(), make([]byte, 10), 0)
	if !errors.Is(err, boom) {
		t.Fatalf("ReadAt error = %v, want wrapping %v", err, boom)
	}
	if b.CachedBytes() != 0 || b.Present(0, 1) || s.Usage() != 0 {
		t.Fatal("a failed fetch stored something")
	}
	src.fail.Store(nil)
	readAll(t, b, data, 5000)
}

func TestDedupAcrossHandles(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(5, 6*testChunk)
	src := newSource(data)
	b1 := openBlob(t, s, key, int64(len(data)), src.fetch)
	b2 := openBlob(t, s, key, int64(len(data)), noFetch(t))
	if err := b1.Fetch(context.Background(), 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	readAll(t, b2, data, 4096)
	if b2.CachedBytes() != int64(len(data)) {
		t.Fatal("handles do not share state")
	}
	if _, err := s.Blob(key, int64(len(data))+1, src.fetch); !errors.Is(err, ErrSizeMismatch) {
		t.Fatalf("Blob with another size: %v, want ErrSizeMismatch", err)
	}
	if s.Usage() != int64(len(data)) {
		t.Fatalf("Usage = %d, want %d (stored once)", s.Usage(), len(data))
	}
}

func TestRestartFetchesNothing(t *testing.T) {
	dir := t.TempDir()
	data, key := content(6, 9*testChunk+7)
	s, err := Open(dir, testOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err := b.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir, testOptions()...)
	if s.Usage() != int64(len(data)) {
		t.Fatalf("Usage after restart = %d, want %d", s.Usage(), len(data))
	}
	b = openBlob(t, s, key, int64(len(data)), noFetch(t))
	if !b.Complete() {
		t.Fatal("complete blob not Complete after restart")
	}
	readAll(t, b, data, 10000)
}

// TestRestartPartial: what was fetched before a clean restart is served,
// the rest fetched.
func TestRestartPartial(t *testing.T) {
	dir := t.TempDir()
	data, key := content(7, 8*testChunk)
	s, _ := Open(dir, testOptions()...)
	b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err := b.Fetch(context.Background(), 0, 3*testChunk); err != nil {
		t.Fatal(err)
	}
	b.Close()
	s.Close()

	s = openStore(t, dir, testOptions()...)
	src := newSource(data)
	b = openBlob(t, s, key, int64(len(data)), src.fetch)
	if b.CachedBytes() != 3*testChunk {
		t.Fatalf("CachedBytes after restart = %d", b.CachedBytes())
	}
	readAll(t, b, data, testChunk)
	if src.fetchedBytes() != 5*testChunk {
		t.Fatalf("fetched %d bytes after restart, want %d", src.fetchedBytes(), 5*testChunk)
	}
	verify(t, b)
}

func TestCorruptDataFileDetected(t *testing.T) {
	for _, complete := range []bool{false, true} {
		name := map[bool]string{false: "partial", true: "complete"}[complete]
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			data, key := content(8, 6*testChunk)
			s, _ := Open(dir, testOptions()...)
			b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch)
			if complete {
				if err := b.Verify(context.Background()); err != nil {
					t.Fatal(err)
				}
			} else if err := b.Fetch(context.Background(), 0, 5*testChunk); err != nil {
				t.Fatal(err)
			}
			b.Close()
			s.Close()

			flip(t, filepath.Join(dir, "blobs", "sha256", key.Encoded()+".data"), 2*testChunk+77)

			s = openStore(t, dir, testOptions()...)
			src := newSource(data)
			b = openBlob(t, s, key, int64(len(data)), src.fetch)
			readAll(t, b, data, 3000)
			want := []call{{2 * testChunk, testChunk}}
			if !complete {
				want = append(want, call{5 * testChunk, testChunk})
			}
			if got := src.Calls(); !slices.Equal(got, want) {
				t.Fatalf("fetch calls = %v, want %v", got, want)
			}
			verify(t, b)
		})
	}
}

func flip(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// TestCrashRecoveryServesOnlyCorrectBytes builds the states a kill -9 can
// leave and checks that only correct bytes are served.
func TestCrashRecoveryServesOnlyCorrectBytes(t *testing.T) {
	data, key := content(9, 6*testChunk)
	cases := []struct {
		name string
		// damage alters the files of a blob whose chunks 0..5 were all
		// fetched, and returns the chunks that must be fetched again.
		damage func(t *testing.T, data, rec string) int64
	}{
		{"records without data", func(t *testing.T, data, rec string) int64 {
			// The data never reached the disk (a hole), the records did.
			zeroRange(t, data, testChunk, 2*testChunk)
			return 2
		}},
		{"data file truncated", func(t *testing.T, data, rec string) int64 {
			if err := os.Truncate(data, 4*testChunk+10); err != nil {
				t.Fatal(err)
			}
			return 2
		}},
		{"torn record", func(t *testing.T, data, rec string) int64 {
			// Header + 3 records + half of the 4th.
			if err := os.Truncate(rec, headerSize+3*recordSize+recordSize/2); err != nil {
				t.Fatal(err)
			}
			return 3
		}},
		{"zero-filled tail", func(t *testing.T, data, rec string) int64 {
			if err := os.Truncate(rec, headerSize+2*recordSize); err != nil {
				t.Fatal(err)
			}
			f, _ := os.OpenFile(rec, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(make([]byte, 3*recordSize))
			f.Close()
			return 4
		}},
		{"corrupt header", func(t *testing.T, data, rec string) int64 {
			flip(t, rec, 3)
			return 6
		}},
		{"records file lost", func(t *testing.T, data, rec string) int64 {
			os.Remove(rec)
			return 6
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := Open(dir, testOptions()...)
			// One chunk per fetch, so there is one record per chunk in order.
			b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch)
			for i := int64(0); i < 6; i++ {
				if err := b.Fetch(context.Background(), i*testChunk, 1); err != nil {
					t.Fatal(err)
				}
			}
			b.Close()
			s.Close()
			base := filepath.Join(dir, "blobs", "sha256", key.Encoded())
			refetch := tc.damage(t, base+".data", base+".rec")

			s = openStore(t, dir, testOptions()...)
			src := newSource(data)
			b = openBlob(t, s, key, int64(len(data)), src.fetch)
			readAll(t, b, data, 1000)
			if got := src.fetchedBytes(); got != refetch*testChunk {
				t.Fatalf("refetched %d bytes, want %d chunks", got, refetch)
			}
			verify(t, b)
		})
	}
}

// zeroRange overwrites [off, off+n) of the file at path with zeros.
func zeroRange(t *testing.T, path string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
}

func TestDigestMismatchNeverServedAfterDetection(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(10, 5*testChunk)
	src := newSource(data)
	src.wrong.Store(true)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	if err := b.Fetch(context.Background(), 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if err := b.Verify(context.Background()); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Verify = %v, want ErrDigestMismatch", err)
	}
	if b.CachedBytes() != 0 || b.Complete() || s.Usage() != 0 {
		t.Fatalf("wrong content kept: cached %d usage %d", b.CachedBytes(), s.Usage())
	}
	// From now on a read gets an error rather than unverified bytes.
	buf := make([]byte, 100)
	if _, err := b.ReadAt(context.Background(), buf, 0); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("ReadAt after mismatch = %v, want ErrDigestMismatch", err)
	}
	// The source recovers: reads succeed with verified content.
	src.wrong.Store(false)
	readAll(t, b, data, 2000)
	if !b.Complete() {
		t.Fatal("not complete")
	}
}

func TestInvalidateRefetchesAndPersists(t *testing.T) {
	dir := t.TempDir()
	data, key := content(11, 4*testChunk)
	s, _ := Open(dir, testOptions()...)
	src := newSource(data)
	b, _ := s.Blob(key, int64(len(data)), src.fetch)
	if err := b.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Invalidate(testChunk+5, 10)
	if b.Present(testChunk, 1) || b.Complete() || b.CachedBytes() != 3*testChunk {
		t.Fatal("Invalidate did not drop chunk 1")
	}
	b.Close()
	s.Close()

	s = openStore(t, dir, testOptions()...)
	src = newSource(data)
	b = openBlob(t, s, key, int64(len(data)), src.fetch)
	if b.Present(testChunk, 1) || b.Complete() {
		t.Fatal("dropped chunk came back after restart")
	}
	readAll(t, b, data, 999)
	if got := src.Calls(); !slices.Equal(got, []call{{testChunk, testChunk}}) {
		t.Fatalf("fetch calls = %v", got)
	}
}

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

func TestEmptyBlob(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	_, key := content(0, 0)
	b := openBlob(t, s, key, 0, noFetch(t))
	verify(t, b)
	if n, err := b.ReadAt(context.Background(), make([]byte, 1), 0); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
}

func TestReadCancelled(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(12, 2*testChunk)
	src := newSource(data)
	src.block = make(chan struct{}) // never released
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.ReadAt(ctx, make([]byte, 1), 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadAt = %v, want context.Canceled", err)
	}
	if b.CachedBytes() != 0 {
		t.Fatal("stored bytes of a cancelled fetch")
	}
}

func BenchmarkReadAtHit(b *testing.B) {
	for _, size := range []int{128 << 10, 1 << 20} {
		b.Run(byteSize(size), func(b *testing.B) {
			s := openStore(b, b.TempDir())
			data, key := content(13, 16<<20)
			blob := openBlob(b, s, key, int64(len(data)), newSource(data).fetch)
			ctx := context.Background()
			if err := blob.Verify(ctx); err != nil {
				b.Fatal(err)
			}
			// Warm the verified bits and the page cache.
			p := make([]byte, size)
			for off := int64(0); off < int64(len(data)); off += int64(size) {
				blob.ReadAt(ctx, p, off)
			}
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			off := int64(0)
			for b.Loop() {
				if _, err := blob.ReadAt(ctx, p, off); err != nil {
					b.Fatal(err)
				}
				off = (off + int64(size)) % int64(len(data))
			}
		})
	}
}

func byteSize(n int) string {
	if n >= 1<<20 {
		return strconv.Itoa(n>>20) + "MiB"
	}
	return strconv.Itoa(n>>10) + "KiB"
}

// TestKill9 kills a process that keeps fetching, invalidating and
// refetching, at an arbitrary moment, and checks that a new Store serves
// only correct bytes.
func TestKill9(t *testing.T) {
	data, key := content(70, 64*testChunk)
	if dir := os.Getenv("WEIGHTSNAP_CACHE_CRASH_DIR"); dir != "" {
		crashChild(dir, data, key)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKill9$")
	cmd.Env = append(os.Environ(), "WEIGHTSNAP_CACHE_CRASH_DIR="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Let it go through a few rounds of fetch/invalidate before the kill.
	sc := bufio.NewScanner(out)
	for rounds := 0; rounds < 5; {
		if !sc.Scan() {
			t.Fatalf("child ended early: %v", sc.Err())
		}
		if sc.Text() == "round" {
			rounds++
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()

	s := openStore(t, dir, testOptions()...)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	readAll(t, b, data, 3*testChunk/2)
	verify(t, b)
	t.Logf("after the kill: %d of %d bytes had to be fetched again", src.fetchedBytes(), len(data))
}

func crashChild(dir string, data []byte, key digest.Digest) {
	s, err := Open(dir, testOptions()...)
	if err != nil {
		panic(err)
	}
	b, err := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	for i := 0; ; i++ {
		for c := int64(0); c < 64; c += 3 {
			b.Fetch(ctx, c*testChunk, 3*testChunk)
		}
		fmt.Println("round")
		b.Invalidate(int64(i%60)*testChunk, 4*testChunk)
	}
}

// TestConcurrentReadsInvalidations races readers against invalidations and
// refetches: every read must return the right bytes.
func TestConcurrentReadsInvalidations(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(80, 32*testChunk)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	var readers, invalidator sync.WaitGroup
	stop := make(chan struct{})
	invalidator.Add(1)
	go func() {
		defer invalidator.Done()
		rnd := rand.New(rand.NewPCG(99, 1))
		for {
			select {
			case <-stop:
				return
			default:
			}
			b.Invalidate(rnd.Int64N(int64(len(data))), testChunk)
			runtime.Gosched()
		}
	}()
	for r := range 4 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			rnd := rand.New(rand.NewPCG(uint64(r), 1))
			p := make([]byte, 3*testChunk)
			for range 300 {
				off := rnd.Int64N(int64(len(data)))
				n, err := b.ReadAt(context.Background(), p, off)
				if err != nil && err != io.EOF {
					t.Error(err)
					return
				}
				if !bytes.Equal(p[:n], data[off:off+int64(n)]) {
					t.Errorf("wrong bytes at %d", off)
					return
				}
			}
		}()
	}
	readers.Wait()
	close(stop)
	invalidator.Wait()
	verify(t, b)
	readAll(t, b, data, 5000)
}

func TestBitmapAll(t *testing.T) {
	m := newBitmap(200)
	for i := 10; i < 150; i++ {
		m.set(i)
	}
	for _, c := range []struct {
		lo, hi int
		want   bool
	}{{10, 149, true}, {9, 20, false}, {60, 70, true}, {63, 64, true}, {100, 150, false}, {127, 128, true}, {0, 0, false}} {
		if got := m.all(c.lo, c.hi); got != c.want {
			t.Errorf("all(%d, %d) = %v, want %v", c.lo, c.hi, got, c.want)
		}
	}
	m.clear(64)
	if m.all(60, 70) || !m.all(65, 127) {
		t.Error("clear")
	}
}

// ReadFile fetches and checks like ReadAt, then hands out the data file:
// the bytes at the returned offsets are the content, and a chunk corrupted
// on disk is refetched before the file is handed out.
func TestReadFileServesCheckedBytes(t *testing.T) {
	dir := t.TempDir()
	data, key := content(9, 6*testChunk+11)
	s, _ := Open(dir, testOptions()...)
	src := newSource(data)
	b, _ := s.Blob(key, int64(len(data)), src.fetch)
	off, n := int64(testChunk+5), int64(2*testChunk)
	f, fileOff, release, err := b.ReadFile(context.Background(), off, n)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, n)
	if _, err := f.ReadAt(got, fileOff); err != nil || !bytes.Equal(got, data[off:off+n]) {
		t.Fatalf("file bytes at %d differ from the content (err %v)", off, err)
	}
	release()
	if len(src.Calls()) == 0 {
		t.Fatal("ReadFile of a cold range fetched nothing")
	}
	if _, _, _, err := b.ReadFile(context.Background(), int64(len(data)), 1); err != io.EOF {
		t.Fatalf("ReadFile at the end: %v, want io.EOF", err)
	}
	b.Close()
	s.Close()

	flip(t, filepath.Join(dir, "blobs", "sha256", key.Encoded()+".data"), 2*testChunk+3)
	s = openStore(t, dir, testOptions()...)
	src = newSource(data)
	b = openBlob(t, s, key, int64(len(data)), src.fetch)
	if f, fileOff, release, err = b.ReadFile(context.Background(), off, n); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(got, fileOff); err != nil || !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("after corruption on disk, ReadFile handed out wrong bytes")
	}
	release()
	if want := []call{{2 * testChunk, testChunk}}; !slices.Equal(src.Calls(), want) {
		t.Fatalf("fetch calls = %v, want %v", src.Calls(), want)
	}
}
