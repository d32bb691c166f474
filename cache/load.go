package cache

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	digest "github.com/opencontainers/go-digest"
)

// loadBlob opens the files of the blob of e, of the given size, whose
// content must hash to want, trusting only what the records say. The
// caller made e busy: nobody else touches the files meanwhile.
func (s *Store) loadBlob(e *entry, size int64, want digest.Digest) (*blob, error) {
	b := &blob{
		s: s, e: e, key: e.key, want: want, size: size, chunk: s.chunkSize,
		n:        chunkCount(size, s.chunkSize),
		inflight: make(map[int]*flight),
	}
	b.unpin = b.pin.RUnlock
	b.present, b.sums = newBitmap(b.n), make([]uint32, b.n)
	b.verified, b.fresh, b.trusted = newBitmap(b.n), newBitmap(b.n), newBitmap(b.n)
	if err := b.openFiles(s.blobPath(e.key)); err != nil {
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	r, err := b.readRecords()
	if err == nil {
		err = b.st.data.Truncate(size)
	}
	if err != nil {
		b.st.close()
		b.rec.Close()
		return nil, fmt.Errorf("cache: open blob %s: %w", e.key, err)
	}
	b.adopt(r)
	return b, nil
}

// openFiles opens (creating them if needed) the data file, the records
// file and the segments of the blob whose files are named base.*.
func (b *blob) openFiles(base string) error {
	if err := os.MkdirAll(filepath.Dir(base), 0o700); err != nil {
		return err
	}
	data, err := os.OpenFile(base+".data", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	rec, err := os.OpenFile(base+".rec", os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		data.Close()
		return err
	}
	segs, err := loadSegments(base, b.size)
	if err != nil {
		data.Close()
		rec.Close()
		return err
	}
	b.rec = rec
	b.st.data, b.st.segDir = data, segmentDir(base)
	b.st.segs.Store(&segs)
	return nil
}

// readRecords replays the records file. One that is new, foreign or
// damaged starts over, with the data file emptied; a torn tail is cut.
func (b *blob) readRecords() (replayed, error) {
	raw, err := io.ReadAll(b.rec)
	if err != nil {
		return replayed{}, err
	}
	r, ok := replay(raw)
	if ok && r.chunkSize == b.chunk && r.size == b.size {
		if r.valid < int64(len(raw)) {
			err = b.rec.Truncate(r.valid)
		}
		return r, err
	}
	if err := b.rec.Truncate(0); err != nil {
		return r, err
	}
	if _, err := b.rec.Write(encodeHeader(b.chunk, b.size)); err != nil {
		return r, err
	}
	return replayed{present: make([]bool, b.n), sums: make([]uint32, b.n)}, b.st.data.Truncate(0)
}

// adopt takes the state the records describe, and frees the space of
// bytes that the data file holds but no record vouches for.
func (b *blob) adopt(r replayed) {
	// A crash between making a segment and punching its range out of
	// the data file leaves stale bytes there.
	for _, g := range *b.st.segs.Load() {
		punchFile(b.st.data, g.off, g.end-g.off)
	}
	// Bytes of chunks without a record are garbage from a crash or a
	// drop: give the space back, one hole per run of such chunks.
	hole := -1
	for i, p := range r.present {
		if p {
			b.present.set(i)
			b.sums[i] = r.sums[i]
			if hole >= 0 {
				b.punchRun(hole, i)
				hole = -1
			}
		} else if hole < 0 {
			hole = i
		}
	}
	if hole >= 0 {
		b.punchRun(hole, b.n)
	}
	// A complete record vouches for the content digest it names.
	b.cached, b.complete = r.cached, r.complete && r.completeSum == b.completeSum()
}
