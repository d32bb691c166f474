package cache

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

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
