package cache

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"log/slog"
	"sync/atomic"
	"time"
)

// A blob's presence records live in "<hex>.rec" beside its sparse
// "<hex>.data". The file is a header followed by fixed-size records that
// are only ever appended:
//
//	header (32 bytes): magic[8] chunkSize[8] size[8] crc32c(bytes 0..23)[4] pad[4]
//	record (16 bytes): word[8] sum[4] crc32c(bytes 0..11)[4]
//
// word holds a chunk index, or a flag: recDrop (the chunk is no longer
// present) or recComplete (the whole content was verified). sum is the
// crc32c of the chunk's bytes; in a complete record, that of the digest
// the content was verified against, or 0 for the key (see completeSum).
// Records are appended only after the data they describe was made
// durable, so after a crash a record may be missing (the chunk is
// refetched) but never describes data that was not written; a torn or
// zero-filled tail fails its own checksum and ends the replay. The data
// checksum catches the rest (bit rot, manual edits) the first time a
// chunk is read in a process; a chunk table, when a handle has one,
// checks stored bytes against what the image pins.
const (
	recMagic    = "wsnapc1\n"
	headerSize  = 32
	recordSize  = 16
	recDrop     = uint64(1) << 63
	recComplete = uint64(1) << 62
	recIndex    = recComplete - 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func checksum(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

func encodeHeader(chunkSize, size int64) []byte {
	h := make([]byte, headerSize)
	copy(h, recMagic)
	binary.LittleEndian.PutUint64(h[8:], uint64(chunkSize))
	binary.LittleEndian.PutUint64(h[16:], uint64(size))
	binary.LittleEndian.PutUint32(h[24:], checksum(h[:24]))
	return h
}

func decodeHeader(h []byte) (chunkSize, size int64, ok bool) {
	if len(h) < headerSize || string(h[:8]) != recMagic ||
		binary.LittleEndian.Uint32(h[24:]) != checksum(h[:24]) {
		return 0, 0, false
	}
	chunkSize = int64(binary.LittleEndian.Uint64(h[8:]))
	size = int64(binary.LittleEndian.Uint64(h[16:]))
	if chunkSize <= 0 || size < 0 {
		return 0, 0, false
	}
	return chunkSize, size, true
}

func appendRecord(dst []byte, word uint64, sum uint32) []byte {
	var r [recordSize]byte
	binary.LittleEndian.PutUint64(r[0:], word)
	binary.LittleEndian.PutUint32(r[8:], sum)
	binary.LittleEndian.PutUint32(r[12:], checksum(r[:12]))
	return append(dst, r[:]...)
}

// replayed is the state a records file describes.
type replayed struct {
	chunkSize, size int64
	present         []bool
	sums            []uint32
	complete        bool // a complete record not followed by a drop
	completeSum     uint32
	valid           int64 // length of the trustworthy prefix of the file
	cached          int64 // bytes of present chunks
}

// replay parses a records file. ok is false when the header is missing or
// corrupt, in which case nothing in the file can be trusted.
func replay(raw []byte) (r replayed, ok bool) {
	r.chunkSize, r.size, ok = decodeHeader(raw)
	if !ok {
		return r, false
	}
	n := chunkCount(r.size, r.chunkSize)
	r.present = make([]bool, n)
	r.sums = make([]uint32, n)
	off := headerSize
	for ; off+recordSize <= len(raw); off += recordSize {
		rec := raw[off : off+recordSize]
		if binary.LittleEndian.Uint32(rec[12:]) != checksum(rec[:12]) {
			break
		}
		word := binary.LittleEndian.Uint64(rec)
		if word == recComplete {
			r.complete, r.completeSum = true, binary.LittleEndian.Uint32(rec[8:])
			continue
		}
		i := word & recIndex
		if i >= uint64(n) {
			break
		}
		if word&recDrop != 0 {
			r.present[i] = false
			r.complete = false
			continue
		}
		r.present[i] = true
		r.sums[i] = binary.LittleEndian.Uint32(rec[8:])
	}
	r.valid = int64(off)
	for i, p := range r.present {
		if p {
			r.cached += chunkLen(int64(i), r.chunkSize, r.size)
		}
	}
	if r.cached != r.size {
		r.complete = false
	}
	return r, true
}

func chunkCount(size, chunkSize int64) int {
	return int((size + chunkSize - 1) / chunkSize)
}

func chunkLen(i, chunkSize, size int64) int64 {
	return min(chunkSize, size-i*chunkSize)
}

// completeSum is what a complete record of b holds in its sum: which
// digest the content was verified against. 0 stands for the key, as in
// the records of stores that knew no other.
func (b *blob) completeSum() uint32 {
	if b.want == b.key {
		return 0
	}
	return checksum([]byte(b.want))
}

// bitmap is a fixed-size set of chunk indexes that readers test without
// locks; writers serialise among themselves with the blob's mutex.
type bitmap []atomic.Uint64

func newBitmap(n int) bitmap { return make(bitmap, (n+63)/64) }

func (m bitmap) get(i int) bool { return m[i>>6].Load()&(1<<(uint(i)&63)) != 0 }
func (m bitmap) set(i int)      { m[i>>6].Or(1 << (uint(i) & 63)) }
func (m bitmap) clear(i int)    { m[i>>6].And(^(uint64(1) << (uint(i) & 63))) }

func (m bitmap) clearAll() {
	for i := range m {
		m[i].Store(0)
	}
}

// all reports whether every index in [lo, hi] is set.
func (m bitmap) all(lo, hi int) bool {
	for i := lo; i <= hi; {
		w := m[i>>6].Load()
		bit := uint(i) & 63
		last := min(hi, i|63) // last index within this word
		span := uint(last-i) + 1
		var mask uint64
		if span == 64 {
			mask = ^uint64(0)
		} else {
			mask = ((uint64(1) << span) - 1) << bit
		}
		if w&mask != mask {
			return false
		}
		i = last + 1
	}
	return true
}

// queue schedules records for the flusher. Callers hold b.mu, so records
// are queued in the order of the state changes they describe.
func (b *blob) queue(recs []byte) {
	if b.closed {
		return
	}
	b.pending = append(b.pending, recs...)
	b.s.markDirty(b)
}

// takePendingLocked returns the records queued so far and whether the
// records file must be synced after them. Callers hold b.mu.
func (b *blob) takePendingLocked() ([]byte, bool) {
	p, syncRec := b.pending, b.syncRec
	b.pending, b.syncRec = nil, false
	return p, syncRec
}

// flush makes the data written so far durable and then appends the
// records describing it.
func (b *blob) flush() error {
	b.recMu.Lock()
	defer b.recMu.Unlock()
	b.mu.Lock()
	p, syncRec := b.takePendingLocked()
	b.mu.Unlock()
	return b.writeRecords(p, syncRec)
}

// writeRecords appends records once the data they describe is durable.
// Callers hold b.recMu.
func (b *blob) writeRecords(p []byte, syncRec bool) error {
	if len(p) == 0 {
		return nil
	}
	if err := b.st.sync(); err != nil {
		return fmt.Errorf("cache: sync %s: %w", b.key, err)
	}
	if _, err := b.rec.Write(p); err != nil {
		return fmt.Errorf("cache: records of %s: %w", b.key, err)
	}
	if syncRec {
		if err := b.rec.Sync(); err != nil {
			return fmt.Errorf("cache: sync records of %s: %w", b.key, err)
		}
	}
	return nil
}

// markDirty schedules b's pending records for the flusher.
func (s *Store) markDirty(b *blob) {
	s.dirtyMu.Lock()
	s.dirty[b] = struct{}{}
	s.dirtyMu.Unlock()
	select {
	case s.flushCh <- struct{}{}:
	default:
	}
}

// flusher persists presence records off the readers' path: one fdatasync
// of a blob's data covers every chunk fetched since the last one, and only
// then are their records appended.
func (s *Store) flusher() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.flushCh:
		}
		s.dirtyMu.Lock()
		set := s.dirty
		s.dirty = make(map[*blob]struct{})
		s.dirtyMu.Unlock()
		for b := range set {
			if err := b.flush(); err != nil {
				slog.Warn("cache: persisting presence records", "key", b.key, "err", err)
			}
		}
		// Batch the next round: an fdatasync per fetch would force
		// writeback at the network's pace and cost CPU the readers need.
		// A crash loses at most this much of records, which only means
		// refetching those chunks.
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(flushInterval):
		}
	}
}

// flushInterval is the least time between two rounds of persisting
// presence records.
const flushInterval = 500 * time.Millisecond
