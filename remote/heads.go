package remote

import (
	"context"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// headTTL is how long the size a Resolve's HEAD found stands in for the
// HEAD of an OpenBlob that follows it.
const headTTL = 30 * time.Second

// heads are the HEADs of layer blobs that Resolve starts while it fetches
// the config, for the OpenBlob of each layer that follows at once: a
// snapshotter mounting an image's first layer would otherwise ask for the
// manifest, then the config, then each blob's size, one round trip after
// the other. A result is taken once, by the first OpenBlob of the blob
// within headTTL; an OpenBlob that finds none, or a failed one, asks the
// registry itself.
type heads struct {
	mu sync.Mutex
	m  map[headKey]*headResult
}

// headKey is a blob in a repository, the scope of a registry's answer.
type headKey struct {
	repo string
	d    digest.Digest
}

type headResult struct {
	started time.Time
	done    chan struct{}
	size    int64 // once done, if err is nil
	err     error
}

// start asks for the size of b in the background, unless that is under
// way already, and drops results nobody took in time.
func (h *heads) start(ctx context.Context, b *Blob) {
	k := headKey{repo: b.src.repo.Name(), d: b.digest}
	now := time.Now()
	h.mu.Lock()
	if h.m == nil {
		h.m = make(map[headKey]*headResult)
	}
	for k, r := range h.m {
		if now.Sub(r.started) > headTTL {
			delete(h.m, k)
		}
	}
	if h.m[k] != nil {
		h.mu.Unlock()
		return
	}
	r := &headResult{started: now, done: make(chan struct{})}
	h.m[k] = r
	h.mu.Unlock()
	// Not ended by Resolve's return: the OpenBlob it is for comes after.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), headTTL)
	go func() {
		defer cancel()
		r.size, r.err = b.head(ctx)
		close(r.done)
	}()
}

// take returns the size of the blob d of repo that a HEAD started within
// headTTL found, waiting for it if it is under way; ok is false if there
// is none, or it failed.
func (h *heads) take(ctx context.Context, repo string, d digest.Digest) (size int64, ok bool, err error) {
	k := headKey{repo: repo, d: d}
	h.mu.Lock()
	r := h.m[k]
	delete(h.m, k)
	h.mu.Unlock()
	if r == nil || time.Since(r.started) > headTTL {
		return 0, false, nil
	}
	select {
	case <-r.done:
	case <-ctx.Done():
		return 0, false, ctx.Err()
	}
	return r.size, r.err == nil, nil
}
