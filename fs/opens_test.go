package fs

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
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

// TestOpenTableWrittenInPlace: a table of up to a page is written over
// its file in place (the file stays the same inode), padded with spaces
// when it shrinks; a larger one replaces the file; and whatever was
// written, a successor (or an earlier version, which reads the file as
// plain JSON) loads exactly the table the last save wrote.
func TestOpenTableWrittenInPlace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "opens")
	tbl, err := openTableAt(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tbl.remove)
	// held returns the file at path, held open so that its inode is not
	// reused: same reports whether path is still that file.
	held := func() (same func() bool) {
		t.Helper()
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return func() bool {
			a, err1 := f.Stat()
			b, err2 := os.Stat(path)
			return err1 == nil && err2 == nil && os.SameFile(a, b)
		}
	}
	check := func(what string) {
		t.Helper()
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var tf tableFile
		if err := json.Unmarshal(raw, &tf); err != nil {
			t.Fatalf("%s: the file is not JSON: %v", what, err)
		}
		succ, err := openTableAt(path, true)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !reflect.DeepEqual(succ.byIno, tbl.byIno) || !slices.Equal(succ.applied, tbl.applied) {
			t.Fatalf("%s: loaded %v %v, want %v %v", what, succ.byIno, succ.applied, tbl.byIno, tbl.applied)
		}
	}
	unique := uint64(0)
	open := func(ino uint64) {
		t.Helper()
		unique += 2
		if _, err := tbl.open(ino, unique, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	release := func(ino uint64) {
		t.Helper()
		unique += 2
		if err := tbl.release(ino, unique, false, nil); err != nil {
			t.Fatal(err)
		}
	}

	first := held()
	for ino := range uint64(20) {
		open(1000 + ino)
	}
	if !first() {
		t.Fatal("a small table was not written in place")
	}
	check("grown in place")
	for ino := range uint64(10) {
		release(1000 + ino)
	}
	if raw, _ := os.ReadFile(path); !bytes.HasSuffix(raw, []byte(" ")) {
		t.Fatalf("a shrunk table is not padded: %q", raw)
	}
	check("shrunk in place")

	for ino := range uint64(300) { // well over a page
		open(5000 + ino)
	}
	if fi, _ := os.Stat(path); fi.Size() <= inPlaceMax || first() {
		t.Fatalf("a table of %d bytes was written in place", fi.Size())
	}
	check("grown past a page")
	for ino := range uint64(300) {
		release(5000 + ino)
	}
	check("shrunk back")
	small := held()
	open(42)
	release(42)
	if !small() {
		t.Fatal("a table that fits a page again is not written in place")
	}
	check("in place again")
}

// BenchmarkOpenTable is what the open table adds to an open and its
// release, with the table on the test's temporary directory's disk.
func BenchmarkOpenTable(b *testing.B) {
	tbl, err := openTableAt(filepath.Join(b.TempDir(), "opens"), false)
	if err != nil {
		b.Fatal(err)
	}
	defer tbl.remove()
	for ino := range uint64(8) { // a few files held open
		tbl.open(100+ino, 1+2*ino, nil, nil)
	}
	unique := uint64(1000)
	for b.Loop() {
		unique += 4
		if _, err := tbl.open(7, unique, nil, nil); err != nil {
			b.Fatal(err)
		}
		if err := tbl.release(7, unique+2, false, nil); err != nil {
			b.Fatal(err)
		}
	}
}
