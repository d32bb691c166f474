package cache

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	digest "github.com/opencontainers/go-digest"
)

// Write appends p to the stream and wakes the readers waiting for it.
// Only the writer may write.
func (h *Stream) Write(p []byte) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	if !h.writer {
		return 0, ErrNotWriter
	}
	x := h.st
	x.mu.Lock()
	if x.state != streamWriting {
		x.mu.Unlock()
		return 0, x.endedErr()
	}
	n, err := x.f.Write(p)
	if n > 0 {
		x.h.Write(p[:n])
		x.written.Add(int64(n))
		x.s.usage.Add(int64(n))
		x.wakeLocked()
	}
	if err != nil {
		err = fmt.Errorf("cache: write stream %s: %w", x.key, err)
		x.failLocked(err)
		x.mu.Unlock()
		x.detach()
		return n, err
	}
	x.mu.Unlock()
	x.s.evict()
	return n, nil
}

func (x *stream) endedErr() error {
	if f := x.failure.Load(); f != nil {
		return f.err
	}
	return fmt.Errorf("cache: stream %s is already sealed", x.key)
}

func (x *stream) wakeLocked() {
	if x.wakeUsed {
		close(x.wake)
		x.wake = make(chan struct{})
		x.wakeUsed = false
	}
}

// failLocked ends the stream with err and discards its data. Callers hold
// x.mu; they call detach after releasing it.
func (x *stream) failLocked(err error) {
	x.state = streamFailed
	x.failure.Store(&streamError{err})
	os.Remove(x.path)
	close(x.wake)
	x.wake = make(chan struct{})
	x.wakeUsed = false
}

func (x *stream) detach() {
	x.s.mu.Lock()
	x.s.detachLocked(x)
	x.s.mu.Unlock()
}

// Seal ends the stream: it checks that the digest of everything written is
// the stream's (the key, or WithStreamDigest's) and makes the content
// durable. On a mismatch the data is
// discarded and readers get the error, which wraps ErrDigestMismatch.
func (h *Stream) Seal() error {
	if h.closed.Load() {
		return ErrClosed
	}
	if !h.writer {
		return ErrNotWriter
	}
	x := h.st
	x.mu.Lock()
	if x.state != streamWriting {
		x.mu.Unlock()
		return x.endedErr()
	}
	if err := x.sealLocked(); err != nil {
		x.failLocked(err)
		x.mu.Unlock()
		x.detach()
		return err
	}
	x.state = streamSealed
	x.h = nil
	x.size.Store(x.written.Load())
	close(x.wake)
	x.wake = make(chan struct{})
	x.wakeUsed = false
	x.mu.Unlock()
	return nil
}

// sealLocked checks the digest of what was written and moves the file,
// durable, to its final place. Callers hold x.mu.
func (x *stream) sealLocked() error {
	if sum := digest.NewDigest(x.want.Algorithm(), x.h); sum != x.want {
		return fmt.Errorf("%w: stream %s hashes to %s, want %s", ErrDigestMismatch, x.key, sum, x.want)
	}
	final := x.s.streamPath(x.key)
	err := x.f.Sync()
	if err == nil {
		err = os.MkdirAll(filepath.Dir(final), 0o700)
	}
	if err == nil {
		err = os.Rename(x.path, final)
	}
	if err != nil {
		return fmt.Errorf("cache: seal stream %s: %w", x.key, err)
	}
	x.path = final
	syncDir(filepath.Dir(final))
	return nil
}

// Abort ends the stream unsealed: waiting and later readers get an error
// wrapping err (and ErrAborted), the data is discarded, and the next
// Stream call of the key is the writer again. Only the writer's Abort
// has an effect.
func (h *Stream) Abort(err error) {
	if !h.writer {
		return
	}
	h.st.abort(err)
}

func (x *stream) abort(err error) {
	if err == nil {
		err = errors.New("no reason given")
	}
	x.mu.Lock()
	if x.state != streamWriting {
		x.mu.Unlock()
		return
	}
	x.failLocked(fmt.Errorf("%w: %s: %w", ErrAborted, x.key, err))
	x.mu.Unlock()
	x.detach()
}

// errWriterClosed aborts a stream whose writer closed it without sealing.
var errWriterClosed = errors.New("writer closed the stream before sealing it")
