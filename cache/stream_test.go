package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

func openStream(t *testing.T, s *Store, key digest.Digest, wantWriter bool) *Stream {
	t.Helper()
	st, w, err := s.Stream(key)
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if w != wantWriter {
		t.Fatalf("Stream writer = %v, want %v", w, wantWriter)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// waitForStreamReaders makes the next n readers that start waiting signal
// the returned WaitGroup.
func waitForStreamReaders(t *testing.T, n int) *sync.WaitGroup {
	var wg sync.WaitGroup
	wg.Add(n)
	var once sync.Mutex
	left := n
	testHookStreamWait = func() {
		once.Lock()
		defer once.Unlock()
		if left > 0 {
			left--
			wg.Done()
		}
	}
	t.Cleanup(func() { testHookStreamWait = nil })
	return &wg
}

type readResult struct {
	n   int
	err error
	p   []byte
}

func readAsync(st *Stream, ctx context.Context, off int64, n int) chan readResult {
	ch := make(chan readResult, 1)
	go func() {
		p := make([]byte, n)
		k, err := st.ReadAt(ctx, p, off)
		ch <- readResult{k, err, p[:k]}
	}()
	return ch
}

func TestStreamReadersWaitForData(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(50, 100000)
	w := openStream(t, s, key, true)
	r := openStream(t, s, key, false)
	waiting := waitForStreamReaders(t, 2)
	mid := readAsync(r, context.Background(), 1000, 5000)
	end := readAsync(r, context.Background(), int64(len(data))-100, 1000) // past the end
	waiting.Wait()

	for off := 0; off < len(data); off += 7000 {
		if _, err := w.Write(data[off:min(off+7000, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	got := <-mid
	if got.err != nil || !bytes.Equal(got.p, data[1000:6000]) {
		t.Fatalf("waiting reader: %d, %v", got.n, got.err)
	}
	if r.Done() || r.Size() != -1 || r.Written() != int64(len(data)) {
		t.Fatalf("before Seal: Done %v Size %d Written %d", r.Done(), r.Size(), r.Written())
	}
	if _, ok := r.File(); ok {
		t.Fatal("File before Seal")
	}
	if err := w.Seal(); err != nil {
		t.Fatal(err)
	}
	got = <-end
	if got.err != io.EOF || !bytes.Equal(got.p, data[len(data)-100:]) {
		t.Fatalf("reader at the end: %d, %v", got.n, got.err)
	}
	if !r.Done() || r.Size() != int64(len(data)) {
		t.Fatal("not Done after Seal")
	}
	if _, err := r.Write([]byte("x")); !errors.Is(err, ErrNotWriter) {
		t.Fatalf("Write by a reader = %v", err)
	}
	if s.Usage() != int64(len(data)) {
		t.Fatalf("Usage = %d", s.Usage())
	}
}

func TestStreamSealMismatch(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(51, 5000)
	w := openStream(t, s, key, true)
	r := openStream(t, s, key, false)
	waiting := waitForStreamReaders(t, 1)
	res := readAsync(r, context.Background(), 4000, 2000)
	waiting.Wait()
	w.Write(data[:4500])
	w.Write([]byte("not the content"))
	if err := w.Seal(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Seal = %v, want ErrDigestMismatch", err)
	}
	if got := <-res; !errors.Is(got.err, ErrDigestMismatch) {
		t.Fatalf("waiting reader got %v", got.err)
	}
	if _, err := r.ReadAt(context.Background(), make([]byte, 10), 0); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("later read of the failed stream = %v", err)
	}
	if s.Usage() != 0 {
		t.Fatalf("Usage = %d after a failed seal", s.Usage())
	}
	// The next opener produces it again.
	w2 := openStream(t, s, key, true)
	w2.Write(data)
	if err := w2.Seal(); err != nil {
		t.Fatal(err)
	}
}

func TestStreamAbort(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(52, 5000)
	w := openStream(t, s, key, true)
	r := openStream(t, s, key, false)
	waiting := waitForStreamReaders(t, 1)
	res := readAsync(r, context.Background(), 0, 3000)
	waiting.Wait()
	w.Write(data[:1000])
	cause := errors.New("registry went away")
	w.Abort(cause)
	got := <-res
	if !errors.Is(got.err, cause) || !errors.Is(got.err, ErrAborted) {
		t.Fatalf("waiting reader got %v", got.err)
	}
	if _, err := w.Write(data); !errors.Is(err, cause) {
		t.Fatalf("Write after Abort = %v", err)
	}
	w2 := openStream(t, s, key, true)
	r2 := openStream(t, s, key, false)
	w2.Write(data)
	if err := w2.Seal(); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, len(data))
	if n, err := r2.ReadAt(context.Background(), p, 0); n != len(data) || err != nil || !bytes.Equal(p, data) {
		t.Fatalf("read of the rewritten stream: %d, %v", n, err)
	}
}

func TestStreamWriterCloseAborts(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	_, key := content(53, 100)
	w, _, _ := s.Stream(key)
	r := openStream(t, s, key, false)
	w.Close()
	if _, err := r.ReadAt(context.Background(), make([]byte, 1), 0); !errors.Is(err, ErrAborted) {
		t.Fatalf("read after the writer closed = %v", err)
	}
	openStream(t, s, key, true)
}

func TestStreamSingleWriter(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	data, key := content(54, 3000)
	const n = 8
	var wg sync.WaitGroup
	streams := make([]*Stream, n)
	writers := make([]bool, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, w, err := s.Stream(key)
			if err != nil {
				t.Error(err)
				return
			}
			streams[i], writers[i] = st, w
		}()
	}
	wg.Wait()
	var writer *Stream
	for i, w := range writers {
		t.Cleanup(func() { streams[i].Close() })
		if w {
			if writer != nil {
				t.Fatal("two writers")
			}
			writer = streams[i]
		}
	}
	if writer == nil {
		t.Fatal("no writer")
	}
	writer.Write(data)
	writer.Seal()
	for _, st := range streams {
		if !st.Done() || st.Size() != int64(len(data)) {
			t.Fatal("a handle does not see the shared stream")
		}
	}
}

func TestStreamReopenSealed(t *testing.T) {
	dir := t.TempDir()
	data, key := content(55, 20000)
	s, _ := Open(dir, testOptions()...)
	w, _, _ := s.Stream(key)
	w.Write(data)
	if err := w.Seal(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	// Sealed and unreferenced: opens complete, without a writer.
	r, writer, err := s.Stream(key)
	if err != nil || writer || !r.Done() {
		t.Fatalf("reopen: writer %v, err %v", writer, err)
	}
	r.Close()
	s.Close()

	s = openStore(t, dir, testOptions()...)
	if s.Usage() != int64(len(data)) {
		t.Fatalf("Usage after restart = %d", s.Usage())
	}
	r = openStream(t, s, key, false)
	if !r.Done() || r.Size() != int64(len(data)) {
		t.Fatal("sealed stream not Done after restart")
	}
	p := make([]byte, 30000)
	n, err := r.ReadAt(context.Background(), p, 0)
	if n != len(data) || err != io.EOF || !bytes.Equal(p[:n], data) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	f, ok := r.File()
	if !ok {
		t.Fatal("no File of a sealed stream")
	}
	if all, err := io.ReadAll(f); err != nil || !bytes.Equal(all, data) {
		t.Fatal("File content differs")
	}
}

func TestStreamUnsealedDiscardedOnRestart(t *testing.T) {
	dir := t.TempDir()
	data, key := content(56, 2000)
	s, _ := Open(dir, testOptions()...)
	w, _, _ := s.Stream(key)
	w.Write(data[:1000])
	s.Close() // as after a crash: never sealed
	s = openStore(t, dir, testOptions()...)
	if s.Usage() != 0 {
		t.Fatalf("Usage = %d", s.Usage())
	}
	openStream(t, s, key, true)
}

func TestStreamReadCancelled(t *testing.T) {
	s := openStore(t, t.TempDir(), testOptions()...)
	_, key := content(57, 10)
	openStream(t, s, key, true)
	r := openStream(t, s, key, false)
	ctx, cancel := context.WithCancel(context.Background())
	waiting := waitForStreamReaders(t, 1)
	res := readAsync(r, ctx, 0, 10)
	waiting.Wait()
	cancel()
	if got := <-res; !errors.Is(got.err, context.Canceled) {
		t.Fatalf("read = %v, want context.Canceled", got.err)
	}
}

func TestStreamEviction(t *testing.T) {
	const bound = 3000
	s := openStore(t, t.TempDir(), testOptions(WithMaxBytes(bound))...)
	for i := range 3 {
		data, key := content(uint64(60+i), 2000)
		w, _, _ := s.Stream(key)
		w.Write(data)
		if err := w.Seal(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		if s.Usage() > bound {
			t.Fatalf("Usage = %d > %d", s.Usage(), bound)
		}
	}
	_, key := content(60, 2000)
	openStream(t, s, key, true) // evicted: produced again
}

func TestStreamCorruptedOnDiskIsProducedAgain(t *testing.T) {
	dir := t.TempDir()
	data, key := content(56, 20000)
	s := openStore(t, dir, testOptions()...)
	w := openStream(t, s, key, true)
	w.Write(data)
	if err := w.Seal(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	s.Close()

	// Flip a byte of the sealed file while no process has it open.
	path := filepath.Join(dir, "streams")
	var file string
	filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(p, key.Encoded()) {
			file = p
		}
		return nil
	})
	if file == "" {
		t.Fatal("sealed stream file not found")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir, testOptions()...)
	w = openStream(t, s, key, true) // corrupt: discarded, to be produced again
	if w.Done() {
		t.Fatal("a corrupted sealed stream opened as done")
	}
	w.Write(data)
	if err := w.Seal(); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, len(data))
	if n, err := w.ReadAt(context.Background(), p, 0); n != len(data) || (err != nil && err != io.EOF) || !bytes.Equal(p, data) {
		t.Fatalf("ReadAt after reproducing = %d, %v", n, err)
	}
	w.Close()
}
