package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"

	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightsnap/weightsnap/chunks"
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
	data, key := content(13, 16<<20)
	tbl, err := chunks.Compute(bytes.NewReader(data), int64(len(data)), chunks.DefaultChunkSize, chunks.BLAKE3)
	if err != nil {
		b.Fatal(err)
	}
	for _, size := range []int{128 << 10, 1 << 20} {
		for _, table := range []bool{false, true} {
			name := byteSize(size)
			var opts []BlobOption
			if table {
				name, opts = name+"/table", []BlobOption{WithTable(tbl)}
			}
			b.Run(name, func(b *testing.B) {
				benchReadAtHit(b, data, key, size, opts)
			})
		}
	}
}

func benchReadAtHit(b *testing.B, data []byte, key digest.Digest, size int, opts []BlobOption) {
	s := openStore(b, b.TempDir())
	blob := openBlob(b, s, key, int64(len(data)), newSource(data).fetch, opts...)
	ctx := context.Background()
	if err := blob.Verify(ctx); err != nil {
		b.Fatal(err)
	}
	// Warm the servable bits and the page cache.
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
}

func byteSize(n int) string {
	if n >= 1<<20 {
		return strconv.Itoa(n>>20) + "MiB"
	}
	return strconv.Itoa(n>>10) + "KiB"
}

// TestConcurrentReadsInvalidations races readers, of both read paths,
// against invalidations and refetches: every read must return the right
// bytes.
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
			for i := range 300 {
				off := rnd.Int64N(int64(len(data)))
				read := b.ReadAt
				if r%2 == 1 && i%2 == 1 {
					read = readThroughFile(b)
				}
				n, err := read(context.Background(), p, off)
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

// Every FUSE read of a splicing layer goes through ReadFile: a hit must
// not allocate.
func TestReadFileHitDoesNotAllocate(t *testing.T) {
	data, key := content(93, 4*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	verify(t, b)
	ctx := context.Background()
	allocs := testing.AllocsPerRun(100, func() {
		_, _, release, err := b.ReadFile(ctx, testChunk, testChunk)
		if err != nil {
			t.Fatal(err)
		}
		release()
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per ReadFile hit", allocs)
	}
}

func BenchmarkReadFileHit(b *testing.B) {
	s := openStore(b, b.TempDir())
	data, key := content(14, 16<<20)
	blob := openBlob(b, s, key, int64(len(data)), newSource(data).fetch)
	ctx := context.Background()
	if err := blob.Verify(ctx); err != nil {
		b.Fatal(err)
	}
	const size = 128 << 10
	b.ReportAllocs()
	off := int64(0)
	for b.Loop() {
		_, _, release, err := blob.ReadFile(ctx, off, size)
		if err != nil {
			b.Fatal(err)
		}
		release()
		off = (off + size) % int64(len(data))
	}
}

// readThroughFile reads like ReadAt, but through the file ReadFile hands
// out, yielding while it holds the range so that drops try to get in.
func readThroughFile(b *Blob) func(ctx context.Context, p []byte, off int64) (int, error) {
	return func(ctx context.Context, p []byte, off int64) (int, error) {
		f, fileOff, release, err := b.ReadFile(ctx, off, int64(len(p)))
		if err != nil {
			return 0, err
		}
		defer release()
		n := min(int64(len(p)), b.Size()-off)
		runtime.Gosched()
		if _, err := f.ReadAt(p[:n], fileOff); err != nil {
			return 0, err
		}
		if n < int64(len(p)) {
			return int(n), io.EOF
		}
		return int(n), nil
	}
}
