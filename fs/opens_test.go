package fs

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// fakeBacking hands out backing IDs and counts the open ones.
type fakeBacking struct{ next, open int32 }

func (b *fakeBacking) RegisterBackingFd(*fuse.BackingMap) (int32, syscall.Errno) {
	b.next++
	b.open++
	return b.next, 0
}

func (b *fakeBacking) UnregisterBackingFd(int32) syscall.Errno {
	b.open--
	return 0
}

// TestResentRequestsCountOnce: an open and a release that a dead process
// counted, then sent again by the kernel to its successor (the resend
// bit set), change nothing the second time, even across the table's file.
func TestResentRequestsCountOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "opens")
	tbl, err := openTableAt(path, false)
	if err != nil {
		t.Fatal(err)
	}
	bf := &fakeBacking{}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	file := func() (*os.File, bool) { return f, true }
	const ino = 7
	id, err := tbl.open(ino, 10, file, bf) // passed through
	if err != nil || id != 1 {
		t.Fatalf("open: backing %d, %v", id, err)
	}
	if _, err := tbl.open(ino, 11, file, bf); err != nil { // a second handle
		t.Fatal(err)
	}

	// The process died after counting release 12; its successor reads
	// the table and gets 12 again, resent, then 11's handle's release.
	if err := tbl.release(ino, 12, true, bf); err != nil {
		t.Fatal(err)
	}
	succ, err := openTableAt(path, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := succ.release(ino, 12|resendBit, true, bf); err != nil {
		t.Fatal(err)
	}
	if s := succ.byIno[ino]; s == nil || s.Pass != 1 || s.Backing != 1 || bf.open != 1 {
		t.Fatalf("after a resent release: %+v, %d backing files open; want one handle on backing 1", s, bf.open)
	}
	// A resent open counted before returns the same backing ID.
	if id, err := succ.open(ino, 11|resendBit, file, bf); err != nil || id != 1 || succ.byIno[ino].Pass != 1 {
		t.Fatalf("a resent open: backing %d, %v, state %+v", id, err, succ.byIno[ino])
	}
	if err := succ.release(ino, 13, true, bf); err != nil {
		t.Fatal(err)
	}
	if _, ok := succ.byIno[ino]; ok || bf.open != 0 {
		t.Fatalf("after the last release: %+v, %d backing files open", succ.byIno[ino], bf.open)
	}
	// A request never counted, though resent, is counted.
	if _, err := succ.open(ino, 14|resendBit, nil, bf); err != nil || succ.byIno[ino].Cached != 1 {
		t.Fatalf("a resent open not counted before: %+v, %v", succ.byIno[ino], err)
	}
}
