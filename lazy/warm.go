package lazy

import (
	"context"
	"log/slog"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/weightsnap/weightsnap/layer"
)

// Warm opens the layers of imageRef that are not open yet, in the
// background and several at once, so that the mounts containerd asks for
// one after another find them indexed. Layers that would be streamed
// whole (plain gzip or zstd) are left alone: opening one starts its
// download. A layer nobody mounts within the warm hold (WithWarmHold) is
// closed again; its background fill waits for a mount.
//
// The work outlives ctx; it keeps ctx's values (the containerd namespace
// WithLocalContent reads in).
func (m *Manager) Warm(ctx context.Context, imageRef string, layers []digest.Digest) {
	open := m.OpenLayers()
	var todo []digest.Digest
	for _, d := range layers {
		if !slices.Contains(open, d) && !slices.Contains(todo, d) {
			todo = append(todo, d)
		}
	}
	if len(todo) == 0 {
		return
	}
	ctx, done, err := m.begin(context.WithoutCancel(ctx))
	if err != nil {
		return
	}
	slog.Debug("warming layers", "image", imageRef, "layers", len(todo))
	go func() {
		defer done()
		// One resolve of a tag for all the layers.
		ki, err := m.knownImage(ctx, imageRef)
		if err != nil {
			slog.Debug("warming layers", "image", imageRef, "err", err)
			return
		}
		var g errgroup.Group
		g.SetLimit(maxWarming)
		for _, d := range todo {
			dl, err := ki.describe(d)
			if err != nil {
				slog.Debug("warming layer", "layer", d, "image", imageRef, "err", err)
				continue
			}
			if !layer.MayBeRandomAccess(dl.desc) {
				continue
			}
			g.Go(func() error {
				m.warmLayer(ctx, dl)
				return nil
			})
			if ctx.Err() != nil {
				break
			}
		}
		g.Wait()
	}()
}

// warmLayer opens layer d and holds it open for the warm hold, or until
// its first mount, which holds it from then on: so that the layer closes,
// and its fill stops, when its last mount goes. It returns once the layer
// is open, giving its place among the layers opening at once to the next.
func (m *Manager) warmLayer(ctx context.Context, dl described) {
	ref, err := m.acquire(ctx, dl)
	if err != nil {
		slog.Debug("warming layer", "layer", dl.desc.Digest, "image", dl.image, "err", err)
		return
	}
	hold, done, err := m.begin(context.Background())
	if err != nil {
		ref.Release()
		return
	}
	go func() {
		defer done()
		defer ref.Release()
		t := time.NewTimer(m.opt.warmHold)
		defer t.Stop()
		select {
		case <-ref.Value().mounted:
		case <-t.C:
		case <-hold.Done(): // Close
		}
	}()
	if m.warmed != nil {
		m.warmed(dl.desc.Digest)
	}
}
