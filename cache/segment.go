package cache

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A segment is a range of a blob's content kept in a file of its own, at
// offset 0, instead of in the blob's data file (which has a hole there).
// A segment is declared for each large file of a tar layer, so that once
// the blob is verified the file can back a FUSE passthrough open of that
// file: the kernel then reads it without asking the daemon.
//
// On disk, beside the blob's .data and .rec:
//
//	blobs/<alg>/<hex>.seg/<off>-<len>    the bytes [off, off+len)
//
// A segment file is created, filled with whatever part of its range the
// data file already held, and renamed into place before the data file's
// range is punched. Like the data file, it is synced before records name
// bytes in it; bytes a crash loses anyway fail their chunk's checksum
// after the restart and are fetched again. Bytes of the range left in the
// data file by a crash before the punch are punched at the next open.
type segment struct {
	off, end int64
	path     string
	f        *os.File
	dirty    atomic.Bool // written since the last flush
	ro       *os.File    // read-only handle for FileOf, opened on first use under blob.mu
}

// maxSegmentCopy bounds how many present chunks a new segment may move
// out of the data file (8 MiB with the default chunk size). Segments are
// declared right after a layer's index is built, when little more than
// the tar headers is cached; a blob cached by an older layout keeps its
// bytes where they are instead of stalling its readers for a long copy.
const maxSegmentCopy = 8

// ErrSegment is wrapped by Segment's errors about a range that cannot be
// given a segment: it overlaps another one, or too much of it is cached
// in the data file already.
var ErrSegment = errors.New("cache: range cannot get a segment")

// storage maps ranges of a blob's content to the data file or segments.
// The segment list is replaced, never modified, under blob.mu and
// blob.pin held for writing; it is loaded without a lock, by pinned
// readers and by writers of chunks being fetched (whose range a new
// segment never covers, see Segment).
type storage struct {
	data      *os.File
	dataDirty atomic.Bool
	segs      atomic.Pointer[[]*segment] // sorted by off, disjoint
	segDir    string
	// dirDirty is set when a segment was created without syncing its
	// directory; the next sync does, before records name its bytes.
	dirDirty atomic.Bool
}

// piece is a part of a range that sits in one file.
type piece struct {
	f       *os.File
	seg     *segment // nil for the data file
	fileOff int64
	pos, n  int64 // within the range asked for
}

// split calls fn for each piece of [off, off+n), in order, until it fails.
func (s *storage) split(off, n int64, fn func(piece) error) error {
	segs := *s.segs.Load()
	i := sort.Search(len(segs), func(i int) bool { return segs[i].end > off })
	for pos := int64(0); pos < n; {
		at := off + pos
		p := piece{f: s.data, fileOff: at, pos: pos, n: n - pos}
		if i < len(segs) && segs[i].off <= at {
			g := segs[i]
			p.f, p.seg, p.fileOff, p.n = g.f, g, at-g.off, min(n-pos, g.end-at)
			i++
		} else if i < len(segs) {
			p.n = min(p.n, segs[i].off-at)
		}
		if err := fn(p); err != nil {
			return err
		}
		pos += p.n
	}
	return nil
}

func (s *storage) ReadAt(p []byte, off int64) (int, error) {
	err := s.split(off, int64(len(p)), func(x piece) error {
		_, err := x.f.ReadAt(p[x.pos:x.pos+x.n], x.fileOff)
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *storage) WriteAt(p []byte, off int64) (int, error) {
	err := s.split(off, int64(len(p)), func(x piece) error {
		_, err := x.f.WriteAt(p[x.pos:x.pos+x.n], x.fileOff)
		if x.seg != nil {
			x.seg.dirty.Store(true)
		} else {
			s.dataDirty.Store(true)
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// punch frees the space of [off, end).
func (s *storage) punch(off, end int64) {
	s.split(off, end-off, func(x piece) error {
		punchFile(x.f, x.fileOff, x.n)
		return nil
	})
}

// punchFile frees the disk space of [off, off+n) of f, keeping its size.
// It is best effort: bytes left behind are never served, only kept.
func punchFile(f *os.File, off, n int64) {
	unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// fileOf returns the file and offset holding all of [off, off+n), if one
// file does.
func (s *storage) fileOf(off, n int64) (f *os.File, fileOff int64, ok bool) {
	s.split(off, n, func(x piece) error {
		f, fileOff, ok = x.f, x.fileOff, x.n == n
		return io.EOF // the first piece decides
	})
	return f, fileOff, ok
}

// sync makes what was written durable. A file whose sync fails stays
// dirty, so that the next sync tries it again rather than taking it as
// durable.
func (s *storage) sync() error {
	if s.dirDirty.Swap(false) {
		syncDir(s.segDir)
	}
	if s.dataDirty.Swap(false) {
		if err := unix.Fdatasync(int(s.data.Fd())); err != nil {
			s.dataDirty.Store(true)
			return err
		}
	}
	for _, g := range *s.segs.Load() {
		if g.dirty.Swap(false) {
			if err := unix.Fdatasync(int(g.f.Fd())); err != nil {
				g.dirty.Store(true)
				return err
			}
		}
	}
	return nil
}

func (s *storage) close() error {
	err := s.data.Close()
	for _, g := range *s.segs.Load() {
		err = errors.Join(err, g.f.Close())
		if g.ro != nil {
			err = errors.Join(err, g.ro.Close())
		}
	}
	return err
}

func segmentDir(base string) string { return base + ".seg" }

func segmentName(off, n int64) string { return fmt.Sprintf("%d-%d", off, n) }

// loadSegments opens the segments of the blob at base, of the given size.
// Files that are not valid segments (temporaries, overlaps) are removed.
func loadSegments(base string, size int64) ([]*segment, error) {
	dir := segmentDir(base)
	des, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	// A file that is not a usable segment is removed: the bytes it held
	// are then missing where the records say present, which the chunk
	// checks after a restart catch (they are fetched again).
	var segs []*segment
	for _, de := range des {
		path := filepath.Join(dir, de.Name())
		off, n, ok := parseSegmentName(de.Name())
		if !ok || n > size-off {
			os.Remove(path)
			continue
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err == nil {
			err = f.Truncate(n)
			if err != nil {
				f.Close()
			}
		}
		if err != nil {
			slog.Warn("cache: unusable segment removed", "file", path, "err", err)
			os.Remove(path)
			continue
		}
		segs = append(segs, &segment{off: off, end: off + n, path: path, f: f})
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].off < segs[j].off })
	kept := segs[:0]
	for _, g := range segs {
		if len(kept) > 0 && kept[len(kept)-1].end > g.off {
			slog.Warn("cache: overlapping segment removed", "file", g.path)
			g.f.Close()
			os.Remove(g.path)
			continue
		}
		kept = append(kept, g)
	}
	return kept, nil
}

func parseSegmentName(name string) (off, n int64, ok bool) {
	a, b, found := strings.Cut(name, "-")
	if !found {
		return 0, 0, false
	}
	off, err1 := strconv.ParseInt(a, 10, 64)
	n, err2 := strconv.ParseInt(b, 10, 64)
	return off, n, err1 == nil && err2 == nil && off >= 0 && n > 0
}

// Segment keeps [off, off+n) of the content in a file of its own from now
// on, so that FileOf can hand that file out once the blob is Complete.
// Declaring a segment that exists is a no-op. A range overlapping another
// segment, or with more than a few MiB already cached, gets an error
// wrapping ErrSegment and stays where it is: reads are correct either way.
func (h *Blob) Segment(off, n int64) error {
	if h.closed.Load() {
		return ErrClosed
	}
	b := h.b
	if off < 0 || n <= 0 || n > b.size-off {
		return fmt.Errorf("%w: %s: range %d+%d outside the content", ErrSegment, b.key, off, n)
	}
	for {
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			return ErrClosed
		}
		// Bytes being fetched now would be written to the data file
		// after the move: wait for them first.
		if fl := b.inflightIn(off, off+n); fl != nil {
			b.mu.Unlock()
			<-fl.done
			continue
		}
		err := b.addSegmentLocked(off, n)
		b.mu.Unlock()
		return err
	}
}

// inflightIn returns a fetch of a chunk overlapping [off, end), if any.
// Callers hold b.mu.
func (b *blob) inflightIn(off, end int64) *flight {
	for i := int(off / b.chunk); i <= int((end-1)/b.chunk); i++ {
		if fl := b.inflight[i]; fl != nil {
			return fl
		}
	}
	return nil
}

// addSegmentLocked creates the segment [off, off+n), moving the present
// bytes of that range out of the data file. Callers hold b.mu, and no
// chunk of the range is being fetched.
func (b *blob) addSegmentLocked(off, n int64) error {
	end := off + n
	old := *b.st.segs.Load()
	i := sort.Search(len(old), func(i int) bool { return old[i].end > off })
	if i < len(old) && old[i].off == off && old[i].end == end {
		return nil
	}
	if i < len(old) && old[i].off < end {
		return fmt.Errorf("%w: %s: %d+%d overlaps segment %d+%d", ErrSegment, b.key, off, n, old[i].off, old[i].end-old[i].off)
	}
	lo, hi := int(off/b.chunk), int((end-1)/b.chunk)
	moved := 0
	for c := lo; c <= hi; c++ {
		if b.present.get(c) {
			moved++
		}
	}
	if moved > maxSegmentCopy {
		return fmt.Errorf("%w: %s: %d chunks of %d+%d already cached", ErrSegment, b.key, moved, off, n)
	}
	g, err := b.createSegment(off, n, lo, hi)
	if err != nil {
		return fmt.Errorf("cache: segment %d+%d of %s: %w", off, n, b.key, err)
	}
	segs := make([]*segment, 0, len(old)+1)
	segs = append(append(append(segs, old[:i]...), g), old[i:]...)
	// Pinned readers may be reading the range from the data file.
	b.pin.Lock()
	b.st.segs.Store(&segs)
	punchFile(b.st.data, off, n)
	b.pin.Unlock()
	return nil
}

// createSegment writes the segment file of [off, off+n) with the bytes of
// present chunks lo..hi copied from the data file, and renames it into
// place. Nothing is synced here: bytes lost to a crash fail their chunk's
// checksum after the restart and are fetched again, and the blob's next
// flush syncs the file and its directory before records name new bytes.
func (b *blob) createSegment(off, n int64, lo, hi int) (*segment, error) {
	dir := b.st.segDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	final := filepath.Join(dir, segmentName(off, n))
	f, err := os.OpenFile(final+".tmp", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*segment, error) {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	if err := f.Truncate(n); err != nil {
		return fail(err)
	}
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	copied := false
	for c := lo; c <= hi; c++ {
		if !b.present.get(c) {
			continue
		}
		from := max(off, int64(c)*b.chunk)
		to := min(off+n, int64(c)*b.chunk+b.chunkLen(c))
		buf := (*bufp)[:to-from]
		if _, err := b.st.data.ReadAt(buf, from); err != nil {
			return fail(err)
		}
		if _, err := f.WriteAt(buf, from-off); err != nil {
			return fail(err)
		}
		copied = true
	}
	if err := os.Rename(f.Name(), final); err != nil {
		return fail(err)
	}
	b.st.dirDirty.Store(true)
	g := &segment{off: off, end: off + n, path: final, f: f}
	g.dirty.Store(copied)
	return g, nil
}

// FileOf returns a read-only file whose content is exactly [off, off+n)
// of the blob, at offset 0: the segment of that range, once the blob is
// Complete and every chunk of the range is servable to this handle, as
// checked in this process (after a restart, see Check). ok is false otherwise. The file stays
// open while the blob is. A checked chunk of a Complete blob is never
// dropped while the blob is open (only Invalidate would, which tar layers
// do not call), so the bytes stay in place for whoever reads the file.
func (h *Blob) FileOf(off, n int64) (f *os.File, ok bool) {
	if h.closed.Load() {
		return nil, false
	}
	b := h.b
	segs := *b.st.segs.Load()
	i := sort.Search(len(segs), func(i int) bool { return segs[i].end > off })
	if i == len(segs) || segs[i].off != off || segs[i].end != off+n {
		return nil, false
	}
	g := segs[i]
	lo, hi, _ := b.chunkRange(off, n)
	// Under b.mu, since shutdown closes g.ro once b.closed is set. The
	// open is of a local file, once per segment.
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || !b.complete || !h.a.servable.all(lo, hi) {
		return nil, false
	}
	if g.ro == nil {
		ro, err := os.Open(g.path)
		if err != nil {
			slog.Warn("cache: open segment", "file", g.path, "err", err)
			return nil, false
		}
		g.ro = ro
	}
	return g.ro, true
}
