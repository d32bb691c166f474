package main

import (
	"context"
	"fmt"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/fs/remote"
	"github.com/weightsnap/weightsnap/snapshot"
)

// newMounter opens the node cache in cacheDir and returns the lazy layer
// mounter over it, and what closes both.
func newMounter(ctx context.Context, cacheDir string, cc CacheConfig, ropts []remote.Option) (snapshot.LayerMounter, func() error, error) {
	store, err := cache.Open(cacheDir, cache.Options{MaxBytes: cc.MaxBytes})
	if err != nil {
		return nil, nil, fmt.Errorf("opening cache %s: %w", cacheDir, err)
	}
	m := fs.NewManager(store, ropts...)
	return m, func() error {
		err := m.Close()
		if cerr := store.Close(); cerr != nil && err == nil {
			err = cerr
		}
		return err
	}, nil
}
