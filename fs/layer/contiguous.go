package layer

import "sort"

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
