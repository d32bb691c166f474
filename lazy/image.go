package lazy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/remote"
)

// ImageMount is the merged, read-only tree of an image at a target
// directory: one lazy FUSE mount per layer, combined by overlayfs. It is
// what `weightsnap mount` shows without containerd; under containerd, the
// snapshotter mounts the layers and containerd the overlay.
type ImageMount struct {
	m       *Manager
	target  string
	layers  []string // layer mountpoints, base first
	overlay bool     // the merged view is mounted
}

// MountImage mounts the merged tree of image ref at target, with the layer
// mounts under workdir.
func (m *Manager) MountImage(ctx context.Context, ref, target, workdir string) (_ *ImageMount, err error) {
	img, err := m.reg.Resolve(ctx, ref, remote.WithLayerHeads(mayOpen))
	if err != nil {
		return nil, err
	}
	if len(img.Layers) == 0 {
		return nil, fmt.Errorf("image %s has no layers", ref)
	}
	im := &ImageMount{m: m, target: target}
	defer func() {
		if err != nil { // undo the layer mounts made so far
			im.Unmount()
		}
	}()
	// The record, and the image pinned by its digest, spare every mount a
	// resolve; the layers above the first are opened while it is mounted.
	m.record(img)
	pinned := pinnedRef(img)
	var above []digest.Digest
	for _, l := range img.Layers[1:] {
		above = append(above, l.Digest)
	}
	m.Warm(ctx, pinned, above)
	for i, l := range img.Layers {
		mp := filepath.Join(workdir, fmt.Sprintf("layer-%03d", i))
		if err := m.Mount(ctx, mp, pinned, l.Digest); err != nil {
			return nil, fmt.Errorf("mounting layer %d (%s): %w", i, l.Digest, err)
		}
		im.layers = append(im.layers, mp)
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	lowers := make([]string, len(im.layers))
	for i, p := range im.layers { // overlayfs wants the top-most first
		lowers[len(lowers)-1-i] = p
	}
	if err := fs.MountOverlay(lowers, target); err != nil {
		return nil, fmt.Errorf("mounting merged view at %s: %w", target, err)
	}
	im.overlay = true
	return im, nil
}

// Unmount removes the merged view and every layer mount under it.
func (im *ImageMount) Unmount() error {
	var errs []error
	if im.overlay {
		errs = append(errs, fs.UnmountOverlay(im.target))
		im.overlay = false
	}
	for i := len(im.layers) - 1; i >= 0; i-- {
		errs = append(errs, im.m.Unmount(context.Background(), im.layers[i]))
	}
	im.layers = nil
	return errors.Join(errs...)
}
