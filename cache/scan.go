package cache

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	digest "github.com/opencontainers/go-digest"
)

// found is a key on disk, as scan finds it.
type found struct {
	e     *entry
	mtime time.Time
}

// scan rebuilds the index of keys on disk, their sizes and LRU order, and
// removes what an earlier process left unfinished.
func (s *Store) scan() error {
	removeAll(filepath.Join(s.dir, "streams", "tmp"))
	removeTemps(filepath.Join(s.dir, "meta"))
	blobs, err := s.scanBlobs()
	if err != nil {
		return err
	}
	streams, err := s.scanStreams()
	if err != nil {
		return err
	}
	all := append(blobs, streams...)
	sort.SliceStable(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	for _, f := range all {
		if f.mtime.After(s.stamp) {
			s.stamp = f.mtime
		}
		s.touchLocked(f.e)
		s.entries[f.e.entryKey] = f.e
		s.usage.Add(f.e.bytes)
	}
	return nil
}

func (s *Store) scanBlobs() ([]found, error) {
	algs, err := os.ReadDir(filepath.Join(s.dir, "blobs"))
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	var all []found
	for _, a := range algs {
		adir := filepath.Join(s.dir, "blobs", a.Name())
		files, err := os.ReadDir(adir)
		if err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
		for _, f := range files {
			if b, ok := scanBlob(adir, digest.Algorithm(a.Name()), f); ok {
				all = append(all, b)
			}
		}
	}
	return all, nil
}

// scanBlob looks at one file of a blob directory: the records file of a
// blob names a key, and files that belong to no valid records file go.
func scanBlob(adir string, alg digest.Algorithm, f fs.DirEntry) (found, bool) {
	name := f.Name()
	hex, ok := strings.CutSuffix(name, ".rec")
	if !ok {
		if hex, ok := cutDataSuffix(name); ok {
			if _, err := os.Stat(filepath.Join(adir, hex+".rec")); err == nil {
				return found{}, false
			}
		}
		os.RemoveAll(filepath.Join(adir, name)) // orphan or temporary
		return found{}, false
	}
	key := digest.NewDigestFromEncoded(alg, hex)
	raw, err := os.ReadFile(filepath.Join(adir, name))
	r, valid := replay(raw)
	if err != nil || key.Validate() != nil || !valid {
		os.Remove(filepath.Join(adir, name))
		os.Remove(filepath.Join(adir, hex+".data"))
		os.RemoveAll(segmentDir(filepath.Join(adir, hex)))
		return found{}, false
	}
	e := &entry{entryKey: entryKey{kindBlob, key}, bytes: r.cached}
	var mt time.Time
	if info, _ := f.Info(); info != nil {
		mt = info.ModTime()
	}
	return found{e, mt}, true
}

func (s *Store) scanStreams() ([]found, error) {
	algs, err := os.ReadDir(filepath.Join(s.dir, "streams"))
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	var all []found
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
			e := &entry{entryKey: entryKey{kindStream, key}, bytes: info.Size()}
			all = append(all, found{e, info.ModTime()})
		}
	}
	return all, nil
}

// cutDataSuffix returns the key of a blob's data file or segment
// directory.
func cutDataSuffix(name string) (string, bool) {
	if hex, ok := strings.CutSuffix(name, ".data"); ok {
		return hex, true
	}
	return strings.CutSuffix(name, ".seg")
}

// removeAll empties dir: streams being written when a process ended.
func removeAll(dir string) {
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		os.Remove(filepath.Join(dir, de.Name()))
	}
}

// removeTemps removes what PutMeta left half written.
func removeTemps(dir string) {
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), ".tmp-") {
			os.Remove(p)
		}
		return nil
	})
}
