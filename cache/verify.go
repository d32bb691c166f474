package cache

import (
	"context"
	_ "crypto/sha256" // digest algorithms of keys
	_ "crypto/sha512"
	"fmt"
	"log/slog"

	digest "github.com/opencontainers/go-digest"
)

// verifyRun is one hashing of the whole content.
type verifyRun struct {
	done chan struct{}
	err  error // set before done is closed; nil and not complete: inconclusive
}

// Verify fetches whatever is missing and waits until the whole content has
// been verified against its digest (the key, or WithContentDigest's). An
// error wrapping ErrDigestMismatch means the fetched content was wrong; it
// was discarded.
func (h *Blob) Verify(ctx context.Context) error {
	if h.closed.Load() {
		return ErrClosed
	}
	return h.b.verify(ctx, &h.a)
}

func (b *blob) verify(ctx context.Context, a *access) error {
	for !b.isComplete() {
		if b.n > 0 {
			if _, err := b.ensure(ctx, a, 0, b.n-1, false); err != nil {
				return err
			}
		}
		r, err := b.kickVerify()
		if err != nil {
			return err
		}
		if r == nil {
			continue // complete, or a chunk was dropped meanwhile
		}
		if err := r.wait(ctx); err != nil {
			return err
		}
		if r.err != nil {
			return r.err
		}
	}
	// The run that completed the blob may still hold it (see verifyLoop).
	b.mu.Lock()
	r := b.vrun
	b.mu.Unlock()
	if r != nil {
		return r.wait(ctx)
	}
	return nil
}

func (b *blob) isComplete() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.complete
}

func (r *verifyRun) wait(ctx context.Context) error {
	select {
	case <-r.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// verifyChunk checks a chunk recorded by an earlier process against its
// checksum, and drops it if it does not match.
func (b *blob) verifyChunk(i int) error {
	b.mu.Lock()
	if !b.present.get(i) || b.verified.get(i) {
		b.mu.Unlock()
		return nil
	}
	drops := b.drops
	b.mu.Unlock()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := (*bufp)[:b.chunkLen(i)]
	if err := b.readPinned(buf, int64(i)*b.chunk); err != nil {
		return fmt.Errorf("cache: read blob %s chunk %d: %w", b.key, i, err)
	}
	b.checkChunk(i, checksum(buf), drops)
	return nil
}

// checkChunk marks chunk i servable to handles without a table if got,
// the checksum of bytes read while b.drops was drops, is the one recorded
// for it (and to those WithReuseAfterVerify too if the whole content was
// verified), and drops the chunk if not. If a chunk was dropped since, the bytes may not have been the
// chunk's, and the check counts for nothing: the caller looks again.
func (b *blob) checkChunk(i int, got uint32, drops uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed || b.drops != drops || !b.present.get(i) || b.verified.get(i) {
		return
	}
	if got != b.sums[i] {
		slog.Warn("cache: corrupt chunk dropped", "key", b.key, "chunk", i, "off", int64(i)*b.chunk)
		b.dropLocked(i)
	} else if !b.strict {
		b.verified.set(i)
		if b.complete {
			b.fresh.set(i)
		}
	}
}

// kickVerify starts hashing the whole content in the background if it is
// all present and not verified yet, and returns the run (nil if there is
// nothing to verify).
func (b *blob) kickVerify() (*verifyRun, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.vrun != nil {
		return b.vrun, nil
	}
	if b.closed {
		return nil, ErrClosed
	}
	if b.complete || b.cached != b.size {
		return nil, nil
	}
	if !b.s.hold(b) {
		return nil, ErrClosed
	}
	r := &verifyRun{done: make(chan struct{})}
	b.vrun = r
	go b.verifyLoop(r)
	return r, nil
}

func (b *blob) verifyLoop(r *verifyRun) {
	defer b.s.wg.Done()
	complete := b.verifyWhole(r)
	if complete {
		// Now rather than at the flusher's next round, so that a restart
		// soon after does not hash it again.
		if err := b.flush(); err != nil {
			slog.Warn("cache: persisting presence records", "key", b.key, "err", err)
		}
	}
	// vrun stays set until the run has let go of the blob: a Verify that
	// finds the blob complete meanwhile still waits for this run, so that
	// once Verify returns the blob's references are the callers' own.
	b.s.releaseBlob(b)
	b.mu.Lock()
	b.vrun = nil
	whole := b.cached == b.size
	b.mu.Unlock()
	close(r.done)
	if r.err == nil && !complete && whole {
		// Inconclusive, and the refetch that made the blob whole again
		// may have found this run still going instead of starting one.
		b.kickVerify()
	}
}

// verifyWhole hashes the content until the hash is conclusive: no chunk
// was dropped while it ran. A match completes the blob; a mismatch sets
// r.err and discards the content.
func (b *blob) verifyWhole(r *verifyRun) (complete bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.cached == b.size {
		drops := b.drops
		b.mu.Unlock()
		sum, err := b.hash(b.s.ctx)
		b.mu.Lock()
		if err != nil {
			r.err = err
			return false
		}
		if b.drops != drops {
			continue // hash again if a refetch made the blob whole again
		}
		if sum == b.want {
			b.complete = true
			for i := range b.n {
				b.trusted.set(i)
				b.fresh.set(i)
				b.verified.set(i)
			}
			// Appended by the flush below, once the data is durable:
			// the next process trusts it without hashing.
			// The flusher retries if that flush fails.
			b.completeDue = true
			b.s.markDirty(b)
			return true
		}
		// Every chunk matched its checksum, so the fetched content itself
		// is wrong, and nothing tells which chunk: discard them all and,
		// from now on, serve only verified content.
		b.strict = true
		for i := range b.n {
			b.dropLocked(i)
		}
		r.err = fmt.Errorf("%w: blob %s hashes to %s, want %s", ErrDigestMismatch, b.key, sum, b.want)
		slog.Error("cache: blob content does not match its digest; discarded", "key", b.key, "want", b.want, "got", sum)
		return false
	}
	// Dropped since the run was started: inconclusive, and a hash would
	// read chunks being refetched. Whatever makes the blob whole again
	// starts another run.
	return false
}

// hash computes the digest of the content, with the algorithm of b.want.
// Chunks not yet checked in this process are checked against their
// checksums on the way: a corrupt one is dropped (which makes the run
// inconclusive) rather than failing the whole content.
func (b *blob) hash(ctx context.Context) (digest.Digest, error) {
	alg := b.want.Algorithm()
	h := alg.Hash()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	for off := int64(0); off < b.size; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		buf := (*bufp)[:min(int64(len(*bufp)), b.size-off)]
		b.mu.Lock()
		drops := b.drops
		b.mu.Unlock()
		if err := b.readPinned(buf, off); err != nil {
			return "", fmt.Errorf("cache: hash blob %s: %w", b.key, err)
		}
		for i := int(off / b.chunk); i <= int((off+int64(len(buf))-1)/b.chunk); i++ {
			if !b.verified.get(i) {
				s := int64(i)*b.chunk - off
				b.checkChunk(i, checksum(buf[s:s+b.chunkLen(i)]), drops)
			}
		}
		h.Write(buf)
		off += int64(len(buf))
	}
	return digest.NewDigest(alg, h), nil
}
