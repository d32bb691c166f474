package prefetch

import "sync"

// maxReaders is how many readers of one file get read-ahead of their own
// (tensor-parallel ranks loading one checkpoint read it at several places).
const maxReaders = 4

// Readers follows the readers of the files of one blob, each with a
// Sequential of its own, so that several readers of one file at different
// places each get read-ahead. A read is taken to continue the reader it
// is near; a read near none starts a new reader in place of the least
// recently used. It is safe for concurrent use.
type Readers struct {
	span, maxWindow int64

	mu     sync.Mutex
	byFile map[uint64][]*reader
	clock  uint64 // for finding the least recently used reader
}

type reader struct {
	q       *Sequential
	lastUse uint64
}

// NewReaders returns the reader state of one blob; span and maxWindow are
// as for NewSequential.
func NewReaders(span, maxWindow int64) *Readers {
	return &Readers{span: span, maxWindow: maxWindow, byFile: make(map[uint64][]*reader)}
}

// Observe records a read of n bytes at off of the file identified by id
// and returns the blob range to read ahead, if any (see
// Sequential.Observe). file, the blob range holding the file's bytes, is
// asked for only when the read starts a new reader: it is on the path of
// every read. ok is false when file has no range.
func (rs *Readers) Observe(id uint64, off, n int64, file func() (Range, bool)) (ahead Range, ok bool) {
	rs.mu.Lock()
	q := rs.readerLocked(id, off, file)
	rs.mu.Unlock()
	if q == nil {
		return Range{}, false
	}
	return q.Observe(off, n)
}

func (rs *Readers) readerLocked(id uint64, off int64, file func() (Range, bool)) *Sequential {
	rs.clock++
	readers := rs.byFile[id]
	for _, r := range readers {
		if r.q.Near(off) {
			r.lastUse = rs.clock
			return r.q
		}
	}
	fr, ok := file()
	if !ok {
		return nil
	}
	r := &reader{q: NewSequential(fr, rs.span, rs.maxWindow), lastUse: rs.clock}
	if len(readers) < maxReaders {
		rs.byFile[id] = append(readers, r)
		return r.q
	}
	oldest := 0
	for i, o := range readers {
		if o.lastUse < readers[oldest].lastUse {
			oldest = i
		}
	}
	readers[oldest] = r
	return r.q
}
