// Package cache is weightsnap's node-wide store of fetched bytes:
// content-addressed (one copy per digest, however many images share it),
// crash-safe (after kill -9 it serves only bytes it can prove correct),
// bounded (least-recently-used data no open handle needs is evicted) and
// persistent across restarts. It knows nothing of FUSE, registries or tar:
// it gets bytes through a FetchFunc, or from a Stream's writer.
//
// On disk, under the store's directory:
//
//	blobs/<alg>/<hex>.data   sparse content of a Blob
//	blobs/<alg>/<hex>.rec    which chunks of it are present (see records.go)
//	blobs/<alg>/<hex>.seg/   ranges of it kept in files of their own (segment.go)
//	streams/<alg>/<hex>      a sealed Stream
//	streams/tmp/*.partial    Streams being written (deleted at Open)
//	meta/<name>              records of PutMeta
//	lock                     flock held while a Store is open
package cache

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	digest "github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

var (
	// ErrClosed is returned by operations on a closed Store or handle.
	ErrClosed = errors.New("cache: closed")
	// ErrDigestMismatch is wrapped by errors about content that does not
	// hash to its digest, or a chunk of it that does not match its table.
	ErrDigestMismatch = errors.New("cache: content does not match its digest")
	// ErrDigestConflict is returned by Store.Blob and Store.Stream when the
	// key is open to hash to another digest than the one asked.
	ErrDigestConflict = errors.New("cache: key is open with another content digest")
	// ErrTable is wrapped by Store.Blob's error about a chunk table that
	// does not describe the blob in chunks the store can check.
	ErrTable = errors.New("cache: chunk table does not fit the blob")
	// ErrTableConflict is wrapped by Store.Blob's error when the key is
	// open with another chunk table: the caller can download and verify
	// the whole blob instead.
	ErrTableConflict = errors.New("cache: blob is open with another chunk table")
	// ErrSizeMismatch is returned by Store.Blob when the key is open with
	// another size.
	ErrSizeMismatch = errors.New("cache: blob size differs from the open blob's")
	// ErrNotWriter is returned by Stream.Write and Stream.Seal on a handle
	// that is not the stream's writer.
	ErrNotWriter = errors.New("cache: not the stream's writer")
	// ErrAborted is wrapped by the error readers of an aborted Stream get.
	ErrAborted = errors.New("cache: stream aborted")
)

// Store is a cache directory opened by one process.
type Store struct {
	dir       string
	max       int64 // 0: unbounded
	minFree   int64 // bytes kept free on the file system; 0: none
	chunkSize int64
	maxRun    int // chunks per FetchFunc call
	bufs      sync.Pool

	ctx    context.Context // cancelled by Close: stops background work
	cancel context.CancelFunc
	wg     sync.WaitGroup
	lock   *os.File

	usage atomic.Int64 // see the consistency scheme in blob.go

	// The free space estimate (bound.go), guarded by freeMu.
	statfs      func(dir string) (fsStat, error)
	statfsEvery time.Duration
	freeMu      sync.Mutex
	freeAt      time.Time // of the last statfs; zero: look now
	freeAvail   int64     // its available bytes
	freeUsage   int64     // and usage then
	freeErr     bool      // the last statfs failed (logged once)

	mu      sync.Mutex // guards entries and their fields, clock, stamp and closed; no file I/O under it
	entries map[entryKey]*entry
	clock   uint64    // logical time for LRU
	stamp   time.Time // last mtime given by nextStampLocked
	closed  bool

	dirtyMu sync.Mutex
	dirty   map[*blob]struct{}
	flushCh chan struct{}
}

// Open opens (creating it 0700 if needed) the cache directory dir. Only one
// Store may have a directory open at a time, across processes.
func Open(dir string, opts ...Option) (*Store, error) {
	opt, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	var fs fsStat
	if opt.needsStatfs() {
		if fs, err = opt.statfs(dir); err != nil {
			lock.Close()
			return nil, err
		}
	}
	maxBytes, minFree := opt.bounds(fs.size)
	s := &Store{
		dir:         dir,
		max:         maxBytes,
		minFree:     minFree,
		statfs:      opt.statfs,
		statfsEvery: opt.statfsEvery,
		chunkSize:   opt.chunkSize,
		maxRun:      int(opt.maxFetch / opt.chunkSize),
		lock:        lock,
		entries:     make(map[entryKey]*entry),
		dirty:       make(map[*blob]struct{}),
		flushCh:     make(chan struct{}, 1),
	}
	bufSize := s.chunkSize * int64(s.maxRun)
	s.bufs.New = func() any { b := make([]byte, bufSize); return &b }
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.scan(); err != nil {
		s.cancel()
		lock.Close()
		return nil, err
	}
	s.wg.Add(1)
	go s.flusher()
	if s.minFree > 0 {
		s.wg.Add(1)
		go s.watchFree()
	}
	s.evict()
	return s, nil
}

// lockDir makes the directories of a store at dir and takes its lock.
func lockDir(dir string) (*os.File, error) {
	for _, d := range []string{dir, filepath.Join(dir, "blobs"), filepath.Join(dir, "streams", "tmp"), filepath.Join(dir, "meta")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("cache: lock %s (is another process using it?): %w", dir, err)
	}
	return lock, nil
}

// Close stops background work, makes what was fetched durable and closes
// every file, once the ranges handed out by ReadFile are released. Handles
// still open fail with ErrClosed afterwards; a Stream still being written
// is aborted.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	var blobs []*blob
	var streams []*stream
	for _, e := range s.entries {
		if e.b != nil {
			blobs = append(blobs, e.b)
		}
		if e.st != nil {
			streams = append(streams, e.st)
		}
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	var errs []error
	for _, b := range blobs {
		errs = append(errs, b.shutdown())
	}
	for _, st := range streams {
		st.shutdown()
	}
	unix.Flock(int(s.lock.Fd()), unix.LOCK_UN)
	errs = append(errs, s.lock.Close())
	return errors.Join(errs...)
}

// Flush makes durable what was fetched so far, and records it as Close
// would, without closing anything: for a process that exits without
// closing the store (its FUSE mounts handed over to a successor), so that
// a machine crash after it loses nothing the process fetched. Presence
// records need no Flush to survive the process: they are in the records
// file as soon as a fetch completes.
func (s *Store) Flush() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	var blobs []*blob
	var busy []chan struct{}
	for _, e := range s.entries {
		if e.b != nil {
			blobs = append(blobs, e.b)
		}
		if e.busy != nil {
			// A blob being closed by another goroutine: its shutdown
			// syncs it.
			busy = append(busy, e.busy)
		}
	}
	s.mu.Unlock()
	for _, ch := range busy {
		<-ch
	}
	var errs []error
	for _, b := range blobs {
		// A blob the flusher is flushing: flush waits for it (recMu), so
		// its sync is over when Flush returns. One closed meanwhile was
		// synced by its shutdown.
		errs = append(errs, b.flush())
	}
	return errors.Join(errs...)
}

// Usage returns the bytes of cached data on disk (Blob chunks present and
// Stream bytes written), the quantity WithMaxBytes and WithMaxShare bound.
func (s *Store) Usage() int64 { return s.usage.Load() }

func (s *Store) blobPath(key digest.Digest) string {
	return filepath.Join(s.dir, "blobs", string(key.Algorithm()), key.Encoded())
}

func (s *Store) streamPath(key digest.Digest) string {
	return filepath.Join(s.dir, "streams", string(key.Algorithm()), key.Encoded())
}

func (s *Store) getBuf() *[]byte  { return s.bufs.Get().(*[]byte) }
func (s *Store) putBuf(b *[]byte) { s.bufs.Put(b) }
