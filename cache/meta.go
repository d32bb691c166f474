package cache

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

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
