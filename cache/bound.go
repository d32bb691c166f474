package cache

import (
	"fmt"
	"log/slog"
	"math"
	"time"

	"golang.org/x/sys/unix"
)

// What bounds the store on disk: WithMaxBytes or WithMaxShare (Store.max),
// and the free space it leaves on its file system (Store.minFree). Both
// are enforced by evict, which removes least-recently-used keys no handle
// holds, demoted ones (Demote) first.
//
// The free space is an estimate: the file system's available bytes when
// last looked at (at most statfsEvery ago), minus what the store has
// written since and plus what it removed (Store.usage's change). So a
// fetch that fills the disk is seen at once, and another program's writes
// within statfsEvery.

// fsStat is what the store needs of its file system.
type fsStat struct {
	size  int64 // bytes in all
	avail int64 // bytes free for an unprivileged writer (what kubelet sees)
}

func statfs(dir string) (fsStat, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fsStat{}, fmt.Errorf("cache: statfs %s: %w", dir, err)
	}
	unit := st.Frsize
	if unit == 0 {
		unit = st.Bsize
	}
	return fsStat{size: int64(st.Blocks) * unit, avail: int64(st.Bavail) * unit}, nil
}

func validShare(f float64) bool { return f >= 0 && f <= 1 }

// bounds returns the byte bound and the free space floor that o ask for
// on a file system of size bytes.
func (o options) bounds(size int64) (maxBytes, minFree int64) {
	maxBytes, minFree = o.maxBytes, o.minFree
	if o.maxShare > 0 {
		if n := max(1, int64(o.maxShare*float64(size))); maxBytes == 0 || n < maxBytes {
			maxBytes = n
		}
	}
	if o.minFreeShare > 0 {
		minFree = max(minFree, int64(o.minFreeShare*float64(size)))
	}
	return maxBytes, minFree
}

// needsStatfs reports whether o depend on the file system's size.
func (o options) needsStatfs() bool { return o.maxShare > 0 || o.minFreeShare > 0 }

// excess returns how many bytes evict must remove now: beyond the bound,
// or missing from the free space floor.
func (s *Store) excess() int64 {
	u := s.usage.Load()
	var over int64
	if s.max > 0 {
		over = u - s.max
	}
	if s.minFree > 0 {
		over = max(over, s.minFree-s.free(u))
	}
	return over
}

// free returns the estimated free space of the file system, given the
// store's usage now.
func (s *Store) free(usage int64) int64 {
	s.freeMu.Lock()
	stale := s.freeAt.IsZero() || time.Since(s.freeAt) >= s.statfsEvery
	s.freeMu.Unlock()
	if stale {
		st, err := s.statfs(s.dir)
		s.freeMu.Lock()
		if err != nil {
			if !s.freeErr {
				slog.Warn("cache: free space unknown, its floor is not kept", "dir", s.dir, "err", err)
			}
			s.freeErr = true
			s.freeMu.Unlock()
			return math.MaxInt64
		}
		s.freeErr = false
		s.freeAt, s.freeAvail, s.freeUsage = time.Now(), st.avail, usage
		s.freeMu.Unlock()
	}
	s.freeMu.Lock()
	defer s.freeMu.Unlock()
	return s.freeAvail - (usage - s.freeUsage)
}

// watchFree keeps the free space floor while the store is idle: others
// may fill its file system.
func (s *Store) watchFree() {
	defer s.wg.Done()
	t := time.NewTicker(s.statfsEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			s.evict()
		}
	}
}
