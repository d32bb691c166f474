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
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
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
	// hash to its key.
	ErrDigestMismatch = errors.New("cache: content does not match its digest")
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
	max       int64
	chunkSize int64
	maxRun    int // chunks per FetchFunc call
	bufs      sync.Pool

	ctx    context.Context // cancelled by Close: stops background work
	cancel context.CancelFunc
	wg     sync.WaitGroup
	lock   *os.File

	usage atomic.Int64

	mu      sync.Mutex // guards entries and their fields, clock, stamp and closed
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
	s := &Store{
		dir:       dir,
		max:       opt.maxBytes,
		chunkSize: opt.chunkSize,
		maxRun:    int(opt.maxFetch / opt.chunkSize),
		lock:      lock,
		entries:   make(map[entryKey]*entry),
		dirty:     make(map[*blob]struct{}),
		flushCh:   make(chan struct{}, 1),
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
	s.evict()
	return s, nil
}

// scan rebuilds the index of keys on disk, their sizes and LRU order.
func (s *Store) scan() error {
	type found struct {
		e     *entry
		mtime time.Time
	}
	var all []found
	tmp := filepath.Join(s.dir, "streams", "tmp")
	partial, _ := os.ReadDir(tmp)
	for _, de := range partial {
		os.Remove(filepath.Join(tmp, de.Name()))
	}
	algs, err := os.ReadDir(filepath.Join(s.dir, "blobs"))
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	for _, a := range algs {
		adir := filepath.Join(s.dir, "blobs", a.Name())
		files, err := os.ReadDir(adir)
		if err != nil {
			return fmt.Errorf("cache: %w", err)
		}
		for _, f := range files {
			name := f.Name()
			hex, ok := strings.CutSuffix(name, ".rec")
			if !ok {
				if hex, ok := cutDataSuffix(name); ok {
					if _, err := os.Stat(filepath.Join(adir, hex+".rec")); err == nil {
						continue
					}
				}
				os.RemoveAll(filepath.Join(adir, name)) // orphan or temporary
				continue
			}
			key := digest.NewDigestFromEncoded(digest.Algorithm(a.Name()), hex)
			raw, err := os.ReadFile(filepath.Join(adir, name))
			r, valid := replay(raw)
			if err != nil || key.Validate() != nil || !valid {
				os.Remove(filepath.Join(adir, name))
				os.Remove(filepath.Join(adir, hex+".data"))
				os.RemoveAll(segmentDir(filepath.Join(adir, hex)))
				continue
			}
			e := &entry{entryKey: entryKey{kindBlob, key}}
			e.bytes = r.cached
			info, _ := f.Info()
			var mt time.Time
			if info != nil {
				mt = info.ModTime()
			}
			all = append(all, found{e, mt})
		}
	}
	algs, err = os.ReadDir(filepath.Join(s.dir, "streams"))
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	for _, a := range algs {
		if a.Name() == "tmp" || !a.IsDir() {
			continue
		}
		files, _ := os.ReadDir(filepath.Join(s.dir, "streams", a.Name()))
		for _, f := range files {
			key := digest.NewDigestFromEncoded(digest.Algorithm(a.Name()), f.Name())
			info, err := f.Info()
			if err != nil || key.Validate() != nil {
				continue
			}
			e := &entry{entryKey: entryKey{kindStream, key}}
			e.bytes = info.Size()
			all = append(all, found{e, info.ModTime()})
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	for _, f := range all {
		if f.mtime.After(s.stamp) {
			s.stamp = f.mtime
		}
		s.clock++
		f.e.lastUse = s.clock
		s.entries[f.e.entryKey] = f.e
		s.usage.Add(f.e.bytes)
	}
	removeTemps(filepath.Join(s.dir, "meta"))
	return nil
}

func removeTemps(dir string) {
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), ".tmp-") {
			os.Remove(p)
		}
		return nil
	})
}

// Close stops background work, makes what was fetched durable and closes
// every file. Handles still open fail with ErrClosed afterwards; a Stream
// still being written is aborted.
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

// Usage returns the bytes of cached data on disk (Blob chunks present and
// Stream bytes written), the quantity WithMaxBytes bounds.
func (s *Store) Usage() int64 { return s.usage.Load() }

// cutDataSuffix returns the key of a blob's data file or segment
// directory.
func cutDataSuffix(name string) (string, bool) {
	if hex, ok := strings.CutSuffix(name, ".data"); ok {
		return hex, true
	}
	return strings.CutSuffix(name, ".seg")
}

func (s *Store) blobPath(key digest.Digest) string {
	return filepath.Join(s.dir, "blobs", string(key.Algorithm()), key.Encoded())
}

func (s *Store) streamPath(key digest.Digest) string {
	return filepath.Join(s.dir, "streams", string(key.Algorithm()), key.Encoded())
}

func (s *Store) getBuf() *[]byte  { return s.bufs.Get().(*[]byte) }
func (s *Store) putBuf(b *[]byte) { s.bufs.Put(b) }

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

// PutMeta stores a small derived record under name ("/"-separated, local,
// e.g. "layer/<hex>.json") atomically: readers see the old or the new
// content, also after a crash.
func (s *Store) PutMeta(name string, data []byte) error {
	p, err := s.metaPath(name)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cache: put meta %q: %w", name, err)
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("cache: put meta %q: %w", name, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("cache: put meta %q: %w", name, err)
	}
	syncDir(dir)
	return nil
}

// GetMeta returns what PutMeta stored under name; the error satisfies
// errors.Is(err, fs.ErrNotExist) when there is none.
func (s *Store) GetMeta(name string) ([]byte, error) {
	p, err := s.metaPath(name)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("cache: get meta %q: %w", name, err)
	}
	return b, nil
}

func (s *Store) metaPath(name string) (string, error) {
	if !filepath.IsLocal(name) || filepath.Clean(name) != name {
		return "", fmt.Errorf("cache: invalid meta name %q", name)
	}
	for _, c := range strings.Split(name, "/") {
		if strings.HasPrefix(c, ".tmp-") {
			return "", fmt.Errorf("cache: invalid meta name %q", name)
		}
	}
	return filepath.Join(s.dir, "meta", name), nil
}

// syncDir makes a rename or a new file in dir durable; best effort, since
// the worst outcome of losing it is a refetch.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}
