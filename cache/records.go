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
// Records are appended in the order of the changes they describe.
// Presence and drop records are appended as soon as the change is made,
// without a sync: a killed process leaves them all behind, in the page
// cache, with the data they describe. After a machine crash a record may
// be missing (the chunk is refetched) or describe data that never reached
// the disk: that chunk fails its check (its checksum, or its table chunk)
// the first time it is needed in a process, and is dropped and fetched
// again; nothing stored by an earlier process is served unchecked. A
// complete record is the exception, as it lets the next process skip
// hashing the whole content and trust checked chunks as verified: it is
// appended only once the data of every chunk is durable, and synced. A
// torn or zero-filled tail fails its own checksum and ends the replay.
// The data checksum also catches bit rot and manual edits; a chunk
// table, when a handle has one, checks stored bytes against what the
// image pins.
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

// queue appends records describing a state change, which callers make
// under b.mu, so records land in the order of the changes. The append is
// a write into the page cache, without a sync: it survives the death of
// the process, which is what keeps a killed process's successor from
// fetching its chunks again. That a machine crash may leave such a record
// on disk without the data it describes is harmless: a chunk stored by an
// earlier process is served only once checked (against its checksum, or
// its table chunk read back), and one that fails is dropped and fetched
// again. What is trusted without such a check, the complete record, is
// not appended here but by flush, once the data is durable.
//
// After a failed append nothing more is appended for the blob: a record
// lost in the middle (a drop, say) could make the ones after it lie.
// Later changes are then forgotten at the next open, which only costs
// fetches.
//
// Nor is the fetched data synced here or on a timer: the kernel writes it
// back on its own schedule (within dirty_expire_centisecs, 30 s by
// default). An fdatasync while chunks are being written holds up the
// writes of the fetches readers wait for (a cold read here ran at 630–690
// MB/s with a sync every 500 ms, 830–920 without), and what it would save
// is only the refetch of what a machine crash loses.
func (b *blob) queue(recs []byte) {
	if b.closed {
		return
	}
	b.appendLocked(recs)
}

// appendLocked appends recs to the records file unless an append failed
// before. Callers hold b.mu (or own b, closed, under b.recMu).
func (b *blob) appendLocked(recs []byte) {
	if b.recFailed {
		return
	}
	if _, err := b.rec.Write(recs); err != nil {
		b.recFailed = true
		slog.Warn("cache: appending records; the blob's later changes will not be kept", "key", b.key, "err", err)
	}
}

// flush makes the data written so far durable and then, if the blob is
// complete and its complete record not on disk yet, appends it.
func (b *blob) flush() error {
	b.recMu.Lock()
	defer b.recMu.Unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil // shutdown flushed
	}
	b.mu.Unlock()
	return b.syncAndComplete()
}

// testHookSynced, when set by a test, is called by syncAndComplete after
// the sync; testHookComplete, under b.mu, before it appends a complete
// record.
var testHookSynced, testHookComplete func(*blob)

// syncAndComplete syncs the data, then appends the complete record if one
// is due and no chunk was dropped meanwhile. Callers hold b.recMu, and
// b.rec is open.
//
// The record is appended under b.mu, where the other records are, so it
// lands among them in the order of the state changes, and only if
// b.drops did not move since before the sync. The sync covers the data
// of every chunk present when the blob became complete; while no chunk is
// dropped, no chunk of a complete blob is written again (none is
// missing), so it covers all of them still when the record lands. A drop
// clears the record that was due; if the blob became complete again since,
// whoever completed it flushes again, with a sync that covers the chunks
// fetched since.
func (b *blob) syncAndComplete() error {
	b.mu.Lock()
	drops := b.drops
	b.mu.Unlock()
	if err := b.st.sync(); err != nil {
		return fmt.Errorf("cache: sync %s: %w", b.key, err)
	}
	if testHookSynced != nil {
		testHookSynced(b)
	}
	b.mu.Lock()
	due := b.completeDue && b.drops == drops && !b.recFailed
	if due {
		if testHookComplete != nil {
			testHookComplete(b)
		}
		b.completeDue = false
		b.appendLocked(appendRecord(nil, recComplete, b.completeSum()))
		due = !b.recFailed
	}
	b.mu.Unlock()
	if !due {
		return nil
	}
	// Synced, so that a machine crash does not cost hashing it all again
	// (and with it every record before it).
	if err := b.rec.Sync(); err != nil {
		return fmt.Errorf("cache: sync records of %s: %w", b.key, err)
	}
	return nil
}

// testHookMarkDirty, when set by a test, is called by markDirty.
var testHookMarkDirty func(*blob)

// markDirty schedules b for the flusher: its complete record is due.
func (s *Store) markDirty(b *blob) {
	if testHookMarkDirty != nil {
		testHookMarkDirty(b)
	}
	s.dirtyMu.Lock()
	s.dirty[b] = struct{}{}
	s.dirtyMu.Unlock()
	select {
	case s.flushCh <- struct{}{}:
	default:
	}
}

// flusher appends the complete records that are due, each after a sync
// of its blob's data, off the readers' path. Verification flushes the blob
// it completes itself; a record whose flush failed stays due, for the
// next flush of the blob (Store.Flush, shutdown).
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
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(flushInterval):
		}
	}
}

// flushInterval is the least time between two rounds of the flusher.
const flushInterval = 500 * time.Millisecond
