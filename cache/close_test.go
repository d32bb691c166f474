package cache

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A range ReadFile handed out stays readable through its file descriptor
// until it is released, even if the Store is closed meanwhile: the caller
// splices from the raw descriptor, which must not be closed (and perhaps
// reused by another open) under it.
func TestCloseWaitsForHandedOutRange(t *testing.T) {
	data, key := content(90, 4*testChunk)
	s, err := Open(t.TempDir(), testOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	off, n := int64(testChunk+3), int64(100)
	f, fileOff, release, err := b.ReadFile(context.Background(), off, n)
	if err != nil {
		t.Fatal(err)
	}
	fd := int(f.Fd())
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	var closeErr error
	select {
	case closeErr = <-closed:
		t.Error("Store.Close returned while a range was handed out")
		closed <- closeErr
	case <-time.After(100 * time.Millisecond):
	}
	got := make([]byte, n)
	if _, err := unix.Pread(fd, got, fileOff); err != nil || !bytes.Equal(got, data[off:off+n]) {
		t.Errorf("handed-out range unreadable after Store.Close began: %v", err)
	}
	release()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
}

// Handles left open across Store.Close fail with ErrClosed, whichever read
// path they take, rather than reading closed files.
func TestHandlesFailAfterStoreClose(t *testing.T) {
	data, key := content(91, 4*testChunk)
	s, err := Open(t.TempDir(), testOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	verify(t, b)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := b.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Store.Close = %v, want ErrClosed", err)
	}
	if _, _, _, err := b.ReadFile(ctx, 0, 10); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadFile after Store.Close = %v, want ErrClosed", err)
	}
	if err := b.Check(ctx, 0, 10); !errors.Is(err, ErrClosed) {
		t.Errorf("Check after Store.Close = %v, want ErrClosed", err)
	}
}

// Once a Store is closed, its directory belongs to whoever opens it next:
// a handle released afterwards must not remove or touch files there.
func TestReleaseAfterStoreCloseLeavesFiles(t *testing.T) {
	dir := t.TempDir()
	data, key := content(92, 4*testChunk)
	s, err := Open(dir, testOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	// Opened and never fetched: on release, a store still open removes
	// such a key's empty files.
	stale, err := s.Blob(key, int64(len(data)), noFetch(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s2 := openStore(t, dir, testOptions()...)
	b := openBlob(t, s2, key, int64(len(data)), newSource(data).fetch)
	if err := b.Fetch(context.Background(), 0, testChunk); err != nil {
		t.Fatal(err)
	}
	stale.Close()
	rec := filepath.Join(dir, "blobs", "sha256", key.Encoded()+".rec")
	if _, err := os.Stat(rec); err != nil {
		t.Fatalf("the closed store's handle removed the next store's records: %v", err)
	}
	b.Close()
	s2.Close()
	s3 := openStore(t, dir, testOptions()...)
	b = openBlob(t, s3, key, int64(len(data)), noFetch(t))
	if b.CachedBytes() != testChunk {
		t.Fatalf("%d bytes cached after a restart, want %d", b.CachedBytes(), testChunk)
	}
}
