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

// Stream is one handle on content produced once, sequentially, of unknown
// size (the decompressed tar of a compressed layer), keyed by a digest:
// that of the content, or one the caller chose (WithStreamDigest). Handles of the same key share the content; exactly one, the
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
	e    *entry // set when opened; the store's no more once detached (failed)
	key  digest.Digest
	want digest.Digest // what the content must hash to
	f    *os.File

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
// stream opens complete. The content must hash to key unless opts name
// another digest. Close the handle when done.
func (s *Store) Stream(key digest.Digest, opts ...StreamOption) (st *Stream, writer bool, err error) {
	if err := key.Validate(); err != nil {
		return nil, false, fmt.Errorf("cache: stream key: %w", err)
	}
	o := streamOptions{want: key}
	for _, opt := range opts {
		opt(&o)
	}
	if err := validDigest(o.want); err != nil {
		return nil, false, fmt.Errorf("cache: stream %s: %w", key, err)
	}
	k := entryKey{kindStream, key}
	s.mu.Lock()
	e := s.entries[k]
	for s.waitBusyLocked(e) {
		e = s.entries[k]
	}
	if s.closed {
		s.mu.Unlock()
		return nil, false, ErrClosed
	}
	if e != nil && e.st != nil {
		if e.st.failure.Load() == nil {
			if e.st.want != o.want {
				s.mu.Unlock()
				return nil, false, fmt.Errorf("%w: stream %s is open to hash to %s, asked %s", ErrDigestConflict, key, e.st.want, o.want)
			}
			e.refs++
			s.touchLocked(e)
			s.mu.Unlock()
			return &Stream{st: e.st}, false, nil
		}
		s.detachLocked(e.st)
		e = nil
	}
	sealed := e != nil // a closed stream key is a sealed file
	if e == nil {
		e = &entry{entryKey: k}
		s.entries[k] = e
	}
	checked := e.sealedAs == o.want
	s.beginBusyLocked(e)
	s.mu.Unlock()
	x, err := s.openStream(e, o.want, sealed, checked)
	if err != nil {
		return nil, false, err
	}
	writer = x.size.Load() < 0
	return &Stream{st: x, writer: writer}, writer, nil
}

// openStream opens the stream of e, which the caller made busy, to hash
// to want: its sealed file if there is one that does, or else a new one
// to write.
func (s *Store) openStream(e *entry, want digest.Digest, sealed, checked bool) (*stream, error) {
	defer s.wg.Done()
	var x *stream
	var err error
	gone := !sealed // no sealed file (any more)
	if sealed {
		x, gone, err = s.openSealed(e.key, want, checked)
	}
	if gone {
		x, err = s.createStream(e.key, want)
	}
	s.mu.Lock()
	lost := err == nil && s.closed // and Close has not seen x: shut it here
	if err == nil && !lost {
		s.usage.Add(x.written.Load() - e.bytes)
		x.e = e
		e.st, e.refs, e.sealedAs = x, 1, ""
		if x.size.Load() >= 0 {
			e.sealedAs = want
		}
		s.touchLocked(e)
	} else if gone {
		s.usage.Add(-e.bytes)
		delete(s.entries, e.entryKey)
	}
	s.endBusyLocked(e)
	s.mu.Unlock()
	if lost {
		x.shutdown()
		return nil, ErrClosed
	}
	return x, err
}

// openSealed opens the sealed file of key. Unless checked, it first makes
// sure, once per process, that the file still hashes to want: unlike
// blob chunks, a stream's bytes carry no checksums of their own. A file
// that does not match is removed, so the stream is produced again instead
// of serving wrong bytes; gone reports that, or that the file is missing.
func (s *Store) openSealed(key, want digest.Digest, checked bool) (x *stream, gone bool, err error) {
	path := s.streamPath(key)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, true, nil // evicted by hand, or lost: produce it again
	}
	if err != nil {
		return nil, false, fmt.Errorf("cache: open stream %s: %w", key, err)
	}
	info, err := f.Stat()
	if err == nil && !checked {
		var sum digest.Digest
		if sum, err = want.Algorithm().FromReader(io.NewSectionReader(f, 0, info.Size())); err == nil && sum != want {
			f.Close()
			slog.Warn("cache: sealed stream does not match its digest; discarding it", "key", key, "want", want, "got", sum)
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, false, fmt.Errorf("cache: remove corrupt stream %s: %w", key, err)
			}
			return nil, true, nil
		}
	}
	if err != nil {
		f.Close()
		return nil, false, fmt.Errorf("cache: open stream %s: %w", key, err)
	}
	x = &stream{s: s, key: key, want: want, f: f, path: path, state: streamSealed, wake: make(chan struct{})}
	x.written.Store(info.Size())
	x.size.Store(info.Size())
	return x, false, nil
}

// createStream makes the file of a stream to be written, whose content
// must hash to want.
func (s *Store) createStream(key, want digest.Digest) (*stream, error) {
	f, err := os.CreateTemp(filepath.Join(s.dir, "streams", "tmp"), key.Encoded()+"-*.partial")
	if err != nil {
		return nil, fmt.Errorf("cache: create stream %s: %w", key, err)
	}
	x := &stream{s: s, key: key, want: want, f: f, path: f.Name(), h: want.Algorithm().Hash(), wake: make(chan struct{})}
	x.size.Store(-1)
	return x, nil
}

// detachLocked retires failed stream x: the next Stream call of its key
// produces it again, while x's holders keep x until they close it.
// Callers hold s.mu.
func (s *Store) detachLocked(x *stream) {
	e := x.e
	if s.entries[e.entryKey] != e {
		return // detached already
	}
	s.usage.Add(-x.written.Load()) // its file is gone, and nothing is written once failed
	delete(s.entries, e.entryKey)
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
		var eof error
		if size := x.size.Load(); size >= 0 {
			if off >= size {
				return 0, io.EOF
			}
			if end > size {
				p, eof = p[:size-off], io.EOF
			}
		} else if end > x.written.Load() {
			if err := x.waitWritten(ctx, end); err != nil {
				return 0, err
			}
			continue
		}
		n, err := x.f.ReadAt(p, off)
		if f := x.failure.Load(); f != nil {
			return 0, f.err // aborted meanwhile: the bytes are void
		}
		if err != nil {
			return n, fmt.Errorf("cache: read stream %s at %d: %w", x.key, off, err)
		}
		return n, eof
	}
}

// waitWritten waits until the stream has end bytes, or has ended.
func (x *stream) waitWritten(ctx context.Context, end int64) error {
	x.mu.Lock()
	if x.state != streamWriting || end <= x.written.Load() {
		x.mu.Unlock()
		return nil
	}
	if x.closed {
		x.mu.Unlock()
		return ErrClosed
	}
	wake := x.wake
	x.wakeUsed = true
	x.mu.Unlock()
	if testHookStreamWait != nil {
		testHookStreamWait()
	}
	select {
	case <-wake:
		return nil
	case <-ctx.Done():
		return ctx.Err()
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

// releaseStream drops a reference; the last one closes the file, so the
// key becomes evictable.
func (s *Store) releaseStream(x *stream) {
	e := x.e
	s.mu.Lock()
	e.refs--
	if e.refs > 0 {
		s.mu.Unlock()
		return
	}
	if detached := s.entries[e.entryKey] != e; detached || s.closed {
		// Close shuts down the streams it found, and the directory is
		// no longer ours; a detached stream failed, its file is gone,
		// and only its descriptor is left to close.
		s.mu.Unlock()
		if detached {
			x.shutdown()
		}
		return
	}
	e.st = nil
	e.sealedAs = x.want // sealed or checked by this process, see below
	s.beginBusyLocked(e)
	s.mu.Unlock()
	// Sealed: a writer's Close aborts and detaches a stream it did not
	// seal, and a stream opened sealed has no writer.
	size, path := x.shutdown()
	s.settle(e, size, path)
}

// shutdown aborts the stream if it is still being written and closes its
// file. It returns the size of the sealed content (-1 if not sealed) and
// where the file is.
func (x *stream) shutdown() (size int64, path string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if !x.closed {
		if x.state == streamWriting {
			x.failLocked(fmt.Errorf("%w: %s: %w", ErrAborted, x.key, ErrClosed))
		}
		x.closed = true
		x.f.Close()
	}
	return x.size.Load(), x.path
}
