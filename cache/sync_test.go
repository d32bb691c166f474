package cache

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
)

// Fetched chunks are left to the kernel's writeback: only a complete
// record, once due, has the blob's data synced before it.
func TestFetchesAreNotSynced(t *testing.T) {
	data, key := content(93, 8*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	var marked atomic.Int32
	testHookMarkDirty = func(*blob) { marked.Add(1) }
	t.Cleanup(func() { testHookMarkDirty = nil })
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	for _, off := range []int64{0, 3 * testChunk, 7 * testChunk} {
		if err := b.Fetch(context.Background(), off, testChunk); err != nil {
			t.Fatal(err)
		}
	}
	if n := marked.Load(); n != 0 {
		t.Fatalf("fetches scheduled %d flushes, want none", n)
	}
	if !b.b.st.dataDirty.Load() {
		t.Fatal("fetched data was synced")
	}
	verify(t, b)
	if marked.Load() == 0 {
		t.Error("completing the blob scheduled no flush")
	}
	if b.b.st.dataDirty.Load() {
		t.Error("the blob's data is not synced once Verify returns")
	}
}

// A file whose sync failed is still dirty, so that the next flush syncs
// it before it appends a complete record.
func TestFailedSyncStaysDirty(t *testing.T) {
	data, key := content(94, 2*testChunk)
	s := openStore(t, t.TempDir(), testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	if err := b.Fetch(context.Background(), 0, testChunk); err != nil {
		t.Fatal(err)
	}
	closed, err := os.Create(filepath.Join(t.TempDir(), "closed"))
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	st := &b.b.st
	data0 := st.data
	st.data = closed // fdatasync fails: EBADF
	err = st.sync()
	st.data = data0
	if err == nil {
		t.Fatal("sync of a closed file succeeded")
	}
	if !st.dataDirty.Load() {
		t.Fatal("a failed sync cleared the dirty flag")
	}
	if err := st.sync(); err != nil {
		t.Fatal(err)
	}
	if st.dataDirty.Load() {
		t.Error("dirty after a sync that succeeded")
	}
}
