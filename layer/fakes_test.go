package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"

	digest "github.com/opencontainers/go-digest"
)

// memSource is a Source over bytes that counts what is read.
type memSource struct {
	b         []byte
	bytesRead atomic.Int64
	reads     atomic.Int64
}

func (s *memSource) Size() int64 { return int64(len(s.b)) }

// Invalidate keeps nothing to drop.
func (s *memSource) Invalidate(off, n int64) {}

func (s *memSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.reads.Add(1)
	n, err := bytes.NewReader(s.b).ReadAt(p, off)
	s.bytesRead.Add(int64(n))
	return n, err
}

// corruptSource serves wrong bytes in [badOff, badOff+badLen) until that
// range is invalidated (if healing) — a cache holding a bad fetch.
type corruptSource struct {
	memSource
	mu             sync.Mutex
	badOff, badLen int64
	healing        bool
	invalidations  int
}

func (s *corruptSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := s.memSource.ReadAt(ctx, p, off)
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range p[:n] {
		if o := off + int64(i); o >= s.badOff && o < s.badOff+s.badLen {
			p[i] ^= 0x5a
		}
	}
	return n, err
}

func (s *corruptSource) Invalidate(off, n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.invalidations++
	if s.healing && off <= s.badOff && s.badOff+s.badLen <= off+n {
		s.badLen = 0
	}
}

// memMeta is a MetaStore in memory.
type memMeta struct {
	mu sync.Mutex
	m  map[string][]byte
}

func newMemMeta() *memMeta { return &memMeta{m: map[string][]byte{}} }

func (m *memMeta) PutMeta(name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.m[name] = bytes.Clone(data)
	return nil
}

func (m *memMeta) GetMeta(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.m[name]
	if !ok {
		return nil, fmt.Errorf("meta %q: %w", name, fs.ErrNotExist)
	}
	return bytes.Clone(b), nil
}

// memStreams is a StreamStore in memory; the first opener of a key writes.
type memStreams struct {
	mu   sync.Mutex
	m    map[digest.Digest]*memStream
	keep int64 // see memStream
}

func newMemStreams() *memStreams { return &memStreams{m: map[digest.Digest]*memStream{}} }

// newDiscardingStreams keeps only the first keep bytes of each stream, so
// that a test can stream more than it could hold.
func newDiscardingStreams(keep int64) *memStreams {
	s := newMemStreams()
	s.keep = keep
	return s
}

func (s *memStreams) Stream(key, content digest.Digest) (Stream, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.m[key]; ok {
		return &streamHandle{st}, false, nil
	}
	st := &memStream{key: content, changed: make(chan struct{}), keep: s.keep, h: sha256.New()}
	s.m[key] = st
	return &streamHandle{st}, true, nil
}

type memStream struct {
	key     digest.Digest // what the content must hash to
	mu      sync.Mutex
	buf     []byte
	keep    int64 // if > 0, bytes past it are hashed and counted, not kept
	n       int64 // bytes written
	h       hash.Hash
	sealed  bool
	err     error
	changed chan struct{}
}

type streamHandle struct{ *memStream }

func (h *streamHandle) Close() error { return nil }

func (s *memStream) broadcast() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *memStream) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sealed || s.err != nil {
		return 0, fmt.Errorf("write to ended stream")
	}
	if s.keep <= 0 || int64(len(s.buf)) < s.keep {
		k := len(p)
		if s.keep > 0 {
			k = int(min(int64(k), s.keep-int64(len(s.buf))))
		}
		s.buf = append(s.buf, p[:k]...)
	}
	s.h.Write(p)
	s.n += int64(len(p))
	s.broadcast()
	return len(p), nil
}

func (s *memStream) Seal() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if got := digest.NewDigest(digest.SHA256, s.h); got != s.key {
		s.err = fmt.Errorf("stream digest %s, want %s", got, s.key)
	} else {
		s.sealed = true
	}
	s.broadcast()
	return s.err
}

func (s *memStream) Abort(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil && !s.sealed {
		s.err = err
	}
	s.broadcast()
}

func (s *memStream) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	for {
		s.mu.Lock()
		if off+int64(len(p)) <= int64(len(s.buf)) {
			n := copy(p, s.buf[off:])
			s.mu.Unlock()
			return n, nil
		}
		if off+int64(len(p)) <= s.n {
			s.mu.Unlock()
			return 0, fmt.Errorf("test stream: [%d,+%d) was discarded", off, len(p))
		}
		if s.err != nil {
			err := s.err
			s.mu.Unlock()
			return 0, err
		}
		if s.sealed {
			n := 0
			if off < int64(len(s.buf)) {
				n = copy(p, s.buf[off:])
			}
			s.mu.Unlock()
			return n, io.EOF
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (s *memStream) Written() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

func (s *memStream) Done() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sealed && s.err == nil
}

// tarFile is one entry of a test tar.
type tarFile struct {
	hdr  tar.Header
	data []byte
}

// buildTar writes files as a tar (PAX format where needed).
func buildTar(t testing.TB, files []tarFile) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := f.hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(f.data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(f.data); err != nil {
			t.Fatalf("write %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// retype sets the type of the tar header block hdr and its checksum, to
// write what archive/tar's writer will not.
func retype(hdr []byte, typ byte) {
	hdr[156] = typ
	copy(hdr[148:156], "        ")
	sum := 0
	for _, c := range hdr[:512] {
		sum += int(c)
	}
	copy(hdr[148:156], fmt.Sprintf("%06o\x00 ", sum))
}

func sha(b []byte) digest.Digest {
	return digest.NewDigestFromBytes(digest.SHA256, func() []byte { h := sha256.Sum256(b); return h[:] }())
}

// readAll reads e's whole content through l.
func readAll(t testing.TB, ctx context.Context, l Layer, e *Entry) []byte {
	t.Helper()
	out := make([]byte, 0, e.Size)
	buf := make([]byte, 100_000) // not a chunk multiple: reads straddle chunks
	for off := int64(0); ; {
		n, err := l.ReadAt(ctx, e, buf, off)
		out = append(out, buf[:n]...)
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read %q at %d: %v", e.Name, off, err)
		}
	}
	return out
}

// zstdChunked is the zstd:chunked compression for estargz.Build.
type zstdChunked struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}
