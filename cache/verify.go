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
// been verified against the key. An error wrapping ErrDigestMismatch means
// the fetched content was wrong; it was discarded.
func (h *Blob) Verify(ctx context.Context) error {
	b := h.b
	for !b.complete.Load() {
		if h.closed.Load() {
			return ErrClosed
		}
		if err := h.Fetch(ctx, 0, b.size); err != nil {
			return err
		}
		r, err := b.kickVerify()
		if err != nil {
			return err
		}
		if r == nil {
			continue // complete, or a chunk was dropped meanwhile
		}
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
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
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// verifyChunk checks a chunk recorded by an earlier process against its
// checksum, and drops it if it does not match.
func (b *blob) verifyChunk(i int) error {
	b.mu.Lock()
	if !b.present.get(i) || b.verified.get(i) {
		b.mu.Unlock()
		return nil
	}
	want, g := b.sums[i], b.gen.Load()
	b.mu.Unlock()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := (*bufp)[:b.chunkLen(i)]
	if _, err := b.st.ReadAt(buf, int64(i)*b.chunk); err != nil {
		return fmt.Errorf("cache: read blob %s chunk %d: %w", b.key, i, err)
	}
	got := checksum(buf)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.gen.Load() != g {
		return nil // dropped meanwhile; the caller looks again
	}
	if got == want {
		b.verified.set(i)
		return nil
	}
	slog.Warn("cache: corrupt chunk dropped", "key", b.key, "chunk", i, "off", int64(i)*b.chunk)
	b.dropLocked(i)
	return nil
}

// kickVerify starts hashing the whole content in the background if it is
// all present and not verified yet, and returns the run (nil if there is
// nothing to verify).
func (b *blob) kickVerify() (*verifyRun, error) {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.vrun != nil {
		return b.vrun, nil
	}
	if b.closed || s.closed {
		return nil, ErrClosed
	}
	if b.complete.Load() || b.cached.Load() != b.size {
		return nil, nil
	}
	r := &verifyRun{done: make(chan struct{})}
	b.vrun = r
	b.refs++ // keeps the files open while hashing
	s.wg.Add(1)
	go b.verifyLoop(r)
	return r, nil
}

func (b *blob) verifyLoop(r *verifyRun) {
	defer b.s.wg.Done()
	markComplete := false
	b.mu.Lock()
	for {
		g := b.gen.Load()
		if b.cached.Load() != b.size {
			// Dropped since the run was started: inconclusive, and the
			// hash below would read chunks being refetched. Whatever
			// makes the blob whole again starts another run.
			break
		}
		b.mu.Unlock()
		sum, err := b.hash(b.s.ctx)
		b.mu.Lock()
		if err != nil {
			r.err = err
			break
		}
		if b.gen.Load() != g {
			if b.cached.Load() == b.size {
				continue // a chunk was refetched meanwhile: hash again
			}
			break // inconclusive; the refetch will start another run
		}
		if sum == b.key {
			b.complete.Store(true)
			for i := 0; i < b.n; i++ {
				b.verified.set(i)
			}
			b.queue(appendRecord(nil, recComplete, 0))
			markComplete = true
			break
		}
		// Every chunk matched its checksum, so the fetched content itself
		// is wrong, and nothing tells which chunk: discard them all and,
		// from now on, serve only verified content.
		b.strict.Store(true)
		for i := 0; i < b.n; i++ {
			b.dropLocked(i)
		}
		r.err = fmt.Errorf("%w: blob %s hashes to %s", ErrDigestMismatch, b.key, sum)
		slog.Error("cache: blob content does not match its digest; discarded", "key", b.key, "got", sum)
		break
	}
	// vrun stays set until the run has let go of the blob: a Verify that
	// finds the blob complete meanwhile still waits for this run, so that
	// once Verify returns the blob's references are the callers' own.
	b.mu.Unlock()
	if markComplete {
		// Durably, so that a restart does not hash it again.
		if err := b.flush(); err == nil {
			b.recMu.Lock()
			if !b.recClosed {
				b.rec.Sync()
			}
			b.recMu.Unlock()
		}
	}
	b.s.releaseBlob(b)
	b.mu.Lock()
	b.vrun = nil
	b.mu.Unlock()
	close(r.done)
	if r.err == nil && !markComplete && b.cached.Load() == b.size {
		// Inconclusive, and the refetch that made the blob whole again
		// may have found this run still going instead of starting one.
		b.kickVerify()
	}
}

// hash computes the digest of the data file, with the key's algorithm.
// Chunks not yet checked in this process are checked against their
// checksums on the way: a corrupt one is dropped (which ends the run as
// inconclusive, since gen changes) rather than failing the whole content.
func (b *blob) hash(ctx context.Context) (digest.Digest, error) {
	alg := b.key.Algorithm()
	if !alg.Available() {
		return "", fmt.Errorf("cache: blob %s: digest algorithm unavailable", b.key)
	}
	h := alg.Hash()
	bufp := b.s.getBuf()
	defer b.s.putBuf(bufp)
	buf := *bufp
	for off := int64(0); off < b.size; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := min(int64(len(buf)), b.size-off)
		g := b.gen.Load()
		if _, err := b.st.ReadAt(buf[:n], off); err != nil {
			return "", fmt.Errorf("cache: hash blob %s: %w", b.key, err)
		}
		for i := int(off / b.chunk); i <= int((off+n-1)/b.chunk); i++ {
			if b.verified.get(i) {
				continue
			}
			s := int64(i)*b.chunk - off
			got := checksum(buf[s : s+b.chunkLen(i)])
			b.mu.Lock()
			// A drop or a new segment raced with the read: the bytes
			// may not be the chunk's, and the caller hashes again.
			if g&1 == 0 && b.gen.Load() == g && b.present.get(i) && !b.verified.get(i) {
				if got == b.sums[i] {
					b.verified.set(i)
				} else {
					slog.Warn("cache: corrupt chunk dropped", "key", b.key, "chunk", i, "off", int64(i)*b.chunk)
					b.dropLocked(i)
				}
			}
			b.mu.Unlock()
		}
		h.Write(buf[:n])
		off += n
	}
	return digest.NewDigest(alg, h), nil
}
