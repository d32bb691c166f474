package cache

import "math"

// Capacity is the most the store can hold: the size of the file system it
// lives on less its free space floor, and at most its bound. Content
// larger than that can never be cached whole, whatever a manifest claims.
func (s *Store) Capacity() int64 {
	st, err := s.statfs(s.dir)
	if err != nil {
		if s.max > 0 {
			return s.max
		}
		return math.MaxInt64 // unknown; the writes will tell
	}
	c := max(0, st.size-s.minFree)
	if s.max > 0 {
		c = min(c, s.max)
	}
	return c
}
