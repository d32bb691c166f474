package cache

import (
	"math"

	"golang.org/x/sys/unix"
)

// Capacity is the most the store can hold: its bound, or without one the
// size of the file system it lives on. Content larger than that can never
// be cached whole, whatever a manifest claims.
func (s *Store) Capacity() int64 {
	if s.max > 0 {
		return s.max
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.dir, &st); err != nil {
		return math.MaxInt64 // unknown; the writes will tell
	}
	return int64(st.Blocks) * st.Bsize
}
