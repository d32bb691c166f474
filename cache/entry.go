package cache

import (
	"log/slog"
	"os"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/metrics"
)

type kind uint8

const (
	kindBlob kind = iota
	kindStream
)

type entryKey struct {
	kind kind
	key  digest.Digest
}

// entry is what the store knows of one key on disk. Its fields are
// guarded by Store.mu.
//
// A key is closed (no blob or stream in memory), busy (its files are being
// opened, closed or removed, by one goroutine, without Store.mu), or open
// (b or st set, refs > 0). Only a closed key is evicted, and nobody opens
// a busy key's files: they wait for busy to be closed and look again. So
// a key's files are opened once however many callers want them, and
// never while they are being closed or removed.
type entry struct {
	entryKey
	// bytes is the data the key holds on disk while closed; an open
	// blob or stream keeps its own count, and leaves it here when closed.
	bytes   int64
	lastUse uint64 // 0: demoted and closed, the first to be evicted
	// demoted: the key is no longer wanted (Store.Demote); cleared when
	// it is used again.
	demoted bool
	busy    chan struct{}
	refs    int // handles (and verification runs) of the open blob or stream
	b       *blob
	st      *stream
	// sealedAs is the digest a sealed stream's file was hashed to (or
	// sealed as) by this process; "" if none.
	sealedAs digest.Digest
}

// beginBusyLocked marks e busy. The caller ends that with endBusyLocked
// and then calls s.wg.Done, so that Close waits until the files settle.
// Callers hold s.mu and have checked that the store is not closed.
func (s *Store) beginBusyLocked(e *entry) {
	e.busy = make(chan struct{})
	s.wg.Add(1)
}

func (s *Store) endBusyLocked(e *entry) {
	close(e.busy)
	e.busy = nil
}

// waitBusyLocked waits, without s.mu, until e is not busy, and reports
// whether it was (and s.mu was let go meanwhile). Callers hold s.mu.
func (s *Store) waitBusyLocked(e *entry) bool {
	if e == nil || e.busy == nil {
		return false
	}
	busy := e.busy
	s.mu.Unlock()
	<-busy
	s.mu.Lock()
	return true
}

// settle ends the busy state of e, whose value was just closed, leaving
// the given bytes on disk: a key without any is removed, the others get
// an mtime at path that orders them for LRU after a restart (a demoted
// key the oldest there is, as its place here).
func (s *Store) settle(e *entry, bytes int64, path string) {
	defer s.wg.Done()
	s.mu.Lock()
	e.bytes = bytes
	stamp := coldStamp
	if e.demoted {
		e.lastUse = 0
	} else {
		s.touchLocked(e)
		stamp = s.nextStampLocked()
	}
	s.mu.Unlock()
	if bytes == 0 {
		s.removeFiles(e.entryKey)
	} else {
		os.Chtimes(path, stamp, stamp)
	}
	s.mu.Lock()
	if bytes == 0 {
		delete(s.entries, e.entryKey)
	}
	s.endBusyLocked(e)
	s.mu.Unlock()
	s.evict()
}

// touchLocked marks e as just used, and so wanted again.
func (s *Store) touchLocked(e *entry) {
	s.clock++
	e.lastUse = s.clock
	e.demoted = false
}

// coldStamp is the mtime of a demoted key's file: older than any other.
var coldStamp = time.Unix(1, 0)

// Demote marks key, a Blob's or a Stream's, as no longer wanted: once no
// handle holds it, its data is the first to be evicted, before any key
// that was not demoted however long ago it was used, in this process and
// after a restart. Opening the key again undoes it. Demote of a key the
// store does not have does nothing.
func (s *Store) Demote(key digest.Digest) {
	var paths []string
	s.mu.Lock()
	for _, k := range []entryKey{{kindBlob, key}, {kindStream, key}} {
		e := s.entries[k]
		if e == nil {
			continue
		}
		e.demoted = true
		if e.b == nil && e.st == nil && e.busy == nil {
			// Closed: settle will not run for it before it is
			// opened again.
			e.lastUse = 0
			paths = append(paths, s.stampPath(k))
		}
	}
	s.mu.Unlock()
	for _, p := range paths {
		// Only the order after a restart depends on it. A key evicted
		// meanwhile has no file left to stamp.
		os.Chtimes(p, coldStamp, coldStamp)
	}
	s.evict()
}

// stampPath is the file whose mtime orders key k after a restart.
func (s *Store) stampPath(k entryKey) string {
	if k.kind == kindStream {
		return s.streamPath(k.key)
	}
	return s.blobPath(k.key) + ".rec"
}

// nextStampLocked returns the mtime for a key released now. Stamps
// strictly increase: file system timestamps can be coarser than the
// interval between two releases.
func (s *Store) nextStampLocked() time.Time {
	t := time.Now()
	if !t.After(s.stamp) {
		t = s.stamp.Add(time.Microsecond)
	}
	s.stamp = t
	return t
}

// evict removes least-recently-used closed keys until usage is within the
// bound and the free space floor is kept, or nothing more can be evicted.
func (s *Store) evict() {
	for s.excess() > 0 {
		s.mu.Lock()
		e := s.victimLocked()
		if e == nil {
			s.mu.Unlock()
			return // everything is in use: exceed rather than fail reads
		}
		s.beginBusyLocked(e)
		n := e.bytes
		s.usage.Add(-n)
		s.mu.Unlock()
		s.removeFiles(e.entryKey)
		metrics.CacheEvictedBytes.Add(float64(n))
		slog.Debug("cache: evicted", "key", e.key, "bytes", n)
		s.mu.Lock()
		delete(s.entries, e.entryKey)
		s.endBusyLocked(e)
		s.mu.Unlock()
		s.wg.Done()
	}
}

// victimLocked returns the least recently used closed key holding data.
func (s *Store) victimLocked() *entry {
	if s.closed {
		return nil
	}
	var victim *entry
	for _, e := range s.entries {
		if e.b != nil || e.st != nil || e.busy != nil || e.bytes == 0 {
			continue
		}
		if victim == nil || e.lastUse < victim.lastUse {
			victim = e
		}
	}
	return victim
}

// removeFiles deletes the files of a busy key.
func (s *Store) removeFiles(k entryKey) {
	switch k.kind {
	case kindBlob:
		base := s.blobPath(k.key)
		// The records go first: data without records is never trusted.
		os.Remove(base + ".rec")
		os.Remove(base + ".data")
		os.RemoveAll(segmentDir(base))
	case kindStream:
		os.Remove(s.streamPath(k.key))
	}
}
