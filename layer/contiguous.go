package layer

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
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
	seen := make(map[uint64]bool)
	var files []FileRange
	for name, e := range x.byName {
		if e.Type != TypeReg || seen[e.Ino] {
			continue
		}
		if off, ok := x.data[e.Ino]; ok {
			seen[e.Ino] = true
			files = append(files, FileRange{Name: name, Off: off, Len: e.Size})
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].Off < files[j].Off })
	return files
}

// FileSource is optionally implemented by a Source that can make a range
// present and hand out the local file holding it, and the range's offset
// in that file, instead of copying the bytes out (the node cache does).
// The bytes stay in place until release is called.
type FileSource interface {
	ReadFile(ctx context.Context, off, n int64) (f *os.File, fileOff int64, release func(), err error)
}

// FileReader is implemented by layers that can serve a read of a regular
// file as a range of a local file, so FUSE can splice it without copying.
type FileReader interface {
	// ReadFile returns the file and offset holding n bytes of e's content
	// at off (fewer at the end of e: length says how many); the bytes stay
	// in place until release is called. It fails with ErrUnsupported when
	// the layer's source cannot hand out files.
	ReadFile(ctx context.Context, e *Entry, off int64, n int) (f *os.File, fileOff int64, length int, release func(), err error)
}

var _ FileReader = (*tarLayer)(nil)

func (l *tarLayer) ReadFile(ctx context.Context, e *Entry, off int64, n int) (*os.File, int64, int, func(), error) {
	fsrc, ok := l.src.(FileSource)
	if !ok {
		return nil, 0, 0, nil, ErrUnsupported
	}
	base, err := contentRange(l.idx, e, off, l.src.Size())
	if err != nil {
		return nil, 0, 0, nil, err
	}
	if off >= e.Size {
		return nil, 0, 0, nil, io.EOF
	}
	length := int(min(int64(n), e.Size-off))
	f, fileOff, release, err := fsrc.ReadFile(ctx, base+off, int64(length))
	if err != nil {
		return nil, 0, 0, nil, fmt.Errorf("read %q at %d: %w", e.Name, off, err)
	}
	return f, fileOff, length, release, nil
}
