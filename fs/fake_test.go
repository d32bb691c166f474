package fs

import (
	"context"
	"errors"
	"io"
	iofs "io/fs"
	"path"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
)

// fakeLayer is an in-memory layer.Layer. It is built with its add methods
// before mounting and read-only afterwards.
type fakeLayer struct {
	entries map[string]*layer.Entry
	content map[uint64][]byte // by Ino, so hard links share it
	nextIno uint64

	mu    sync.Mutex
	reads []readRecord // every ReadAt, for tests that look at the read path
	// readErr, keyed by entry name, is returned by ReadAt for that file.
	readErr map[string]error
	// beforeRead, if set, is called by every ReadAt first.
	beforeRead func(e *layer.Entry)
}

type readRecord struct {
	name string
	off  int64
	n    int
}

// testTime is the default mtime, with nanoseconds to check they survive.
var testTime = time.Unix(1700000000, 123456789)

func newFakeLayer() *fakeLayer {
	f := &fakeLayer{
		entries: map[string]*layer.Entry{},
		content: map[uint64][]byte{},
		readErr: map[string]error{},
	}
	f.add(&layer.Entry{Name: "", Type: layer.TypeDir, Mode: 0o755}, nil)
	return f
}

// add inserts e (and its content, for a regular file), giving it an inode
// number and the defaults a test does not care about.
func (f *fakeLayer) add(e *layer.Entry, content []byte) *layer.Entry {
	f.nextIno++
	e.Ino = f.nextIno
	if e.Nlink == 0 {
		e.Nlink = 1
	}
	if e.ModTime.IsZero() {
		e.ModTime = testTime
	}
	if e.Type == layer.TypeReg {
		e.Size = int64(len(content))
		f.content[e.Ino] = content
	}
	f.entries[e.Name] = e
	return e
}

// failReads makes every later read of name fail with err.
func (f *fakeLayer) failReads(name string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.readErr[name] = err
}

func (f *fakeLayer) dir(name string) *layer.Entry {
	return f.add(&layer.Entry{Name: name, Type: layer.TypeDir, Mode: 0o755}, nil)
}

func (f *fakeLayer) file(name string, content []byte) *layer.Entry {
	return f.add(&layer.Entry{Name: name, Type: layer.TypeReg, Mode: 0o644}, content)
}

// hardlink adds name as a second name of target.
func (f *fakeLayer) hardlink(name, target string) *layer.Entry {
	t := f.entries[target]
	t.Nlink++
	e := *t
	e.Name = name
	f.entries[name] = &e
	// Every name of the inode reports the same link count.
	for _, o := range f.entries {
		if o.Ino == t.Ino {
			o.Nlink = t.Nlink
		}
	}
	return &e
}

func (f *fakeLayer) Lookup(ctx context.Context, name string) (*layer.Entry, error) {
	if e, ok := f.entries[name]; ok {
		return e, nil
	}
	return nil, &iofs.PathError{Op: "lookup", Path: name, Err: iofs.ErrNotExist}
}

func (f *fakeLayer) ReadDir(ctx context.Context, dir string) ([]*layer.Entry, error) {
	d, ok := f.entries[dir]
	if !ok {
		return nil, &iofs.PathError{Op: "readdir", Path: dir, Err: iofs.ErrNotExist}
	}
	if d.Type != layer.TypeDir {
		return nil, errors.New("not a directory")
	}
	var out []*layer.Entry
	for name, e := range f.entries {
		if name == "" {
			continue
		}
		parent := path.Dir(name)
		if parent == "." {
			parent = ""
		}
		if parent == dir {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (f *fakeLayer) ReadAt(ctx context.Context, e *layer.Entry, p []byte, off int64) (int, error) {
	f.mu.Lock()
	f.reads = append(f.reads, readRecord{e.Name, off, len(p)})
	err := f.readErr[e.Name]
	f.mu.Unlock()
	if err != nil {
		return 0, err
	}
	if f.beforeRead != nil {
		f.beforeRead(e)
	}
	c, ok := f.content[e.Ino]
	if !ok {
		return 0, errors.New("no content")
	}
	if off >= int64(len(c)) {
		return 0, io.EOF
	}
	n := copy(p, c[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *fakeLayer) Close() error { return nil }

// Size is the total content size, which Statfs reports.
func (f *fakeLayer) Size() int64 {
	var n int64
	for _, c := range f.content {
		n += int64(len(c))
	}
	return n
}

// mountFake mounts l on a fresh directory, unmounted when the test ends.
func mountFake(t *testing.T, l layer.Layer, opts ...Option) *Mount {
	t.Helper()
	testutil.RequireFUSE(t)
	mp := t.TempDir()
	opts = append([]Option{WithName("test:" + t.Name())}, opts...)
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, opts...)
	if err != nil {
		t.Fatalf("Serve: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("Unmount %s: %v", mp, err)
		}
	})
	return m
}
