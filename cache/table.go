package cache

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"slices"

	"github.com/weightsnap/weightsnap/chunks"
)

// A handle opened WithTable trusts nothing the table has not vouched for.
// Its unit is the table chunk, a whole number of the store's chunks: it
// fetches whole table chunks, checks each against the table before a byte
// of it is written, and checks one that is stored (by an earlier process,
// or by a handle without the table) by hashing it back from disk. Store
// chunks that passed are trusted, and servable to every handle; a table
// chunk only part of which is stored is dropped and fetched whole, since
// its bytes can only be checked together.

// maxTableChunk bounds the table chunks the store checks, which it holds
// in memory whole; chunks.Parse refuses larger ones too.
const maxTableChunk = 64 << 20

// fits reports why t cannot be the table of a blob of size bytes in s.
func (s *Store) fits(t *chunks.Table, size int64) error {
	switch {
	case t.NewHash() == nil:
		return fmt.Errorf("table of unknown hash %q", t.Hash)
	case t.Size != size:
		return fmt.Errorf("table of %d bytes for a blob of %d", t.Size, size)
	case t.ChunkSize <= 0 || t.ChunkSize > maxTableChunk || t.ChunkSize%s.chunkSize != 0:
		return fmt.Errorf("table chunks of %d bytes, not a multiple of the store's %d up to %d", t.ChunkSize, s.chunkSize, maxTableChunk)
	case int64(t.Len()) != (size+t.ChunkSize-1)/t.ChunkSize:
		return fmt.Errorf("%d digests for %d bytes in chunks of %d", t.Len(), size, t.ChunkSize)
	}
	return nil
}

// conflict reports how asked differs from open, the table of the open
// blob.
func conflict(open, asked *chunks.Table) error {
	switch {
	case asked.Hash != open.Hash:
		return fmt.Errorf("asked a table of %s digests, open with %s ones", asked.Hash, open.Hash)
	case asked.ChunkSize != open.ChunkSize:
		return fmt.Errorf("asked a table of %d-byte chunks, open with %d-byte ones", asked.ChunkSize, open.ChunkSize)
	case !slices.Equal(asked.Digests, open.Digests):
		return errors.New("asked a table of other digests")
	}
	return nil
}

// perTable is the number of store chunks in a chunk of t.
func (b *blob) perTable(t *chunks.Table) int { return int(t.ChunkSize / b.chunk) }

// widen returns chunks [lo, hi] grown to whole chunks of t.
func (b *blob) widen(t *chunks.Table, lo, hi int) (int, int) {
	k := b.perTable(t)
	return lo / k * k, min((hi/k+1)*k, b.n) - 1
}

// nextTableLocked is nextLocked for a handle with table t: c is the first
// chunk of a table chunk, hi the last of one, and a chunk to check is the
// first of its table chunk. Callers hold b.mu.
func (b *blob) nextTableLocked(t *chunks.Table, c, hi int, checking bool, waits *[]*flight) (next, check int, run *flight) {
	k := b.perTable(t)
	for ; c <= hi; c += k {
		last := min(c+k, b.n) - 1
		if b.trusted.all(c, last) {
			continue
		}
		if fl := b.flightIn(c, last); fl != nil {
			addWait(waits, fl)
			continue
		}
		if b.present.all(c, last) {
			if checking {
				return c + k, c, nil
			}
			continue
		}
		run = b.startTableFlightLocked(k, c, hi)
		return run.last + 1, -1, run
	}
	return c, -1, nil
}

// flightIn returns a fetch of one of chunks [lo, hi], if any. Callers
// hold b.mu.
func (b *blob) flightIn(lo, hi int) *flight {
	for i := lo; i <= hi; i++ {
		if fl := b.inflight[i]; fl != nil {
			return fl
		}
	}
	return nil
}

// startTableFlightLocked claims the table chunk of k chunks at first, which
// nobody fetches and which is not all present, and the table chunks after
// it up to hi that are wholly missing, up to the most one fetch may cover
// (at least one table chunk). What is stored of the first goes. Callers
// hold b.mu.
func (b *blob) startTableFlightLocked(k, first, hi int) *flight {
	for i := first; i < min(first+k, b.n); i++ {
		b.dropLocked(i)
	}
	limit := max(b.s.maxRun/k, 1) * k
	end := first + k
	for end <= hi && end-first < limit && b.untouched(end, min(end+k, b.n)-1) {
		end += k
	}
	fl := &flight{first: first, last: min(end, b.n) - 1, done: make(chan struct{})}
	for i := fl.first; i <= fl.last; i++ {
		b.inflight[i] = fl
	}
	return fl
}

// untouched reports whether none of chunks [lo, hi] is present or being
// fetched. Callers hold b.mu.
func (b *blob) untouched(lo, hi int) bool {
	for i := lo; i <= hi; i++ {
		if b.present.get(i) || b.inflight[i] != nil {
			return false
		}
	}
	return true
}

// fetchChecked fetches into buf with fill the table chunks from off, the
// start of one, and checks each against a's table before it is stored. One that
// does not match is fetched once more (the FetchFunc may reach another
// mirror); if it still does not, none of its bytes are written, and the
// haul's error wraps ErrDigestMismatch. The others are stored and kept.
func (b *blob) fetchChecked(ctx context.Context, a *access, buf []byte, off int64, fill FetchFunc) haul {
	t := a.table
	end := off + int64(len(buf))
	if err := fill(ctx, buf, off); err != nil {
		return haul{err: fmt.Errorf("cache: fetch %s [%d, %d): %w", b.key, off, end, err)}
	}
	var bad []bool
	var firstErr error
	sums := make([]uint32, chunkCount(int64(len(buf)), b.chunk))
	for j := int(off / t.ChunkSize); int64(j)*t.ChunkSize < end; j++ {
		toff, tn := t.Range(j)
		p := buf[toff-off : toff-off+tn]
		sw := &sumWriter{chunk: b.chunk, sums: sums[(toff-off)/b.chunk:][:0]}
		if sw.check(t, j, p) == nil {
			continue
		}
		slog.Warn("cache: fetched chunk does not match its table; fetching it again", "key", b.key, "chunk", j, "off", toff)
		err := a.fetch(ctx, p, toff)
		if err != nil {
			err = fmt.Errorf("cache: fetch %s [%d, %d): %w", b.key, toff, toff+tn, err)
		} else if err = sw.check(t, j, p); err != nil {
			slog.Error("cache: fetched chunk does not match its table twice; not kept", "key", b.key, "chunk", j, "off", toff)
			err = fmt.Errorf("%w: blob %s: %w", ErrDigestMismatch, b.key, err)
		}
		if err == nil {
			continue
		}
		if bad == nil {
			bad = make([]bool, chunkCount(int64(len(buf)), b.chunk))
		}
		for i := (toff - off) / b.chunk; i < (toff-off+tn+b.chunk-1)/b.chunk; i++ {
			bad[i] = true
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if err := b.storeKept(buf, off, bad); err != nil {
		return haul{err: err}
	}
	return haul{sums: sums, bad: bad, checked: true, err: firstErr}
}

// sumWriter computes the checksums of the store chunks written to it, one
// after another from a chunk boundary, into sums.
type sumWriter struct {
	chunk int64
	n     int64 // bytes of the current chunk so far
	cur   uint32
	sums  []uint32
}

func (w *sumWriter) Write(p []byte) (int, error) {
	for q := p; len(q) > 0; {
		k := min(int64(len(q)), w.chunk-w.n)
		w.cur = crc32.Update(w.cur, castagnoli, q[:k])
		w.n += k
		q = q[k:]
		if w.n == w.chunk {
			w.end()
		}
	}
	return len(p), nil
}

// end ends the current chunk, which may be short (the blob's last).
func (w *sumWriter) end() {
	w.sums = append(w.sums, w.cur)
	w.cur, w.n = 0, 0
}

// check checks table chunk j, p, against t and computes the checksums of
// its store chunks in the same pass over p.
func (w *sumWriter) check(t *chunks.Table, j int, p []byte) error {
	w.sums, w.cur, w.n = w.sums[:0], 0, 0
	err := t.CheckTee(j, p, w)
	if w.n > 0 {
		w.end()
	}
	return err
}

// storeKept writes buf, held for chunks from off on, but for the chunks
// bad marks.
func (b *blob) storeKept(buf []byte, off int64, bad []bool) error {
	n := chunkCount(int64(len(buf)), b.chunk)
	for k := 0; k < n; {
		if bad != nil && bad[k] {
			k++
			continue
		}
		to := k + 1
		for to < n && (bad == nil || !bad[to]) {
			to++
		}
		from, till := int64(k)*b.chunk, min(int64(to)*b.chunk, int64(len(buf)))
		if _, err := b.st.WriteAt(buf[from:till], off+from); err != nil {
			return fmt.Errorf("cache: store %s [%d, %d): %w", b.key, off+from, off+till, err)
		}
		k = to
	}
	return nil
}

// checkStored checks chunk i, stored by an earlier process or a handle
// that did not check it, as a's reads require: against the table (i is
// the first chunk of a table chunk), or else its checksum.
func (b *blob) checkStored(a *access, i int) error {
	if a.table != nil {
		return b.checkTableChunk(a.table, i)
	}
	return b.verifyChunk(i)
}

// checkTableChunk hashes back from disk the table chunk whose first store
// chunk is c and trusts its store chunks if it matches t, or drops them
// all if it does not, so that they are fetched again. As in checkChunk, a
// drop meanwhile voids the check.
func (b *blob) checkTableChunk(t *chunks.Table, c int) error {
	last := min(c+b.perTable(t), b.n) - 1
	b.mu.Lock()
	if !b.present.all(c, last) || b.trusted.all(c, last) {
		b.mu.Unlock()
		return nil
	}
	drops := b.drops
	b.mu.Unlock()
	j := int(int64(c) * b.chunk / t.ChunkSize)
	off, n := t.Range(j)
	h := t.NewHash()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	for p := int64(0); p < n; {
		buf := (*bufp)[:min(int64(len(*bufp)), n-p)]
		if err := b.readPinned(buf, off+p); err != nil {
			return fmt.Errorf("cache: read blob %s table chunk %d: %w", b.key, j, err)
		}
		h.Write(buf)
		p += int64(len(buf))
	}
	var sum [chunks.DigestSize]byte
	h.Sum(sum[:0])
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.drops != drops || !b.present.all(c, last) || b.trusted.all(c, last) {
		return nil
	}
	if sum != t.Digests[j] {
		slog.Warn("cache: stored chunk does not match its table; dropped", "key", b.key, "chunk", j, "off", off)
		for i := c; i <= last; i++ {
			b.dropLocked(i)
		}
		return nil
	}
	if !b.strict {
		for i := c; i <= last; i++ {
			b.trusted.set(i)
			b.fresh.set(i)
			b.verified.set(i)
		}
	}
	return nil
}
