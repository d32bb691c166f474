package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

// readFileOf reads the whole file FileOf hands out for [off, off+n).
func readFileOf(t *testing.T, b *Blob, off, n int64) []byte {
	t.Helper()
	f, ok := b.FileOf(off, n)
	if !ok {
		t.Fatalf("FileOf(%d, %d) not available", off, n)
	}
	got := make([]byte, n+1)
	m, err := f.ReadAt(got, 0)
	if err != io.EOF {
		t.Fatalf("FileOf(%d, %d): read %d bytes, err %v; want exactly the range then EOF", off, n, m, err)
	}
	return got[:m]
}

// cacheSegmented caches all of data in a store at dir, with [off, off+n)
// in a segment, verified, and closes the store.
func cacheSegmented(t *testing.T, dir string, data []byte, key digest.Digest, off, n int64) {
	t.Helper()
	s := openStore(t, dir, testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	if err := b.Segment(off, n); err != nil {
		t.Fatal(err)
	}
	readAll(t, b, data, 1<<16)
	verify(t, b)
	b.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// allocated returns the bytes of disk space a file uses.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// A segment holds its range at offset 0, the data file has a hole there,
// FileOf hands the segment out once the blob is verified, and all of it
// survives a reopen without a fetch.
func TestSegmentHoldsItsRange(t *testing.T) {
	dir := t.TempDir()
	data, key := content(21, 9*testChunk+77)
	s := openStore(t, dir, testOptions()...)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	off, n := int64(2*testChunk+100), int64(5*testChunk+3)
	if err := b.Segment(off, n); err != nil {
		t.Fatal(err)
	}
	if err := b.Segment(off, n); err != nil {
		t.Fatalf("declaring the same segment again: %v", err)
	}
	if _, ok := b.FileOf(off, n); ok {
		t.Fatal("FileOf handed out a segment before the blob was verified")
	}
	readAll(t, b, data, 3000)
	verify(t, b)
	if got := readFileOf(t, b, off, n); !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("segment file differs from its range of the content")
	}
	if _, ok := b.FileOf(off, n-1); ok {
		t.Fatal("FileOf handed out a file for a range that is not a segment")
	}
	if _, ok := b.FileOf(0, int64(len(data))); ok {
		t.Fatal("FileOf handed out the data file of a blob with a segment")
	}
	base := filepath.Join(dir, "blobs", "sha256", key.Encoded())
	if got, most := allocated(t, base+".data"), int64(len(data))-n+2*testChunk; got > most {
		t.Fatalf("data file uses %d bytes, want at most %d: the segment's range is not a hole", got, most)
	}
	if u := s.Usage(); u != int64(len(data)) {
		t.Fatalf("usage %d, want %d", u, len(data))
	}
	b.Close()
	s.Close()

	s = openStore(t, dir, testOptions()...)
	b = openBlob(t, s, key, int64(len(data)), noFetch(t))
	if !b.Complete() {
		t.Fatal("not Complete after a reopen")
	}
	if _, ok := b.FileOf(off, n); ok {
		t.Fatal("FileOf handed out a segment before its chunks were checked in this process")
	}
	if err := b.Check(context.Background(), off, n); err != nil {
		t.Fatal(err)
	}
	if got := readFileOf(t, b, off, n); !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("segment file differs after a reopen")
	}
	readAll(t, b, data, 1<<16)

	// A chunk of the range dropped: not handed out any more.
	b.Invalidate(off+n/2, 1)
	if _, ok := b.FileOf(off, n); ok {
		t.Fatal("FileOf handed out a segment with a dropped chunk")
	}
}

// A segment corrupted while the store was closed is caught by Check
// before FileOf hands it out, and fetched again.
func TestSegmentCorruptCaughtByCheck(t *testing.T) {
	dir := t.TempDir()
	data, key := content(29, 6*testChunk)
	off, n := int64(testChunk+7), int64(3*testChunk)
	cacheSegmented(t, dir, data, key, off, n)

	flip(t, filepath.Join(dir, "blobs", "sha256", key.Encoded()+".seg", segmentName(off, n)), testChunk)
	s := openStore(t, dir, testOptions()...)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	if err := b.Check(context.Background(), 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if len(src.Calls()) != 1 {
		t.Fatalf("fetch calls %v, want the corrupt chunk refetched", src.Calls())
	}
	verify(t, b)
	if got := readFileOf(t, b, off, n); !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("segment file differs after the corrupt chunk was refetched")
	}
}

// Unusable segment files are removed at open, and the blob still opens;
// their bytes are fetched again.
func TestSegmentUnusableFilesRemoved(t *testing.T) {
	dir := t.TempDir()
	data, key := content(30, 4*testChunk)
	off, n := int64(testChunk), int64(2*testChunk)
	cacheSegmented(t, dir, data, key, off, n)

	segDir := filepath.Join(dir, "blobs", "sha256", key.Encoded()+".seg")
	good := filepath.Join(segDir, segmentName(off, n))
	if err := os.Remove(good); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(good, 0o700); err != nil { // cannot be opened for writing
		t.Fatal(err)
	}
	huge := filepath.Join(segDir, "9223372036854775807-10")
	if err := os.WriteFile(huge, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, dir, testOptions()...)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	for _, p := range []string{good, huge} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("unusable segment %s left in place (stat: %v)", p, err)
		}
	}
	readAll(t, b, data, 1<<16)
	if src.fetchedBytes() == 0 {
		t.Fatal("the bytes of the removed segment were not fetched again")
	}
}

// Chunks cached before the segment is declared move into it: nothing is
// fetched again, and the bytes are right on both sides of each boundary.
func TestSegmentMovesCachedBytes(t *testing.T) {
	data, key := content(22, 8*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	src := newSource(data)
	b := openBlob(t, s, key, int64(len(data)), src.fetch)
	if err := b.Fetch(context.Background(), testChunk, 2*testChunk); err != nil {
		t.Fatal(err)
	}
	if err := b.Fetch(context.Background(), 6*testChunk, testChunk); err != nil {
		t.Fatal(err)
	}
	before := src.fetchedBytes()
	off, n := int64(testChunk+testChunk/2), int64(5*testChunk)
	if err := b.Segment(off, n); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{testChunk, 2 * testChunk}, {6 * testChunk, testChunk}} {
		got := make([]byte, r[1])
		if _, err := b.ReadAt(context.Background(), got, r[0]); err != nil || !bytes.Equal(got, data[r[0]:r[0]+r[1]]) {
			t.Fatalf("cached range %v reads wrong after the move (err %v)", r, err)
		}
	}
	if after := src.fetchedBytes(); after != before {
		t.Fatalf("moving cached chunks into a segment fetched %d bytes", after-before)
	}
	readAll(t, b, data, 5000)
}

// A ReadFile inside a segment hands out the segment file at the offset
// relative to it.
func TestSegmentReadFile(t *testing.T) {
	data, key := content(23, 6*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	off, n := int64(testChunk+10), int64(3*testChunk)
	if err := b.Segment(off, n); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{off, 100}, {off + n - 100, 100}, {off + 5, 2 * testChunk}, {0, off}, {off + n, 50}} {
		f, fileOff, release, err := b.ReadFile(context.Background(), r[0], r[1])
		if err != nil {
			t.Fatalf("ReadFile %v: %v", r, err)
		}
		got := make([]byte, r[1])
		_, err = f.ReadAt(got, fileOff)
		release()
		if err != nil || !bytes.Equal(got, data[r[0]:r[0]+r[1]]) {
			t.Fatalf("ReadFile %v: bytes at %d of %s differ (err %v)", r, fileOff, f.Name(), err)
		}
	}
	if _, _, _, err := b.ReadFile(context.Background(), off-1, 2); err == nil {
		t.Fatal("ReadFile across a segment boundary succeeded")
	}
}

// Overlapping segments, ranges outside the content and ranges mostly
// cached already are refused; reads stay right.
func TestSegmentRefused(t *testing.T) {
	data, key := content(24, 40*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	if err := b.Segment(testChunk, 2*testChunk); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{testChunk + 1, 10}, {0, testChunk + 1}, {-1, 5}, {int64(len(data)) - 5, 6}, {5, 0}} {
		if err := b.Segment(r[0], r[1]); !errors.Is(err, ErrSegment) {
			t.Errorf("Segment%v = %v, want ErrSegment", r, err)
		}
	}
	if err := b.Fetch(context.Background(), 10*testChunk, 20*testChunk); err != nil {
		t.Fatal(err)
	}
	if err := b.Segment(10*testChunk, 20*testChunk); !errors.Is(err, ErrSegment) {
		t.Errorf("segment over %d cached bytes = %v, want ErrSegment", 20*testChunk, err)
	}
	readAll(t, b, data, 7000)
}

// Files left by a crash while a segment was made are cleaned up at open:
// an unfinished segment is deleted, and a finished one whose range is
// still in the data file wins, its stale copy punched.
func TestSegmentCrashLeftovers(t *testing.T) {
	dir := t.TempDir()
	data, key := content(25, 6*testChunk)
	s := openStore(t, dir, testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	readAll(t, b, data, 1<<16)
	verify(t, b)
	b.Close()
	s.Close()

	base := filepath.Join(dir, "blobs", "sha256", key.Encoded())
	segDir := base + ".seg"
	off, n := int64(testChunk), int64(2*testChunk)
	if err := os.MkdirAll(segDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(segDir, "0-5.tmp"), []byte("junk!"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(segDir, segmentName(off, n)), data[off:off+n], 0o600); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, testOptions()...)
	b = openBlob(t, s, key, int64(len(data)), noFetch(t))
	if _, err := os.Stat(filepath.Join(segDir, "0-5.tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unfinished segment left in place (stat: %v)", err)
	}
	readAll(t, b, data, 1<<16)
	verify(t, b)
	if got := readFileOf(t, b, off, n); !bytes.Equal(got, data[off:off+n]) {
		t.Fatal("segment content differs")
	}
	if got, most := allocated(t, base+".data"), int64(len(data))-n; got > most {
		t.Fatalf("data file uses %d bytes, want at most %d: the stale copy was not punched", got, most)
	}
}

// Readers running while segments are declared always get the right bytes.
func TestSegmentConcurrentReaders(t *testing.T) {
	data, key := content(26, 32*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	ctx := context.Background()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 4)
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func(r int) {
			defer wg.Done()
			buf := make([]byte, 3*testChunk+17)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((i*7919 + r*104729) % (len(data) - len(buf)))
				if _, err := b.ReadAt(ctx, buf, off); err != nil || !bytes.Equal(buf, data[off:off+int64(len(buf))]) {
					errs <- fmt.Errorf("wrong bytes at %d+%d while segments were declared (err %v, first diff at %d)", off, len(buf), err, firstDiff(buf, data[off:]))
					return
				}
			}
		}(r)
	}
	for i := int64(0); i < 16; i++ {
		if err := b.Segment(i*2*testChunk+i, testChunk+testChunk/3); err != nil {
			t.Error(err)
		}
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	readAll(t, b, data, 1<<16)
}

// Evicting a blob removes its segments with it.
func TestSegmentEvicted(t *testing.T) {
	dir := t.TempDir()
	data, key := content(27, 4*testChunk)
	other, otherKey := content(28, 4*testChunk)
	s := openStore(t, dir, testOptions(WithMaxBytes(6*testChunk))...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	if err := b.Segment(testChunk, testChunk); err != nil {
		t.Fatal(err)
	}
	readAll(t, b, data, 1<<16)
	verify(t, b) // no verification run holds the blob open after Close
	b.Close()
	o := openBlob(t, s, otherKey, int64(len(other)), newSource(other).fetch)
	readAll(t, o, other, 1<<16)
	seg := filepath.Join(dir, "blobs", "sha256", key.Encoded()+".seg")
	if _, err := os.Stat(seg); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("segments of an evicted blob left behind (stat: %v)", err)
	}
}

func firstDiff(a, b []byte) int64 {
	for i := range a {
		if a[i] != b[i] {
			return int64(i)
		}
	}
	return -1
}
