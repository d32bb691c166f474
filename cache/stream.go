package cache

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	digest "github.com/opencontainers/go-digest"
)

// testHookStreamWait, when set by a test, is called when a Stream reader
// starts waiting for data.
var testHookStreamWait func()

// errWriterClosed aborts a stream whose writer closed it without sealing.
var errWriterClosed = errors.New("writer closed the stream before sealing it")

// Stream is one handle on content produced once, sequentially, of unknown
// size (the decompressed tar of a compressed layer), keyed by the digest of
// that content. Handles of the same key share the content; exactly one, the
// writer, produces it while the others read what is written so far.
type Stream struct {
	st     *stream
	writer bool
	closed atomic.Bool

	mu   sync.Mutex
	file *os.File
}

type streamState uint8

const (
	streamWriting streamState = iota
	streamSealed
	streamFailed
)

// stream is the shared state of one key.
type stream struct {
	s    *Store
	e    *entry // nil once detached (failed)
	key  digest.Digest
	f    *os.File
	refs int // guarded by s.mu

	written atomic.Int64
	size    atomic.Int64                // -1 until sealed
	failure atomic.Pointer[streamError] // set once when failed

	mu       sync.Mutex // guards the fields below and file writes
	path     string
	h        hash.Hash
	state    streamState
	wake     chan struct{} // closed on progress
	wakeUsed bool
	closed   bool
}

type streamError struct{ err error }

// Stream opens the stream named key. The same key yields handles on the
// same shared content. writer is true for the one caller that must produce
// the content: it is neither sealed on disk nor being written. A sealed
// stream opens complete. Close the handle when done.
func (s *Store) Stream(key digest.Digest) (st *Stream, writer bool, err error) {
	if err := key.Validate(); err != nil {
		return nil, false, fmt.Errorf("cache: stream key: %w", err)
	}
	if !key.Algorithm().Available() {
		return nil, false, fmt.Errorf("cache: stream %s: digest algorithm unavailable", key)
	}
	if err := s.verifySealed(key); err != nil {
		return nil, false, err
	}
	k := entryKey{kindStream, key}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.entries[k]
	for s.waitBusyLocked(e) {
		e = s.entries[k]
	}
	if s.closed {
		return nil, false, ErrClosed
	}
	if e != nil && e.st != nil && e.st.failure.Load() == nil {
		e.st.refs++
		s.touchLocked(e)
		return &Stream{st: e.st}, false, nil
	}
	if e != nil && e.st != nil {
		s.detachLocked(e.st)
		e = s.entries[k]
	}
	if e != nil {
		// Sealed on disk.
		path := s.streamPath(key)
		f, err := os.Open(path)
		if err == nil {
			var info os.FileInfo
			if info, err = f.Stat(); err == nil {
				x := &stream{s: s, e: e, key: key, f: f, refs: 1, path: path, state: streamSealed, wake: make(chan struct{})}
				x.written.Store(info.Size())
				x.size.Store(info.Size())
				s.usage.Add(info.Size() - e.bytes)
				e.bytes = info.Size()
				e.st = x
				s.touchLocked(e)
				return &Stream{st: x}, false, nil
			}
			f.Close()
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, false, fmt.Errorf("cache: open stream %s: %w", key, err)
		}
		s.usage.Add(-e.bytes)
		delete(s.entries, k)
	}
	f, err := os.CreateTemp(filepath.Join(s.dir, "streams", "tmp"), key.Encoded()+"-*.partial")
	if err != nil {
		return nil, false, fmt.Errorf("cache: create stream %s: %w", key, err)
	}
	e = &entry{entryKey: k}
	x := &stream{s: s, e: e, key: key, f: f, refs: 1, path: f.Name(), h: key.Algorithm().Hash(), wake: make(chan struct{})}
	x.size.Store(-1)
	e.st = x
	s.entries[k] = e
	s.touchLocked(e)
	return &Stream{st: x, writer: true}, true, nil
}

// verifySealed checks, once per process, that a stream sealed on disk by
// an earlier process still hashes to its key: unlike blob chunks, a
// stream's bytes carry no checksums of their own. A file that does not
// match is removed, so the stream is produced again instead of serving
// wrong bytes.
func (s *Store) verifySealed(key digest.Digest) error {
	k := entryKey{kindStream, key}
	s.mu.Lock()
	e := s.entries[k]
	need := e != nil && e.st == nil && e.busy == nil && !e.sealedOK
	s.mu.Unlock()
	if !need {
		return nil
	}
	path := s.streamPath(key)
	sum, err := hashFile(path, key.Algorithm())
	if errors.Is(err, os.ErrNotExist) {
		return nil // gone meanwhile (evicted): Stream produces it again
	}
	if err != nil {
		return fmt.Errorf("cache: verify stream %s: %w", key, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.entries[k] != e || e.st != nil || e.busy != nil {
		return nil // opened, replaced or being removed meanwhile
	}
	if sum == key {
		e.sealedOK = true
		return nil
	}
	slog.Warn("cache: sealed stream does not match its digest; discarding it", "key", key, "got", sum)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cache: remove corrupt stream %s: %w", key, err)
	}
	s.usage.Add(-e.bytes)
	delete(s.entries, k)
	return nil
}

func hashFile(path string, alg digest.Algorithm) (digest.Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return alg.FromReader(f)
}

// detachLocked forgets a failed stream's entry so that the next Stream
// call of its key produces it again. Callers hold s.mu.
func (s *Store) detachLocked(x *stream) {
	e := x.e
	if e == nil || e.st != x {
		return
	}
	x.e = nil
	s.usage.Add(-x.written.Load()) // nothing is written once failed
	delete(s.entries, e.entryKey)
}

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
// the key and makes the content durable. On a mismatch the data is
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
	var err error
	if sum := digest.NewDigest(x.key.Algorithm(), x.h); sum != x.key {
		err = fmt.Errorf("%w: stream %s hashes to %s", ErrDigestMismatch, x.key, sum)
	} else if err = x.f.Sync(); err == nil {
		final := x.s.streamPath(x.key)
		if err = os.MkdirAll(filepath.Dir(final), 0o700); err == nil {
			err = os.Rename(x.path, final)
		}
		if err == nil {
			x.path = final
			syncDir(filepath.Dir(final))
		}
		if err != nil {
			err = fmt.Errorf("cache: seal stream %s: %w", x.key, err)
		}
	}
	if err != nil {
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

// ReadAt reads len(p) bytes at off, waiting until they are written, the
// stream is sealed (then io.ReaderAt semantics at its end) or it fails
// (then its error), or ctx ends.
func (h *Stream) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("cache: stream %s: negative offset %d", h.st.key, off)
	}
	x := h.st
	end := off + int64(len(p))
	for {
		if f := x.failure.Load(); f != nil {
			return 0, f.err
		}
		if size := x.size.Load(); size >= 0 {
			if off >= size {
				return 0, io.EOF
			}
			var eof error
			if end > size {
				p, eof = p[:size-off], io.EOF
			}
			n, err := x.f.ReadAt(p, off)
			if err != nil {
				return n, fmt.Errorf("cache: read stream %s at %d: %w", x.key, off, err)
			}
			return n, eof
		}
		if end <= x.written.Load() {
			n, err := x.f.ReadAt(p, off)
			if f := x.failure.Load(); f != nil {
				return 0, f.err // aborted meanwhile: the bytes are void
			}
			if err != nil {
				return n, fmt.Errorf("cache: read stream %s at %d: %w", x.key, off, err)
			}
			return n, nil
		}
		x.mu.Lock()
		if x.state != streamWriting || end <= x.written.Load() {
			x.mu.Unlock()
			continue
		}
		if x.closed {
			x.mu.Unlock()
			return 0, ErrClosed
		}
		wake := x.wake
		x.wakeUsed = true
		x.mu.Unlock()
		if testHookStreamWait != nil {
			testHookStreamWait()
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// Written returns the number of bytes written so far.
func (h *Stream) Written() int64 { return h.st.written.Load() }

// Done reports whether the stream was sealed: all of it is on disk and
// verified.
func (h *Stream) Done() bool { return h.st.size.Load() >= 0 }

// Size returns the size of the content once sealed, -1 before.
func (h *Stream) Size() int64 { return h.st.size.Load() }

// File returns a read-only file of the content once sealed (for FUSE
// passthrough); ok is false before. The file belongs to the handle and is
// closed by Close.
func (h *Stream) File() (*os.File, bool) {
	if h.closed.Load() || !h.Done() {
		return nil, false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.file == nil {
		h.st.mu.Lock()
		path := h.st.path
		h.st.mu.Unlock()
		f, err := os.Open(path)
		if err != nil {
			slog.Warn("cache: open stream file", "key", h.st.key, "err", err)
			return nil, false
		}
		h.file = f
	}
	return h.file, true
}

// Close releases the handle. A writer that closes before sealing aborts
// the stream.
func (h *Stream) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	if h.writer {
		h.st.abort(errWriterClosed)
	}
	h.mu.Lock()
	var err error
	if h.file != nil {
		err = h.file.Close()
		h.file = nil
	}
	h.mu.Unlock()
	h.st.s.releaseStream(h.st)
	return err
}

func (s *Store) releaseStream(x *stream) {
	s.mu.Lock()
	x.refs--
	if x.refs > 0 {
		s.mu.Unlock()
		return
	}
	if e := x.e; e != nil && e.st == x {
		e.st = nil
		e.bytes = x.written.Load()
		e.sealedOK = x.size.Load() >= 0 // sealed or verified by this process
		s.touchLocked(e)
		t := s.nextStampLocked()
		os.Chtimes(x.path, t, t)
	}
	x.shutdown()
	s.mu.Unlock()
	s.evict()
}

// shutdown aborts the stream if it is still being written and closes its
// file.
func (x *stream) shutdown() {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.closed {
		return
	}
	if x.state == streamWriting {
		x.failLocked(fmt.Errorf("%w: %s: %w", ErrAborted, x.key, ErrClosed))
	}
	x.closed = true
	x.f.Close()
}
