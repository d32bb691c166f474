package cache

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
)

const testChunk = 4096

// TestMain keeps the cache's expected warnings (corrupt chunks dropped,
// digest mismatches) out of the test output unless -v is given.
func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	}
	os.Exit(m.Run())
}

// testOptions uses small chunks so tests exercise many of them with
// little data: fetches coalesce up to 4 chunks.
func testOptions(more ...Option) []Option {
	return append([]Option{WithChunkSize(testChunk), WithMaxFetch(4 * testChunk)}, more...)
}

// content returns n pseudo-random bytes (fixed by seed) and their digest.
func content(seed uint64, n int) ([]byte, digest.Digest) {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b, digest.FromBytes(b)
}

type call struct{ off, n int64 }

// source is a FetchFunc over data that records its calls; wrong, when
// set, alters what it returns, and fail makes it fail.
type source struct {
	data  []byte
	mu    sync.Mutex
	calls []call
	wrong atomic.Bool
	fail  atomic.Pointer[error]
	// block, when set, is waited for inside every fetch.
	block chan struct{}
}

func newSource(data []byte) *source { return &source{data: data} }

func (s *source) fetch(ctx context.Context, p []byte, off int64) error {
	s.mu.Lock()
	s.calls = append(s.calls, call{off, int64(len(p))})
	s.mu.Unlock()
	if s.block != nil {
		select {
		case <-s.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if e := s.fail.Load(); e != nil {
		return *e
	}
	if off < 0 || off+int64(len(p)) > int64(len(s.data)) {
		return errors.New("fetch past the end")
	}
	copy(p, s.data[off:])
	if s.wrong.Load() {
		p[len(p)/2] ^= 0xff
	}
	return nil
}

func (s *source) Calls() []call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]call(nil), s.calls...)
}

func (s *source) fetchedBytes() int64 {
	var n int64
	for _, c := range s.Calls() {
		n += c.n
	}
	return n
}

// noFetch fails the test if called.
func noFetch(t *testing.T) FetchFunc {
	return func(ctx context.Context, p []byte, off int64) error {
		t.Errorf("unexpected fetch [%d, %d)", off, off+int64(len(p)))
		return errors.New("unexpected fetch")
	}
}

func openStore(t testing.TB, dir string, opts ...Option) *Store {
	t.Helper()
	s, err := Open(dir, opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func openBlob(t testing.TB, s *Store, key digest.Digest, size int64, fetch FetchFunc, opts ...BlobOption) *Blob {
	t.Helper()
	b, err := s.Blob(key, size, fetch, opts...)
	if err != nil {
		t.Fatalf("Blob: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// readAll reads the whole blob with reads of size step and compares it to want.
func readAll(t *testing.T, b *Blob, want []byte, step int) {
	t.Helper()
	got := make([]byte, 0, len(want))
	buf := make([]byte, step)
	for off := int64(0); ; {
		n, err := b.ReadAt(context.Background(), buf, off)
		got = append(got, buf[:n]...)
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("ReadAt(%d): %v", off, err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes that differ from the content (%d bytes)", len(got), len(want))
	}
}

// verify waits for whole-content verification and requires success.
func verify(t *testing.T, b *Blob) {
	t.Helper()
	if err := b.Verify(context.Background()); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !b.Complete() {
		t.Fatal("not Complete after Verify")
	}
}

// tableOf returns the BLAKE3 chunk table of data in chunks of chunkSize
// bytes, as pack writes them.
func tableOf(data []byte, chunkSize int64) *chunks.Table {
	return tableOfHash(data, chunkSize, chunks.BLAKE3)
}

// tableOfHash returns the chunk table of data in algorithm h, built by
// hand: chunks.Compute refuses chunks as small as the tests use.
func tableOfHash(data []byte, chunkSize int64, h chunks.Hash) *chunks.Table {
	t := &chunks.Table{Hash: h, ChunkSize: chunkSize, Size: int64(len(data))}
	for off := int64(0); off < int64(len(data)); off += chunkSize {
		hh := t.NewHash()
		hh.Write(data[off:min(off+chunkSize, int64(len(data)))])
		var d [chunks.DigestSize]byte
		hh.Sum(d[:0])
		t.Digests = append(t.Digests, d)
	}
	return t
}

// lying returns a FetchFunc over src that flips the byte at off `at` in
// the first lies fetches that cover it, or in every one if lies < 0.
func lying(src *source, at int64, lies int32) FetchFunc {
	var told atomic.Int32
	return func(ctx context.Context, p []byte, off int64) error {
		if err := src.fetch(ctx, p, off); err != nil {
			return err
		}
		if at >= off && at < off+int64(len(p)) && (lies < 0 || told.Add(1) <= lies) {
			p[at-off] ^= 0x5a
		}
		return nil
	}
}

// readRange reads n bytes at off through b.
func readRange(b *Blob, off, n int64) ([]byte, error) {
	p := make([]byte, n)
	k, err := b.ReadAt(context.Background(), p, off)
	if err == io.EOF && int64(k) == n {
		err = nil
	}
	return p[:k], err
}

// blobFiles returns the paths of the data and records files of key in the
// store at dir.
func blobFiles(dir string, key digest.Digest) (data, rec string) {
	base := filepath.Join(dir, "blobs", string(key.Algorithm()), key.Encoded())
	return base + ".data", base + ".rec"
}
