package main

import (
	"context"
	"fmt"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
	"github.com/weightsnap/weightsnap/snapshot"
)

// The FUSE manager forwards warm-up hints and cache usage questions to the
// lazy layer Manager.
var (
	_ snapshot.Warmer        = (*lazy.Manager)(nil)
	_ snapshot.CacheReporter = (*lazy.Manager)(nil)
)

// newMounter opens the node cache in cacheDir and returns the lazy layer
// mounter over it, and what closes both (unmounting every layer). flush
// persists what the cache fetched so far, for a process that exits
// without closing them (handing its mounts over).
func newMounter(ctx context.Context, cacheDir string, cfg Config, ropts []remote.Option, extra ...lazy.Option) (m *lazy.Manager, closeAll, flush func() error, err error) {
	cc, fc := cfg.Cache, cfg.Fetch
	unverified, err := cfg.Verify.unverified()
	if err != nil {
		return nil, nil, nil, err
	}
	store, err := cache.Open(cacheDir, cc.MaxBytes.maxOption(), cc.MinFreeBytes.minFreeOption())
	if err != nil {
		return nil, nil, nil, fmt.Errorf("opening cache %s: %w", cacheDir, err)
	}
	opts := append([]lazy.Option{
		lazy.WithPrefetch(
			prefetch.WithWorkers(fc.Workers),
			prefetch.WithBackgroundWorkers(fc.BackgroundWorkers),
			prefetch.WithSpanSize(fc.SpanBytes),
			prefetch.WithBackgroundRate(fc.BackgroundBytesPerSecond),
		),
		lazy.WithMaxReadAhead(fc.MaxReadAheadBytes),
		lazy.WithBackgroundFill(fc.BackgroundFill),
		lazy.WithPassthrough(cc.Passthrough),
		lazy.WithUnverifiedLayers(unverified),
		lazy.WithMaxExpansion(cfg.Verify.MaxExpansion, cfg.Verify.MaxStreamBytes),
	}, extra...)
	m = lazy.New(store, remote.New(ropts...), opts...)
	closeAll = func() error {
		err := m.Close()
		if cerr := store.Close(); cerr != nil && err == nil {
			err = cerr
		}
		return err
	}
	return m, closeAll, store.Flush, nil
}
