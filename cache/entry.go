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
	lastUse uint64
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
// an mtime at path that orders them for LRU after a restart.
func (s *Store) settle(e *entry, bytes int64, path string) {
	defer s.wg.Done()
	s.mu.Lock()
	e.bytes = bytes
	s.touchLocked(e)
	stamp := s.nextStampLocked()
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

// touchLocked marks e as just used.
func (s *Store) touchLocked(e *entry) {
	s.clock++
	e.lastUse = s.clock
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
// bound, or nothing more can be evicted.
func (s *Store) evict() {
	for s.max > 0 && s.usage.Load() > s.max {
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
