package layer

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
)

// FileRange is where a regular file's content sits in a blob.
type FileRange struct {
	Name     string
	Off, Len int64
}

// Contiguous is implemented by layers whose regular files are contiguous
// ranges of the blob (uncompressed tar), so that read-ahead and background
// fill can work in blob offsets.
type Contiguous interface {
	// DataRange returns the blob range of regular file e.
	DataRange(e *Entry) (FileRange, bool)
	// Files lists every regular file once (one name per hard-link group),
	// in blob order.
	Files() []FileRange
}

var _ Contiguous = (*tarLayer)(nil)

func (l *tarLayer) DataRange(e *Entry) (FileRange, bool) {
	if e.Type != TypeReg {
		return FileRange{}, false
	}
	off, ok := l.idx.dataOffset(e.Ino)
	return FileRange{Name: e.Name, Off: off, Len: e.Size}, ok
}

func (l *tarLayer) Files() []FileRange {
	x := l.idx
	x.mu.Lock()
	defer x.mu.Unlock()
	var files []FileRange
	for ino, names := range x.names {
		e := x.byName[slices.Min(names)] // the same name every time
		if off, ok := x.data[ino]; ok && e.Type == TypeReg {
			files = append(files, FileRange{Name: e.Name, Off: off, Len: e.Size})
		}
	}
	slices.SortFunc(files, func(a, b FileRange) int { return cmp.Or(cmp.Compare(a.Off, b.Off), cmp.Compare(a.Name, b.Name)) })
	return files
}

// FileReader serves a read of a regular file as a range of a local file,
// so FUSE can splice it without copying.
type FileReader interface {
	// ReadFile returns the file and offset holding n bytes of e's content
	// at off (fewer at the end of e: length says how many); the bytes stay
	// in place until release is called.
	ReadFile(ctx context.Context, e *Entry, off int64, n int) (f *os.File, fileOff int64, length int, release func(), err error)
}

// tarFiles is the FileReader of a tar layer whose Source is a FileSource.
type tarFiles struct {
	*tarLayer
	src FileSource
}

func (l tarFiles) ReadFile(ctx context.Context, e *Entry, off int64, n int) (*os.File, int64, int, func(), error) {
	if err := l.confirmed(ctx); err != nil {
		return nil, 0, 0, nil, err
	}
	base, err := contentRange(l.idx, e, off, l.src.Size())
	if err != nil {
		return nil, 0, 0, nil, err
	}
	if off >= e.Size {
		return nil, 0, 0, nil, io.EOF
	}
	length := int(min(int64(n), e.Size-off))
	f, fileOff, release, err := l.src.ReadFile(ctx, base+off, int64(length))
	if err != nil {
		return nil, 0, 0, nil, fmt.Errorf("read %q at %d: %w", e.Name, off, err)
	}
	return f, fileOff, length, release, nil
}
