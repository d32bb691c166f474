package cache

import (
	"bytes"
	"context"
	"errors"
	"os"
	"slices"
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
	// Opened whole, the blob starts hashing at once; if that run has
	// discarded the content before Verify below, Verify fetches it again
	// and hashes that: the source serves the same bytes.
	other := digest.FromString("another blob")
	b = openBlob(t, s, key, size, src.fetch, WithContentDigest(other))
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

// storeLied caches the first n bytes of data under key in a store at dir
// through a handle without options whose source flips the byte at lie, as
// a lying mirror would: the records vouch for the wrong byte.
func storeLied(t *testing.T, dir string, data []byte, key digest.Digest, n, lie int64) {
	t.Helper()
	s := openStore(t, dir, testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), lying(newSource(data), lie, -1))
	if err := b.Fetch(context.Background(), 0, n); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestReuseAfterVerify: after a restart, a handle WithReuseAfterVerify is
// not served what an earlier process stored until the whole content has
// verified, while one without is (today's semantics); what it fetches
// itself it is served at once.
func TestReuseAfterVerify(t *testing.T) {
	data, key := content(301, 8*testChunk)
	size := int64(len(data))
	ctx := context.Background()

	t.Run("wrong bytes on disk", func(t *testing.T) {
		dir, control := t.TempDir(), t.TempDir()
		storeLied(t, dir, data, key, 3*testChunk, testChunk+10)
		storeLied(t, control, data, key, 3*testChunk, testChunk+10)

		// Without the option, the stored bytes are served: the test's
		// premise.
		plain := openBlob(t, openStore(t, control, testOptions()...), key, size, noFetch(t))
		if got, err := readRange(plain, testChunk, testChunk); err != nil || bytes.Equal(got, data[testChunk:2*testChunk]) {
			t.Fatalf("without the option: %v, or right bytes", err)
		}

		s := openStore(t, dir, testOptions()...)
		b := openBlob(t, s, key, size, newSource(data).fetch, WithReuseAfterVerify())
		// The read waits for the whole content, which is wrong: it is
		// discarded, and the wrong byte never served.
		got, err := readRange(b, testChunk, testChunk)
		if !errors.Is(err, ErrDigestMismatch) || len(got) > 0 {
			t.Fatalf("read of a stored chunk = %d bytes, %v; want ErrDigestMismatch", len(got), err)
		}
		readAll(t, b, data, 3000)
		verify(t, b)
	})

	t.Run("served once verified", func(t *testing.T) {
		dir := t.TempDir()
		storeLied(t, dir, data, key, 3*testChunk, -1) // lies about no byte
		s := openStore(t, dir, testOptions()...)
		src := newSource(data)
		e := errors.New("registry unreachable")
		src.fail.Store(&e)
		b := openBlob(t, s, key, size, src.fetch, WithReuseAfterVerify())
		if _, err := readRange(b, testChunk, testChunk); !errors.Is(err, e) {
			t.Fatalf("read of a stored chunk without the rest = %v, want the fetch error", err)
		}
		src.fail.Store(nil)
		verify(t, b)
		got := src.Calls()[1:] // the failed one aside
		if want := []call{{3 * testChunk, 4 * testChunk}, {7 * testChunk, testChunk}}; !slices.Equal(got, want) {
			t.Fatalf("fetch calls = %v, want %v (the missing chunks only)", got, want)
		}
		n := len(src.Calls())
		readAll(t, b, data, 3000)
		if len(src.Calls()) != n {
			t.Fatal("fetched again after Verify")
		}
	})

	t.Run("fetched here served at once", func(t *testing.T) {
		s := openStore(t, t.TempDir(), testOptions()...)
		src := newSource(data)
		b := openBlob(t, s, key, size, src.fetch, WithReuseAfterVerify())
		if err := b.Fetch(ctx, 0, testChunk); err != nil {
			t.Fatal(err)
		}
		got, err := readRange(b, 0, testChunk)
		if err != nil || !bytes.Equal(got, data[:testChunk]) || b.Complete() {
			t.Fatalf("read of a chunk fetched here: %v (complete %v)", err, b.Complete())
		}
		if want := []call{{0, testChunk}}; !slices.Equal(src.Calls(), want) {
			t.Fatalf("fetch calls = %v, want %v", src.Calls(), want)
		}
	})

	t.Run("verified by the earlier process", func(t *testing.T) {
		dir := t.TempDir()
		s, _ := Open(dir, testOptions()...)
		b, _ := s.Blob(key, size, newSource(data).fetch)
		if err := b.Verify(ctx); err != nil {
			t.Fatal(err)
		}
		b.Close()
		s.Close()
		s = openStore(t, dir, testOptions()...)
		b = openBlob(t, s, key, size, noFetch(t), WithReuseAfterVerify())
		readAll(t, b, data, 3000)
	})
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
