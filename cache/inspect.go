package cache

import (
	"errors"
	"fmt"
	iofs "io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	digest "github.com/opencontainers/go-digest"
)

// What an operator sees of a cache directory, and what it can remove.
// Inspect and ReadMeta only read files, so they work on a directory that
// a running daemon holds open; Remove needs the Store, hence its lock.

// Kind says what the cache holds under a key.
type Kind string

const (
	// KindBlob is random-access content (Store.Blob).
	KindBlob Kind = "blob"
	// KindStream is a sealed Stream (Store.Stream).
	KindStream Kind = "stream"
)

// ErrInUse is returned by Remove for a key that a handle has open.
var ErrInUse = errors.New("cache: key is open")

// EntryInfo is what the cache holds under one key, as its files say.
type EntryInfo struct {
	Kind Kind
	Key  digest.Digest
	// Size is the content's size: a blob's from its records, a sealed
	// stream's its length.
	Size int64
	// Present is the bytes of content on disk that the records vouch for:
	// what WithMaxBytes bounds.
	Present int64
	// DiskBytes is what the key's files take on the file system
	// (allocated blocks: data, segments, records).
	DiskBytes int64
	// Complete is set when the whole content is present and was verified:
	// a blob's complete record, a sealed stream.
	Complete bool

	completeSum uint32 // a blob's complete record: see VerifiedAgainst
}

// VerifiedAgainst reports whether the entry is complete and was verified
// against d. A blob kept under a key of its own (WithContentDigest) records
// which digest it matched only as a checksum, so a caller tests the
// digests it knows.
func (e EntryInfo) VerifiedAgainst(d digest.Digest) bool {
	if !e.Complete {
		return false
	}
	if e.Kind == KindStream || e.completeSum == 0 {
		return d == e.Key
	}
	return e.completeSum == checksum([]byte(d))
}

// Inspect returns what the cache directory dir holds, sorted by kind and
// key, reading its records without taking its lock or changing anything.
// A process that has dir open appends a chunk's record once its fetch
// completed, but a complete record only once the data is synced, a
// moment after the verification, so a blob just verified may not show
// complete yet. Files the
// Store would discard when it opens (records with a damaged header, data
// without records, streams being written) are left out.
func Inspect(dir string) ([]EntryInfo, error) {
	var all []EntryInfo
	blobs := filepath.Join(dir, "blobs")
	algs, err := os.ReadDir(blobs)
	if err != nil {
		return nil, fmt.Errorf("cache: inspect %s: %w", dir, err)
	}
	for _, a := range algs {
		files, _ := os.ReadDir(filepath.Join(blobs, a.Name()))
		for _, f := range files {
			hex, ok := strings.CutSuffix(f.Name(), ".rec")
			if !ok {
				continue
			}
			key := digest.NewDigestFromEncoded(digest.Algorithm(a.Name()), hex)
			if key.Validate() != nil {
				continue
			}
			if e, ok := inspectBlob(filepath.Join(blobs, a.Name(), hex), key); ok {
				all = append(all, e)
			}
		}
	}
	streams := filepath.Join(dir, "streams")
	algs, _ = os.ReadDir(streams)
	for _, a := range algs {
		if a.Name() == "tmp" || !a.IsDir() {
			continue
		}
		files, _ := os.ReadDir(filepath.Join(streams, a.Name()))
		for _, f := range files {
			key := digest.NewDigestFromEncoded(digest.Algorithm(a.Name()), f.Name())
			info, err := f.Info()
			if err != nil || key.Validate() != nil || !info.Mode().IsRegular() {
				continue
			}
			all = append(all, EntryInfo{
				Kind: KindStream, Key: key, Size: info.Size(), Present: info.Size(),
				DiskBytes: allocatedBytes(info), Complete: true,
			})
		}
	}
	slices.SortFunc(all, func(a, b EntryInfo) int {
		if a.Kind != b.Kind {
			return strings.Compare(string(a.Kind), string(b.Kind))
		}
		return strings.Compare(string(a.Key), string(b.Key))
	})
	return all, nil
}

// inspectBlob reads the blob whose files are named base.*.
func inspectBlob(base string, key digest.Digest) (EntryInfo, bool) {
	raw, err := os.ReadFile(base + ".rec")
	if err != nil {
		return EntryInfo{}, false
	}
	r, ok := replay(raw)
	if !ok {
		return EntryInfo{}, false
	}
	e := EntryInfo{
		Kind: KindBlob, Key: key, Size: r.size, Present: r.cached,
		Complete: r.complete, completeSum: r.completeSum,
	}
	for _, p := range []string{base + ".rec", base + ".data"} {
		if info, err := os.Stat(p); err == nil {
			e.DiskBytes += allocatedBytes(info)
		}
	}
	segs, _ := os.ReadDir(segmentDir(base))
	for _, g := range segs {
		if info, err := g.Info(); err == nil {
			e.DiskBytes += allocatedBytes(info)
		}
	}
	return e, true
}

// allocatedBytes is the space a file takes: less than its size when sparse.
func allocatedBytes(info iofs.FileInfo) int64 {
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return info.Size()
}

// Entries is Inspect of the store's directory.
func (s *Store) Entries() ([]EntryInfo, error) { return Inspect(s.dir) }

// ReadMeta returns the records PutMeta stored in dir under names that
// begin with prefix (e.g. "image/"), keyed by name, reading them without
// taking the directory's lock.
func ReadMeta(dir, prefix string) (map[string][]byte, error) {
	root := filepath.Join(dir, "meta")
	out := make(map[string][]byte)
	err := filepath.WalkDir(root, func(p string, d iofs.DirEntry, err error) error {
		if err != nil {
			if p == root && errors.Is(err, iofs.ErrNotExist) {
				return iofs.SkipAll
			}
			return err
		}
		if d.IsDir() || strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		if !strings.HasPrefix(name, prefix) {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[name] = b
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cache: read meta of %s: %w", dir, err)
	}
	return out, nil
}

// Remove deletes what the store holds under kind and key, and returns the
// bytes of content it held. A key that a handle, or the background
// verification a whole blob gets, has open is not removed (ErrInUse); one
// the store does not hold is an error wrapping fs.ErrNotExist.
func (s *Store) Remove(kind Kind, key digest.Digest) (int64, error) {
	k := entryKey{kind: kindBlob, key: key}
	switch kind {
	case KindBlob:
	case KindStream:
		k.kind = kindStream
	default:
		return 0, fmt.Errorf("cache: remove %s: unknown kind %q", key, kind)
	}
	s.mu.Lock()
	e := s.entries[k]
	for s.waitBusyLocked(e) {
		e = s.entries[k]
	}
	switch {
	case s.closed:
		s.mu.Unlock()
		return 0, ErrClosed
	case e == nil:
		s.mu.Unlock()
		return 0, fmt.Errorf("cache: remove %s %s: %w", kind, key, iofs.ErrNotExist)
	case e.b != nil || e.st != nil:
		s.mu.Unlock()
		return 0, fmt.Errorf("%w: %s %s", ErrInUse, kind, key)
	}
	// As eviction does: busy while the files go, so nobody opens them.
	s.beginBusyLocked(e)
	n := e.bytes
	s.usage.Add(-n)
	s.mu.Unlock()
	s.removeFiles(k)
	s.mu.Lock()
	delete(s.entries, k)
	s.endBusyLocked(e)
	s.mu.Unlock()
	s.wg.Done()
	return n, nil
}
