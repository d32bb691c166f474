package cache

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

// namespaced is a key a caller could keep a blob of real under: its own,
// not the content's digest.
func namespaced(real digest.Digest) digest.Digest {
	return digest.FromString("registry.example/team/model@" + real.String())
}

// TestContentDigest: a blob kept under a key of the caller's own verifies
// against the content digest it is given, also across a restart; without
// it, or with another one, it does not.
func TestContentDigest(t *testing.T) {
	dir := t.TempDir()
	data, real := content(300, 5*testChunk+3)
	key := namespaced(real)
	size := int64(len(data))
	src := newSource(data)
	s, _ := Open(dir, testOptions()...)
	b, err := s.Blob(key, size, src.fetch, WithContentDigest(real))
	if err != nil {
		t.Fatal(err)
	}
	verify(t, b)
	if _, err := s.Blob(key, size, src.fetch); !errors.Is(err, ErrDigestConflict) {
		t.Fatalf("Blob hashing to the key while open to hash to another: %v, want ErrDigestConflict", err)
	}
	if _, err := s.Blob(key, size, src.fetch, WithContentDigest("sha256:nothex")); err == nil {
		t.Fatal("Blob with an invalid content digest")
	}
	b.Close()
	s.Close()

	s = openStore(t, dir, testOptions()...)
	b = openBlob(t, s, key, size, noFetch(t), WithContentDigest(real))
	if !b.Complete() {
		t.Fatal("verified blob not Complete after a restart")
	}
	readAll(t, b, data, 4000)
	b.Close()

	// The complete record names the digest it was verified against.
	other := digest.FromString("another blob")
	b = openBlob(t, s, key, size, noFetch(t), WithContentDigest(other))
	if b.Complete() {
		t.Fatal("Complete for another content digest")
	}
	if err := b.Verify(context.Background()); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Verify against another digest = %v, want ErrDigestMismatch", err)
	}
	b.Close()

	// Without the option, the key is the digest: the content is not it.
	b = openBlob(t, s, key, size, src.fetch)
	if err := b.Verify(context.Background()); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Verify against the key = %v, want ErrDigestMismatch", err)
	}
}

// TestStreamDigest: a stream kept under a key of its own is sealed, and
// re-verified when found on disk, against the digest it is given.
func TestStreamDigest(t *testing.T) {
	dir := t.TempDir()
	data, diffID := content(302, 20000)
	key := digest.FromString("the compressed blob")
	s, _ := Open(dir, testOptions()...)

	w, writer, err := s.Stream(key)
	if err != nil || !writer {
		t.Fatalf("Stream: %v, writer %v", err, writer)
	}
	w.Write(data)
	if err := w.Seal(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Seal against the key = %v, want ErrDigestMismatch", err)
	}
	w.Close()

	w, writer, err = s.Stream(key, WithStreamDigest(diffID))
	if err != nil || !writer {
		t.Fatalf("Stream: %v, writer %v", err, writer)
	}
	if _, _, err := s.Stream(key); !errors.Is(err, ErrDigestConflict) {
		t.Fatalf("Stream to hash to the key while open to hash to another: %v, want ErrDigestConflict", err)
	}
	w.Write(data)
	if err := w.Seal(); err != nil {
		t.Fatalf("Seal against the stream digest: %v", err)
	}
	w.Close()
	s.Close()

	s = openStore(t, dir, testOptions()...)
	r := openStreamWith(t, s, key, false, WithStreamDigest(diffID))
	got := make([]byte, len(data))
	if _, err := r.ReadAt(context.Background(), got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("sealed stream after a restart: %v", err)
	}
	r.Close()

	// Found on disk and hashed against another digest: produced again.
	other := digest.FromString("another diff ID")
	openStreamWith(t, s, key, true, WithStreamDigest(other)).Close()
	if _, err := os.Stat(s.streamPath(key)); !os.IsNotExist(err) {
		t.Fatalf("sealed stream that does not match its digest kept: %v", err)
	}
}

func openStreamWith(t *testing.T, s *Store, key digest.Digest, wantWriter bool, opts ...StreamOption) *Stream {
	t.Helper()
	st, w, err := s.Stream(key, opts...)
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if w != wantWriter {
		t.Fatalf("Stream writer = %v, want %v", w, wantWriter)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
