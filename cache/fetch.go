package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// testHookWait, when set by a test, is called when a reader starts waiting
// for a fetch another caller runs.
var testHookWait func()

// flight is one FetchFunc call covering chunks [first, last].
type flight struct {
	first, last int
	done        chan struct{}
	err         error // set before done is closed
}

// Fetch makes [off, off+n) present without reading it out: read-ahead and
// background fill. Contiguous missing chunks are fetched together, up to
// WithMaxFetch per FetchFunc call (whole table chunks with WithTable);
// chunks another caller is fetching are waited for.
func (h *Blob) Fetch(ctx context.Context, off, n int64) error {
	if h.closed.Load() {
		return ErrClosed
	}
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	if !ok {
		return nil
	}
	_, err := b.ensure(ctx, &h.a, lo, hi, false)
	return err
}

// Check makes [off, off+n) present and servable to this handle, as a read
// would, without reading it out: after a restart, chunks are trusted only
// once checked in this process (against their checksum, or the table with
// WithTable; with WithReuseAfterVerify, only by the whole content).
func (h *Blob) Check(ctx context.Context, off, n int64) error {
	if h.closed.Load() {
		return ErrClosed
	}
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	if !ok {
		return nil
	}
	_, err := b.makeServable(ctx, &h.a, lo, hi)
	return err
}

// Invalidate drops the chunks overlapping [off, off+n), for a caller whose
// own verifier (an eStargz chunk digest) found them wrong; the next read
// fetches them again. A chunk being fetched is not affected. Only layers
// whose files are compressed chunks (eStargz) call it, never for a range
// handed out by FileOf.
func (h *Blob) Invalidate(off, n int64) {
	b := h.b
	lo, hi, ok := b.chunkRange(off, n)
	if !ok {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := lo; i <= hi; i++ {
		b.dropLocked(i)
	}
}

// ensure makes chunks [lo, hi] present (and, with verify, servable to a)
// fetching with a what nobody is fetching yet. It starts at most one
// fetch at a time, so chunks it will get to later stay available to other
// callers (an on-demand reader is not stuck behind a long background
// Fetch); with a RangeReaderFunc, one fetch is a chain of runs up to hi
// and maxChain (runChain), which a reader of its later runs waits for.
// waited reports whether any fetch was run or waited for.
func (b *blob) ensure(ctx context.Context, a *access, lo, hi int, verify bool) (waited bool, err error) {
	if a.table != nil {
		lo, hi = b.widen(a.table, lo, hi)
	}
	for {
		progress := false
		var waits []*flight
		for c := lo; c <= hi; {
			b.mu.Lock()
			if b.closed {
				b.mu.Unlock()
				return waited, ErrClosed
			}
			// In strict mode only whole verification makes chunks servable.
			var check int
			var run *flight
			c, check, run = b.nextLocked(a, c, hi, verify && !b.strict, &waits)
			b.mu.Unlock()
			if check >= 0 {
				progress = true
				if err := b.checkStored(a, check); err != nil {
					return waited, err
				}
			}
			if run != nil {
				progress, waited = true, true
				if err := b.runChain(ctx, a, run, hi); err != nil {
					return waited, err
				}
			}
		}
		if len(waits) > 0 {
			progress, waited = true, true
			if err := waitFlights(ctx, waits); err != nil {
				return waited, err
			}
		}
		if !progress {
			return waited, nil
		}
	}
}

// nextLocked scans chunks from c to hi for the next this caller works on:
// a chunk to check (with checking), or a run of missing chunks nobody
// fetches, which it claims; check is -1 and run nil if there is none.
// Fetches of others it passes are added to waits. It returns where the
// scan is to go on. Callers hold b.mu.
func (b *blob) nextLocked(a *access, c, hi int, checking bool, waits *[]*flight) (next, check int, run *flight) {
	if a.table != nil {
		return b.nextTableLocked(a.table, c, hi, checking, waits)
	}
	for ; c <= hi; c++ {
		switch {
		case !b.present.get(c):
			fl := b.inflight[c]
			if fl == nil {
				run = b.startFlightLocked(c, hi)
				return run.last + 1, -1, run
			}
			addWait(waits, fl)
		case checking && !b.verified.get(c):
			return c + 1, c, nil
		}
	}
	return c, -1, nil
}

func addWait(waits *[]*flight, fl *flight) {
	if n := len(*waits); n == 0 || (*waits)[n-1] != fl {
		*waits = append(*waits, fl)
	}
}

// startFlightLocked claims the run of missing chunks from first on that
// nobody fetches, up to hi and the most one fetch may cover. Callers hold
// b.mu.
func (b *blob) startFlightLocked(first, hi int) *flight {
	fl := &flight{first: first, done: make(chan struct{})}
	c := first
	for c <= hi && c-first < b.s.maxRun && !b.present.get(c) && b.inflight[c] == nil {
		b.inflight[c] = fl
		c++
	}
	fl.last = c - 1
	return fl
}

// waitFlights waits for fetches other callers run. A fetch that ended
// with its caller's context, or with a table chunk that did not match, is
// no error of this caller's: the chunks are missing still, and the next
// pass of ensure fetches them (and, with a table, checks them) itself.
func waitFlights(ctx context.Context, waits []*flight) error {
	for _, fl := range waits {
		if testHookWait != nil {
			testHookWait()
		}
		select {
		case <-fl.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if fl.err != nil && !(isContextErr(fl.err) && ctx.Err() == nil) && !errors.Is(fl.err, ErrDigestMismatch) && !errors.Is(fl.err, errChainBroken) {
			return fl.err
		}
	}
	return nil
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// haul is what the fetch of a flight brought.
type haul struct {
	sums    []uint32 // of the flight's chunks, from its first on; nil: none is kept
	bad     []bool   // chunks of the flight not kept, if any: their table chunk did not match
	checked bool     // against the blob's table
	err     error
}

// errChainBroken ends the flights of a chain that its reader did not get
// to: their waiters fetch the chunks themselves.
var errChainBroken = errors.New("cache: an earlier run of the same request failed")

// maxChain bounds the bytes one RangeReaderFunc request is asked for.
const maxChain = 64 << 20

// runChain performs the fetch of fl, and, if a has a RangeReaderFunc, of
// the runs of missing chunks that follow it up to hi, which it claims
// too: all through one reader, each run landing as its bytes arrive.
func (b *blob) runChain(ctx context.Context, a *access, fl *flight, hi int) error {
	chain := []*flight{fl}
	if a.open != nil {
		b.mu.Lock()
		for n := fl.last + 1; n <= hi && int64(n-fl.first)*b.chunk < maxChain; {
			next := b.claimAtLocked(a, n, hi)
			if next == nil {
				break
			}
			chain = append(chain, next)
			n = next.last + 1
		}
		b.mu.Unlock()
	}
	if len(chain) == 1 {
		return b.run(ctx, a, fl, a.fetch)
	}
	off := int64(fl.first) * b.chunk
	end := min(b.size, int64(chain[len(chain)-1].last+1)*b.chunk)
	r, err := a.open(ctx, off, end-off)
	if err != nil {
		err = fmt.Errorf("cache: fetch %s [%d, %d): %w", b.key, off, end, err)
		b.abandon(chain[1:])
		return b.land(fl, haul{err: err})
	}
	defer r.Close()
	// The runs come in order: each one's bytes are the reader's next.
	next := off
	fill := func(ctx context.Context, p []byte, at int64) error {
		if at != next {
			return fmt.Errorf("cache: read of %s at %d, the request's next byte is %d", b.key, at, next)
		}
		n, err := io.ReadFull(r, p)
		next += int64(n)
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			err = fmt.Errorf("short read: %d of %d bytes at %d", n, len(p), at)
		}
		return err
	}
	for i, f := range chain {
		if err := b.run(ctx, a, f, fill); err != nil {
			b.abandon(chain[i+1:])
			return err
		}
	}
	return nil
}

// claimAtLocked claims the run of missing chunks that starts at chunk c
// (at a table chunk's first with a table), up to hi, unless c is present,
// being fetched or, with a table, partly present. Callers hold b.mu.
func (b *blob) claimAtLocked(a *access, c, hi int) *flight {
	if a.table == nil {
		if b.present.get(c) || b.inflight[c] != nil {
			return nil
		}
		return b.startFlightLocked(c, hi)
	}
	k := b.perTable(a.table)
	if !b.untouched(c, min(c+k, b.n)-1) {
		return nil
	}
	return b.startTableFlightLocked(k, c, hi)
}

// abandon ends flights claimed for a chain that will not fetch them.
func (b *blob) abandon(fls []*flight) {
	for _, f := range fls {
		b.land(f, haul{err: errChainBroken})
	}
}

// land ends flight fl with got, as run does.
func (b *blob) land(fl *flight, got haul) error {
	b.mu.Lock()
	err := b.landLocked(fl, got)
	b.mu.Unlock()
	return err
}

// run performs one fetch, with fill filling the buffer with the source's
// bytes, and publishes its chunks.
func (b *blob) run(ctx context.Context, a *access, fl *flight, fill FetchFunc) error {
	off := int64(fl.first) * b.chunk
	end := min(b.size, int64(fl.last+1)*b.chunk)
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := *bufp
	if int64(len(buf)) < end-off {
		buf = make([]byte, end-off) // a table chunk larger than WithMaxFetch
	}
	buf = buf[:end-off]
	var got haul
	if a.table != nil {
		got = b.fetchChecked(ctx, a, buf, off, fill)
	} else if err := fill(ctx, buf, off); err != nil {
		got.err = fmt.Errorf("cache: fetch %s [%d, %d): %w", b.key, off, end, err)
	} else if _, err := b.st.WriteAt(buf, off); err != nil {
		got.err = fmt.Errorf("cache: store %s [%d, %d): %w", b.key, off, end, err)
	} else {
		got.sums = b.sumsOf(buf, off, nil)
	}
	b.mu.Lock()
	err := b.landLocked(fl, got)
	full := b.cached == b.size
	b.mu.Unlock()
	if full {
		b.kickVerify()
	}
	if got.sums != nil {
		b.s.evict()
	}
	return err
}

// sumsOf returns the checksums of the chunks buf holds from off, a chunk
// boundary, but for those bad marks.
func (b *blob) sumsOf(buf []byte, off int64, bad []bool) []uint32 {
	first := int(off / b.chunk)
	sums := make([]uint32, chunkCount(int64(len(buf)), b.chunk))
	for k := range sums {
		if bad == nil || !bad[k] {
			s := int64(k) * b.chunk
			sums[k] = checksum(buf[s : s+b.chunkLen(first+k)])
		}
	}
	return sums
}

// landLocked ends flight fl: the chunks got kept are stored and become
// present (and servable, unless in strict mode). It returns got's error.
// Callers hold b.mu.
func (b *blob) landLocked(fl *flight, got haul) error {
	for i := fl.first; i <= fl.last; i++ {
		delete(b.inflight, i)
	}
	err := got.err
	if b.closed {
		err = ErrClosed
	} else if got.sums != nil {
		recs := make([]byte, 0, recordSize*len(got.sums))
		var n int64
		for k, sum := range got.sums {
			if got.bad != nil && got.bad[k] {
				continue
			}
			i := fl.first + k
			b.sums[i] = sum
			b.present.set(i)
			if !b.strict {
				b.verified.set(i)
				b.fresh.set(i)
				if got.checked {
					b.trusted.set(i)
				}
			}
			recs = appendRecord(recs, uint64(i), sum)
			n += b.chunkLen(i)
		}
		b.cached += n
		b.s.usage.Add(n)
		if len(recs) > 0 {
			b.queue(recs)
		}
	}
	fl.err = err
	close(fl.done)
	return err
}

// dropLocked forgets chunk i, on disk too. Callers hold b.mu.
func (b *blob) dropLocked(i int) {
	if b.closed || !b.present.get(i) {
		return
	}
	b.pin.Lock()
	b.present.clear(i)
	b.verified.clear(i)
	b.fresh.clear(i)
	b.trusted.clear(i)
	if b.strict {
		// Nothing is served until the whole content is verified again.
		b.verified.clearAll()
		b.fresh.clearAll()
		b.trusted.clearAll()
	}
	b.punch(i)
	b.pin.Unlock()
	b.drops++
	n := b.chunkLen(i)
	b.cached -= n
	b.s.usage.Add(-n)
	b.complete, b.completeDue = false, false
	b.queue(appendRecord(nil, recDrop|uint64(i), 0))
}
