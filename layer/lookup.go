package layer

// Reading an index, complete or, for a streamed layer, still being built.

import (
	"context"
	"fmt"
	"io/fs"
	"slices"
	"syscall"
)

func (x *index) failed() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.err
}

// lookup returns the entry at name, waiting for it while the index is
// being built.
func (x *index) lookup(ctx context.Context, name string) (*Entry, error) {
	clean, ok := cleanName(name)
	if !ok {
		return nil, &fs.PathError{Op: "lookup", Path: name, Err: fs.ErrNotExist}
	}
	for {
		x.mu.Lock()
		if e := x.byName[clean]; e != nil {
			x.mu.Unlock()
			return e, nil
		}
		if x.done {
			err := x.err
			x.mu.Unlock()
			if err != nil {
				return nil, fmt.Errorf("lookup %q: %w", name, err)
			}
			return nil, &fs.PathError{Op: "lookup", Path: name, Err: fs.ErrNotExist}
		}
		if err := x.awaitChangeLocked(ctx); err != nil {
			return nil, fmt.Errorf("lookup %q: %w", name, err)
		}
	}
}

// awaitChangeLocked releases x.mu, which the caller holds, and waits until
// the index changes or ctx ends.
func (x *index) awaitChangeLocked(ctx context.Context) error {
	ch := x.changed.C()
	x.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// readDir lists dir once the index is complete.
func (x *index) readDir(ctx context.Context, dir string) ([]*Entry, error) {
	clean, ok := cleanName(dir)
	if !ok {
		return nil, &fs.PathError{Op: "readdir", Path: dir, Err: fs.ErrNotExist}
	}
	for {
		x.mu.Lock()
		if x.done {
			defer x.mu.Unlock()
			if x.err != nil {
				return nil, fmt.Errorf("readdir %q: %w", dir, x.err)
			}
			e := x.byName[clean]
			if e == nil {
				return nil, &fs.PathError{Op: "readdir", Path: dir, Err: fs.ErrNotExist}
			}
			if e.Type != TypeDir {
				return nil, &fs.PathError{Op: "readdir", Path: dir, Err: syscall.ENOTDIR}
			}
			return slices.Clone(x.dirs[clean]), nil
		}
		if err := x.awaitChangeLocked(ctx); err != nil {
			return nil, fmt.Errorf("readdir %q: %w", dir, err)
		}
	}
}

// wait waits for the index to be complete.
func (x *index) wait(ctx context.Context) error {
	_, err := x.readDir(ctx, "")
	return err
}

// dataOffset is where the content of ino starts.
func (x *index) dataOffset(ino uint64) (int64, bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	off, ok := x.data[ino]
	return off, ok
}

func (x *index) chunksOf(ino uint64) []chunkRef {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.chunks[ino]
}

// contentSize is the size of the regular files' content seen so far,
// each hard-link group once.
func (x *index) contentSize() int64 {
	x.mu.Lock()
	defer x.mu.Unlock()
	var n int64
	for _, names := range x.names {
		if e := x.byName[names[0]]; e.Type == TypeReg {
			n += e.Size
		}
	}
	return n
}
