package lazy

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
)

// fillWhenUsed runs the background fill of sl once it is mounted, at its
// first read or fillDelay after the mount, whichever comes first.
func (m *Manager) fillWhenUsed(ctx context.Context, sl *sharedLayer) {
	defer close(sl.filled)
	select { // a layer opened by Warm may never be mounted
	case <-sl.mounted:
	case <-ctx.Done():
		return
	}
	t := time.NewTimer(fillDelay)
	defer t.Stop()
	select {
	case <-sl.used:
	case <-t.C:
	case <-ctx.Done():
		return
	}
	if c := sl.l.Confirm; c != nil {
		c.Start() // a claimed index not confirmed yet, as no read needed it
	}
	select { // its order is the index's files
	case <-sl.ready:
	case <-ctx.Done():
		return
	}
	m.fill(ctx, sl)
}

// fill fetches the whole blob of sl into the cache, metadata files and
// safetensors headers first, yielding to read-ahead, then verifies it.
func (m *Manager) fill(ctx context.Context, sl *sharedLayer) {
	var files []prefetch.File
	if sl.l.Ranges != nil {
		for _, f := range sl.l.Ranges.Files() {
			files = append(files, prefetch.File{Name: f.Name, Range: prefetch.Range{Off: f.Off, Len: f.Len}})
		}
	}
	label := sl.desc.Digest.String()
	metrics.LayerSizeBytes.WithLabelValues(label).Set(float64(sl.blob.Size()))
	progress := func(int64) { metrics.LayerFetchedBytes.WithLabelValues(label).Set(float64(sl.blob.CachedBytes())) }
	ctx = remote.WithReason(ctx, "background")
	err := m.sched.Fill(ctx, sl.blob, prefetch.ModelOrder(files, sl.blob.Size()), progress)
	if ctx.Err() != nil {
		return // the layer is being closed
	}
	progress(0)
	if err != nil {
		slog.Warn("background fill stopped", "layer", label, "err", err)
		return
	}
	// Hashing the whole blob may still be running; after a restart, the
	// blob is known whole but its chunks are checked (read back against
	// their checksums) before files are passed through.
	err = sl.blob.Verify(ctx)
	if err == nil {
		err = sl.blob.Check(ctx, 0, sl.blob.Size())
	}
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		if sl.trust.lazy() && errors.Is(err, cache.ErrDigestMismatch) {
			m.failLayer(sl, err)
			return
		}
		slog.Warn("layer not verified", "layer", label, "err", err)
		return
	}
	// From here the layer's large files are passed through: what the
	// kernel cached of them through the daemon is of no more use, and
	// dropping it now spares the next open of each file doing so. Before
	// the layer is reported verified, so that a reader waiting for that
	// does not share the cost.
	if m.opt.passthrough {
		t0 := time.Now()
		for _, mnt := range m.mountsOf(sl) {
			mnt.DropPassthroughPages()
		}
		slog.Debug("dropped pages of passed-through files", "layer", label, "took", time.Since(t0))
	}
	metrics.LayerVerified.WithLabelValues(label).Set(1)
}
