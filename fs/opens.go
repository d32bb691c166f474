package fs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// openTable counts, per inode, the open handles of each kind, and holds
// the passthrough backing ID the kernel reads from while passthrough
// handles are open.
//
// The kernel fails (EIO) the open of a file in passthrough mode while it
// is open in caching mode and the other way round, and every passthrough
// open of an inode must name the same backing file, so every open follows
// the kind of those still open. These counts are the one part of a mount's
// state that the layer does not give: a process taking over a connection
// (Resume) reads them from the file the former process kept them in,
// written before each open or release is answered (a failed write is
// logged, not fatal: this process serves on). The file needs no
// fsync: it must survive the process, not the machine, whose crash ends
// the connection too.
type openTable struct {
	mu   sync.Mutex
	path string // "" keeps nothing
	// f is the file at path, open for writing in place (see save), and
	// size its length; nil until the first save, and after a failed one.
	f     *os.File
	size  int
	byIno map[uint64]*openState
	// applied are the requests (their unique IDs) last counted: a
	// process that dies after writing the table and before its answer
	// reaches the kernel has the request resent to its successor, which
	// must not count it again.
	applied []uint64
}

// tableFile is the open table's file.
type tableFile struct {
	Files   map[string]*openState `json:"files"`
	Applied []uint64              `json:"applied,omitempty"`
}

const (
	// resendBit marks a request the kernel sends again
	// (FUSE_UNIQUE_RESEND).
	resendBit = 1 << 63
	// maxApplied bounds the requests remembered: only those a dead
	// process was answering when it died can come back.
	maxApplied = 256
)

type openState struct {
	Cached  int   `json:"c,omitempty"`
	Pass    int   `json:"p,omitempty"`
	Backing int32 `json:"b,omitempty"`
}

// backingFiles registers and closes passthrough backing files;
// *fuse.Server is one.
type backingFiles interface {
	RegisterBackingFd(*fuse.BackingMap) (int32, syscall.Errno)
	UnregisterBackingFd(id int32) syscall.Errno
}

// openTableAt returns the table kept at path: the one there if load is
// set (empty if there is none), else a new empty one, written over it.
func openTableAt(path string, load bool) (*openTable, error) {
	t := &openTable{path: path, byIno: map[uint64]*openState{}}
	if path == "" {
		return t, nil
	}
	if !load {
		if err := t.save(); err != nil {
			return nil, err
		}
		return t, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open table: %w", err)
	}
	var tf tableFile
	if err := json.Unmarshal(b, &tf); err != nil {
		return nil, fmt.Errorf("open table %s: %w", path, err)
	}
	t.applied = tf.Applied
	for k, s := range tf.Files {
		ino, err := strconv.ParseUint(k, 10, 64)
		if err != nil || s == nil {
			return nil, fmt.Errorf("open table %s: bad entry %q", path, k)
		}
		t.byIno[ino] = s
	}
	return t, nil
}

// counted reports whether request unique, resent, was counted before;
// if not, it is remembered as counted now.
func (t *openTable) counted(unique uint64) bool {
	u := unique &^ resendBit
	if unique&resendBit != 0 && slices.Contains(t.applied, u) {
		return true
	}
	t.applied = append(t.applied, u)
	if len(t.applied) > maxApplied {
		t.applied = t.applied[len(t.applied)-maxApplied:]
	}
	return false
}

// open counts an open of ino (request unique) and returns the backing ID
// to pass it through with, or 0 to serve it through Read. file, if not
// nil, gives the local file holding ino's content when it is all there.
func (t *openTable) open(ino, unique uint64, file func() (*os.File, bool), bf backingFiles) (int32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.byIno[ino]
	if s == nil {
		s = &openState{}
		t.byIno[ino] = s
	}
	if t.counted(unique) {
		return s.Backing, nil
	}
	switch {
	case s.Pass > 0:
		s.Pass++
	case s.Cached > 0 || file == nil:
		s.Cached++
	default:
		s.Backing = register(file, bf)
		if s.Backing != 0 {
			s.Pass++
		} else {
			s.Cached++
		}
	}
	return s.Backing, t.save()
}

// register registers ino's local file as a backing file; 0 if there is
// none or the kernel refuses it.
func register(file func() (*os.File, bool), bf backingFiles) int32 {
	f, ok := file()
	if !ok || bf == nil {
		return 0
	}
	id, errno := bf.RegisterBackingFd(&fuse.BackingMap{Fd: int32(f.Fd())})
	if errno != 0 {
		return 0
	}
	return id
}

// release counts down an open handle of ino (request unique); the last
// passthrough handle closes the backing ID. A release that finds no open
// of its kind (the table of a process that died before writing it)
// changes nothing.
func (t *openTable) release(ino, unique uint64, pass bool, bf backingFiles) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.byIno[ino]
	if s == nil || t.counted(unique) {
		return nil
	}
	var err error
	switch {
	case pass && s.Pass > 0:
		s.Pass--
		if s.Pass == 0 && s.Backing != 0 && bf != nil {
			if errno := bf.UnregisterBackingFd(s.Backing); errno != 0 {
				err = fmt.Errorf("close backing file %d: %w", s.Backing, errno)
			}
			s.Backing = 0
		}
	case !pass && s.Cached > 0:
		s.Cached--
	}
	if s.Pass == 0 && s.Cached == 0 {
		delete(t.byIno, ino)
	}
	return errors.Join(err, t.save())
}

// inPlaceMax is the longest table save writes in place: one page.
const inPlaceMax = 4096

// save writes the table to its file, so that a process killed at any
// point leaves either the table before or the table after.
//
// A table of up to a page is written over the file in place, padded with
// spaces (which JSON allows after the value) to the file's length rather
// than truncating it: a write of one page at offset 0 is made whole or not
// at all even if the process is killed during it (the kernel checks for
// a fatal signal only between pages), and it costs a microsecond, where
// writing a new file and renaming it over the table costs ext4 0.3 ms
// (BenchmarkOpenTable), paid on every open and release. A larger table goes to a new file,
// renamed over the old. Either way the file is the JSON that every
// version reads.
func (t *openTable) save() error {
	if t.path == "" {
		return nil
	}
	tf := tableFile{Files: make(map[string]*openState, len(t.byIno)), Applied: t.applied}
	for ino, s := range t.byIno {
		tf.Files[strconv.FormatUint(ino, 10)] = s
	}
	b, err := json.Marshal(tf)
	if err != nil {
		return err
	}
	if t.f != nil && max(len(b), t.size) <= inPlaceMax {
		if len(b) < t.size {
			b = append(b, bytes.Repeat([]byte(" "), t.size-len(b))...)
		}
		if _, err := t.f.WriteAt(b, 0); err == nil {
			t.size = len(b)
			return nil
		}
		// Replace it, and write the new one in place from then on.
		t.f.Close()
		t.f = nil
	}
	return t.replace(b)
}

// replace writes b to a new file renamed over the table's, and opens it
// for the next save to write in place.
func (t *openTable) replace(b []byte) error {
	tmp := t.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("open table: %w", err)
	}
	if err := os.Rename(tmp, t.path); err != nil {
		return fmt.Errorf("open table: %w", err)
	}
	if t.f != nil {
		t.f.Close()
	}
	t.f, t.size = nil, len(b)
	if f, err := os.OpenFile(t.path, os.O_WRONLY, 0); err == nil {
		t.f = f
	}
	return nil
}

// remove deletes the table's file, once the mount is gone.
func (t *openTable) remove() {
	if t.path != "" {
		t.mu.Lock()
		if t.f != nil {
			t.f.Close()
			t.f = nil
		}
		t.mu.Unlock()
		_ = os.Remove(t.path)
		_ = os.Remove(t.path + ".tmp")
	}
}
