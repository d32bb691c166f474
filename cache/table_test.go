package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
)

// testTableChunk is the table chunk of the table tests: two store chunks,
// so that a fetch (at most four store chunks) covers two table chunks.
const testTableChunk = 2 * testChunk

// TestTableMismatchNotStored: a source that always lies about one table
// chunk gets the reads of that chunk refused, after one more fetch, and
// none of its bytes reaches the data file; other chunks, even of the same
// fetch, are kept; an honest source then serves the right bytes.
func TestTableMismatchNotStored(t *testing.T) {
	const T = testTableChunk
	dir := t.TempDir()
	s := openStore(t, dir, testOptions()...)
	data, key := content(200, 8*T)
	tbl := tableOf(data, T)
	src := newSource(data)
	bad := int64(3*T + 100)
	b := openBlob(t, s, key, int64(len(data)), lying(src, bad, -1), WithTable(tbl))

	if _, err := readRange(b, 3*T+10, 10); !errors.Is(err, ErrDigestMismatch) || !errors.Is(err, chunks.ErrMismatch) {
		t.Fatalf("read of the lied-about chunk = %v, want ErrDigestMismatch", err)
	}
	if want := []call{{3 * T, T}, {3 * T, T}}; !slices.Equal(src.Calls(), want) {
		t.Fatalf("fetch calls = %v, want %v (whole table chunk, once more)", src.Calls(), want)
	}
	if b.Present(3*T, T) || b.CachedBytes() != 0 || s.Usage() != 0 {
		t.Fatalf("kept bytes of a chunk that failed: present %v cached %d usage %d", b.Present(3*T, T), b.CachedBytes(), s.Usage())
	}
	// A read across it: the chunk before, fetched together with it, is
	// kept; the one it lies about is not.
	if _, err := readRange(b, 2*T, 3*T); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("read across the lied-about chunk = %v, want ErrDigestMismatch", err)
	}
	if !b.Present(2*T, T) || b.Present(3*T, T) {
		t.Fatal("chunk 2 not kept, or chunk 3 kept")
	}
	got, err := readRange(b, 2*T, T)
	if err != nil || !bytes.Equal(got, data[2*T:3*T]) {
		t.Fatalf("read of the chunk fetched with it: %v", err)
	}
	dataFile, _ := blobFiles(dir, key)
	raw, err := os.ReadFile(dataFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw[3*T:4*T], make([]byte, T)) {
		t.Fatal("the data file holds bytes of the chunk that failed")
	}

	honest := openBlob(t, s, key, int64(len(data)), src.fetch, WithTable(tbl))
	readAll(t, honest, data, 3000)
	verify(t, honest)
}

// TestTableLieOnce: a source that lies once, then tells the truth (another
// mirror), costs one more fetch of that chunk, and the read succeeds.
func TestTableLieOnce(t *testing.T) {
	const T = testTableChunk
	dir := t.TempDir()
	s := openStore(t, dir, testOptions()...)
	data, key := content(201, 6*T+123)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), lying(src, 5*T+7, 1), WithTable(tableOf(data, T)))
	readAll(t, b, data, len(data)) // one read: fetches coalesce
	readAll(t, b, data, 5000)
	want := []call{{0, 2 * T}, {2 * T, 2 * T}, {4 * T, 2 * T}, {5 * T, T}, {6 * T, 123}}
	if !slices.Equal(src.Calls(), want) {
		t.Fatalf("fetch calls = %v, want %v", src.Calls(), want)
	}
	verify(t, b)
	dataFile, _ := blobFiles(dir, key)
	if raw, _ := os.ReadFile(dataFile); !bytes.Equal(raw, data) {
		t.Fatal("data file differs from the content")
	}
}

// TestTableCatchesCorruptDataFile: bytes on disk from an earlier process
// are checked against the table before they are served, even when their
// records vouch for them (a record rewritten to match, which the checksum
// alone cannot catch), and only the table chunk that fails is fetched
// again. Tables of either hash check stored chunks alike.
func TestTableCatchesCorruptDataFile(t *testing.T) {
	const T = testTableChunk
	for _, c := range []struct {
		records bool
		hash    chunks.Hash
	}{{false, chunks.BLAKE3}, {true, chunks.BLAKE3}, {true, chunks.SHA256}} {
		records := c.records
		name := map[bool]string{false: "data", true: "data and records"}[records] + " " + string(c.hash)
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			data, key := content(202, 8*T)
			tbl := tableOfHash(data, T, c.hash)
			s, _ := Open(dir, testOptions()...)
			b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch, WithTable(tbl))
			// Not the last table chunk: a whole blob would be hashed at
			// open, which would catch the corruption before the table.
			if err := b.Fetch(context.Background(), 0, 7*T); err != nil {
				t.Fatal(err)
			}
			b.Close()
			s.Close()

			dataFile, rec := blobFiles(dir, key)
			at := int64(5*T + testChunk + 9) // in the second store chunk of table chunk 5
			flip(t, dataFile, at)
			if records {
				rewriteRecord(t, dataFile, rec, int(at/testChunk))
			}

			s = openStore(t, dir, testOptions()...)
			src := newSource(data)
			b = openBlob(t, s, key, int64(len(data)), src.fetch, WithTable(tbl))
			readAll(t, b, data, 3000)
			if want := []call{{5 * T, T}, {7 * T, T}}; !slices.Equal(src.Calls(), want) {
				t.Fatalf("fetch calls = %v, want %v", src.Calls(), want)
			}
			verify(t, b)
		})
	}
}

// rewriteRecord appends a record for chunk i that vouches for what the
// data file holds now.
func rewriteRecord(t *testing.T, dataFile, rec string, i int) {
	t.Helper()
	raw, err := os.ReadFile(dataFile)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(rec, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(appendRecord(nil, uint64(i), checksum(raw[i*testChunk:(i+1)*testChunk]))); err != nil {
		t.Fatal(err)
	}
}

// TestTableChecksOtherHandlesBytes: chunks a handle without a table
// fetched, and served, are checked against the table before a handle with
// one is served them: right ones are not fetched again, wrong ones are,
// and a table chunk only part of which was fetched is fetched whole.
// Chunks the table vouched for are served to handles without one.
func TestTableChecksOtherHandlesBytes(t *testing.T) {
	const T = testTableChunk
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(203, 8*T)
	tbl := tableOf(data, T)
	plainSrc := newSource(data)
	plain := openBlob(t, s, key, int64(len(data)), lying(plainSrc, 2*T+5, -1))
	ctx := context.Background()
	for _, r := range []call{{0, 2 * T}, {2 * T, T}, {4 * T, testChunk}} {
		if err := plain.Fetch(ctx, r.off, r.n); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := readRange(plain, 2*T, T); bytes.Equal(got, data[2*T:3*T]) {
		t.Fatal("the lying source was not served to the handle without a table")
	}

	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch, WithTable(tbl))
	readAll(t, b, data, len(data))
	// Table chunk 2 is wrong, 3 missing, 4 half there, 5 to 7 missing.
	want := []call{{2 * T, T}, {3 * T, T}, {4 * T, 2 * T}, {6 * T, 2 * T}}
	got := src.Calls()
	slices.SortFunc(got, func(a, b call) int { return int(a.off - b.off) })
	if !slices.Equal(got, want) {
		t.Fatalf("fetch calls = %v, want %v", got, want)
	}
	n := len(plainSrc.Calls())
	readAll(t, plain, data, 1000)
	if len(plainSrc.Calls()) != n {
		t.Fatalf("the handle without a table fetched again what the table vouched for: %v", plainSrc.Calls()[n:])
	}
}

func TestTableConflict(t *testing.T) {
	const T = testTableChunk
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(204, 4*T+1)
	size := int64(len(data))
	src := newSource(data)
	tbl := tableOf(data, T)

	for name, bad := range map[string]*chunks.Table{
		"size":        {Hash: chunks.BLAKE3, ChunkSize: T, Size: size - 1, Digests: tableOf(data[:size-1], T).Digests},
		"chunk size":  tableOf(data, testChunk*3/2),
		"digests":     {Hash: chunks.BLAKE3, ChunkSize: T, Size: size, Digests: tbl.Digests[:2]},
		"zero chunks": {Hash: chunks.BLAKE3, ChunkSize: 0, Size: size},
		"hash":        {Hash: "md5", ChunkSize: T, Size: size, Digests: tbl.Digests},
	} {
		if _, err := s.Blob(key, size, src.fetch, WithTable(bad)); !errors.Is(err, ErrTable) {
			t.Errorf("table with a wrong %s: %v, want ErrTable", name, err)
		}
	}

	b := openBlob(t, s, key, size, src.fetch, WithTable(tbl))
	other := tableOf(bytes.Repeat([]byte{1}, len(data)), T)
	coarser := tableOf(data, 2*T)
	sha := tableOfHash(data, T, chunks.SHA256)
	for _, bad := range []*chunks.Table{other, coarser, sha} {
		if _, err := s.Blob(key, size, src.fetch, WithTable(bad)); !errors.Is(err, ErrTableConflict) {
			t.Fatalf("second table: %v, want ErrTableConflict", err)
		}
	}
	same := openBlob(t, s, key, size, src.fetch, WithTable(tableOf(data, T)))
	plain := openBlob(t, s, key, size, src.fetch)
	readAll(t, plain, data, 999)
	readAll(t, same, data, 999)
	verify(t, same) // and wait for the background run to let go
	b.Close()
	same.Close()
	plain.Close()
	// Once closed, the blob takes another table.
	again := openBlob(t, s, key, size, src.fetch, WithTable(coarser))
	readAll(t, again, data, 999)
}

// TestTableSegments: with a table, a segment is handed out by FileOf once
// the blob is verified and, after a restart, once Check has checked its
// range against the table, which also catches a segment corrupted on
// disk.
func TestTableSegments(t *testing.T) {
	const T = testTableChunk
	dir := t.TempDir()
	data, key := content(205, 8*T)
	tbl := tableOf(data, T)
	off, n := int64(T+100), int64(4*T)
	s, _ := Open(dir, testOptions()...)
	b, _ := s.Blob(key, int64(len(data)), newSource(data).fetch, WithTable(tbl))
	if err := b.Segment(off, n); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.FileOf(off, n); ok {
		t.Fatal("FileOf before anything was fetched")
	}
	if err := b.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := readFileOf(t, b, off, n); !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("segment differs from its range")
	}
	b.Close()
	s.Close()
	flip(t, filepath.Join(dir, "blobs", "sha256", key.Encoded()+".seg", segmentName(off, n)), 2*T-100)

	s = openStore(t, dir, testOptions()...)
	src := newSource(data)
	b = openBlob(t, s, key, int64(len(data)), src.fetch, WithTable(tbl))
	if _, ok := b.FileOf(off, n); ok {
		t.Fatal("FileOf after a restart before Check")
	}
	if err := b.Check(context.Background(), off, n); err != nil {
		t.Fatal(err)
	}
	if want := []call{{3 * T, T}}; !slices.Equal(src.Calls(), want) {
		t.Fatalf("fetch calls = %v, want %v", src.Calls(), want)
	}
	verify(t, b)
	if err := b.Check(context.Background(), off, n); err != nil {
		t.Fatal(err)
	}
	if got := readFileOf(t, b, off, n); !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("segment differs from its range after the refetch")
	}
}

// A table adds nothing to a hit.
func TestReadFileHitWithTableDoesNotAllocate(t *testing.T) {
	data, key := content(206, 4*testTableChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch, WithTable(tableOf(data, testTableChunk)))
	readAll(t, b, data, testChunk)
	ctx := context.Background()
	p := make([]byte, testChunk)
	allocs := testing.AllocsPerRun(100, func() {
		_, _, release, err := b.ReadFile(ctx, testChunk, testChunk)
		if err != nil {
			t.Fatal(err)
		}
		release()
		if _, err := b.ReadAt(ctx, p, 2*testChunk); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per hit", allocs)
	}
}

// TestTableConcurrentReaders races readers of a handle with a table, whose
// source lies in every third fetch, and of one without, of both read
// paths, against invalidations: a read with the table returns the right
// bytes or ErrDigestMismatch, and the handle without it, whose source is
// honest, is never served a byte the liar sent.
func TestTableConcurrentReaders(t *testing.T) {
	const T = testTableChunk
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(207, 16*T+300)
	src := newSource(data)
	var fetches atomic.Int32
	liar := func(ctx context.Context, p []byte, off int64) error {
		if err := src.fetch(ctx, p, off); err != nil {
			return err
		}
		if fetches.Add(1)%3 == 0 {
			p[len(p)/2] ^= 0x5a
		}
		return nil
	}
	tb := openBlob(t, s, key, int64(len(data)), liar, WithTable(tableOf(data, T)))
	plain := openBlob(t, s, key, int64(len(data)), src.fetch)
	var readers, invalidator sync.WaitGroup
	stop := make(chan struct{})
	invalidator.Add(1)
	go func() {
		defer invalidator.Done()
		rnd := rand.New(rand.NewPCG(7, 1))
		for {
			select {
			case <-stop:
				return
			default:
			}
			plain.Invalidate(rnd.Int64N(int64(len(data))), testChunk)
			runtime.Gosched()
		}
	}()
	for r := range 4 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			rnd := rand.New(rand.NewPCG(uint64(r), 2))
			p := make([]byte, 3*testChunk)
			b := tb
			if r >= 2 {
				b = plain
			}
			for i := range 200 {
				off := rnd.Int64N(int64(len(data)))
				read := b.ReadAt
				if i%2 == 1 {
					read = readThroughFile(b)
				}
				n, err := read(context.Background(), p, off)
				if b == tb && errors.Is(err, ErrDigestMismatch) {
					continue
				}
				if err != nil && err != io.EOF {
					t.Error(err)
					return
				}
				if !bytes.Equal(p[:n], data[off:off+int64(n)]) {
					t.Errorf("reader %d: wrong bytes at %d", r, off)
					return
				}
			}
		}()
	}
	readers.Wait()
	close(stop)
	invalidator.Wait()
	verify(t, plain)
	readAll(t, tb, data, 5000)
}

// TestTableContradictsDigest: chunks the table vouched for are served,
// but the whole content still decides: once it fails its digest, nothing
// is served any more, whatever the table says.
func TestTableContradictsDigest(t *testing.T) {
	const T = testTableChunk
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(208, 4*T)
	wrong := digest.FromString("not this content")
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch, WithTable(tableOf(data, T)), WithContentDigest(wrong))
	// A read short of the whole (one fetch is at most 2T): once the whole
	// content is cached it is hashed, and reads racing that fail with it.
	got, err := readRange(b, 0, T)
	if err != nil || !bytes.Equal(got, data[:T]) {
		t.Fatalf("read of a chunk the table vouches for: %v, equal %v", err, bytes.Equal(got, data[:T]))
	}
	if b.CachedBytes() == int64(len(data)) {
		t.Fatal("one read fetched the whole content")
	}
	if err := b.Verify(context.Background()); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Verify = %v, want ErrDigestMismatch", err)
	}
	if _, err := readRange(b, 0, 10); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("read after the content failed = %v, want ErrDigestMismatch", err)
	}
	if b.CachedBytes() != 0 {
		t.Fatalf("kept %d bytes of a content that failed", b.CachedBytes())
	}
}

// TestTableFetchRecordsChunkChecksums: a fetch through a table computes
// each store chunk's checksum in the pass that checks the table chunk,
// with store chunks smaller and larger than the pieces it hashes at a
// time, and a short last chunk.
func TestTableFetchRecordsChunkChecksums(t *testing.T) {
	for _, chunk := range []int64{testChunk, 1 << 20} {
		t.Run(fmt.Sprint(chunk), func(t *testing.T) {
			T := 2 * chunk
			s := openStore(t, t.TempDir(), WithChunkSize(chunk), WithMaxFetch(4*chunk))
			data, key := content(205, int(5*T+chunk/3))
			b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch, WithTable(tableOf(data, T)))
			readAll(t, b, data, int(chunk))
			b.b.mu.Lock()
			defer b.b.mu.Unlock()
			for i := range b.b.n {
				want := checksum(data[int64(i)*chunk : min(int64(i+1)*chunk, int64(len(data)))])
				if !b.b.present.get(i) || b.b.sums[i] != want {
					t.Fatalf("chunk %d: present %v, checksum %x, want %x", i, b.b.present.get(i), b.b.sums[i], want)
				}
			}
		})
	}
}
