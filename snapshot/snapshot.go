// Package snapshot is weightsnap's containerd snapshotter: layers whose
// Prepare carries containerd's remote-snapshot labels are mounted lazily
// through a LayerMounter and committed at once (containerd then skips the
// blob); every other snapshot is an ordinary overlayfs snapshot, so the
// snapshotter can be a node's only one.
//
// The remote-snapshot protocol, the overlay snapshots and the restore of
// lazy mounts after a restart are stargz-snapshotter's snapshot package,
// which has run in production for years; this package adapts weightsnap's
// layer mounts to it and fixes what it leaves out (Usage of lazy layers:
// the bytes the node cache holds for them).
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	stargz "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"

	wsfs "github.com/weightsnap/weightsnap/fs"
)

// Labels containerd puts on a layer's Prepare when snapshot annotations are
// enabled (CRI with disable_snapshot_annotations = false, or the transfer
// service with the snapshotter's enable_remote_snapshot_annotations export).
const (
	// LabelTargetSnapshot names the committed snapshot a Prepare wants;
	// its presence marks a Prepare that may be answered remotely.
	LabelTargetSnapshot = "containerd.io/snapshot.ref"
	// LabelImageRef is the image reference the layer belongs to.
	LabelImageRef = snapshotters.TargetRefLabel
	// LabelLayerDigest is the digest of the layer blob.
	LabelLayerDigest = snapshotters.TargetLayerDigestLabel
	// LabelImageLayers lists (comma-separated) layer digests of the image,
	// for snapshotters that prepare layers in parallel.
	LabelImageLayers = snapshotters.TargetImageLayersLabel
	// LabelManifestDigest is the digest of the image manifest the layer
	// belongs to.
	LabelManifestDigest = snapshotters.TargetManifestDigestLabel

	// labelRemote is set by stargz-snapshotter's snapshot package on the
	// snapshots it committed remotely.
	labelRemote = "containerd.io/snapshot/remote"
)

// ErrNoLayerLabels is returned (and the layer downloaded normally) when a
// remote Prepare lacks the image reference or layer digest label.
var ErrNoLayerLabels = errors.New("prepare has no image-ref or layer-digest label")

// LayerMounter mounts image layers lazily. *lazy.Manager implements it; the
// snapshotter depends only on this so it can be tested without FUSE.
type LayerMounter interface {
	// Mount mounts layer d of image imageRef read-only at
	// mountpoint. An error means the layer is downloaded instead.
	Mount(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error
	// Check reports whether the mount at mountpoint still serves reads.
	Check(ctx context.Context, mountpoint string) error
	// Unmount unmounts mountpoint and releases what the mount held.
	Unmount(ctx context.Context, mountpoint string) error
}

// Warmer is optionally implemented by a LayerMounter that can open an
// image's other layers ahead of their Prepares, which containerd makes one
// after another; it must not block.
type Warmer interface {
	// ctx carries the Prepare's values (its containerd namespace); the
	// work outlives it.
	Warm(ctx context.Context, imageRef string, layers []digest.Digest)
}

// CacheReporter is optionally implemented by a LayerMounter whose layers
// take disk space as they are read: Usage then reports that space rather
// than the size of the layer's files.
type CacheReporter interface {
	// CachedBytes returns the bytes the node cache holds for the layer
	// mounted at mountpoint.
	CachedBytes(ctx context.Context, mountpoint string) (int64, error)
}

// Options configure New.
type Options struct {
	// KeepMounts says the LayerMounter's mounts outlived the previous
	// snapshotter on this root (they are served by a process that kept
	// running) and are in use: New keeps them as they are. Otherwise New
	// unmounts whatever is left under root and mounts every lazy layer
	// again.
	KeepMounts bool
}

// New returns the snapshotter whose state lives under root (metadata.db
// and snapshots/<id>/{fs,work}, as containerd's overlay snapshotter), with
// lazy layers mounted by m. Lazy layers recorded under root are remounted
// before New returns; one that cannot be remounted is logged and left
// unavailable rather than failing the daemon.
func New(ctx context.Context, root string, m LayerMounter, opts Options) (snapshots.Snapshotter, error) {
	sopts := []stargz.Opt{stargz.AllowInvalidMountsOnRestart}
	if opts.KeepMounts {
		sopts = append(sopts, stargz.NoRestore)
	}
	lfs := &layerFS{m: m}
	sn, err := stargz.NewSnapshotter(ctx, root, lfs, sopts...)
	if err != nil {
		return nil, fmt.Errorf("opening snapshotter at %s: %w", root, err)
	}
	cr, _ := m.(CacheReporter)
	return &snapshotter{Snapshotter: sn, cache: cr, mounted: &lfs.mounted}, nil
}

// layerFS adapts a LayerMounter to stargz-snapshotter's FileSystem, which
// passes the Prepare's labels.
type layerFS struct {
	m LayerMounter
	// mounted maps the name of each committed layer mounted in this
	// process (the Prepare's target snapshot) to its mount point.
	mounted sync.Map
}

// record notes that the layer named by labels' target snapshot is
// mounted at mountpoint.
func (l *layerFS) record(mountpoint string, labels map[string]string) {
	if name := labels[LabelTargetSnapshot]; name != "" {
		l.mounted.Store(name, mountpoint)
	}
}

func (l *layerFS) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	ref, d, err := layerOf(labels)
	if err != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{"image": ref, "layer": d, "mountpoint": mountpoint}).Info("mounting layer lazily")
	if w, ok := l.m.(Warmer); ok {
		if others := otherLayers(labels[LabelImageLayers], d); len(others) > 0 {
			w.Warm(ctx, ref, others)
		}
	}
	if err := l.m.Mount(ctx, mountpoint, ref, d); err != nil {
		return fmt.Errorf("lazy mount of layer %s of %s: %w", d, ref, err)
	}
	l.record(mountpoint, labels)
	return nil
}

// Check reports whether the layer at mountpoint is served. One its mounter
// does not serve (its FUSE server died before its connection was handed
// to the holder: see deploy/README.md, "Known gaps") is mounted again from
// the labels it was prepared with, so that new containers of its image do
// not find it unavailable; containers already using it keep the dead one.
func (l *layerFS) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	err := l.m.Check(ctx, mountpoint)
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	ref, d, lerr := layerOf(labels)
	if lerr != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{"image": ref, "layer": d, "mountpoint": mountpoint}).Warn("mounting again a layer no server serves")
	if cerr := wsfs.CleanupMount(mountpoint); cerr != nil {
		return fmt.Errorf("remounting layer %s of %s: %w", d, ref, cerr)
	}
	if merr := l.m.Mount(ctx, mountpoint, ref, d); merr != nil {
		return fmt.Errorf("remounting layer %s of %s: %w", d, ref, merr)
	}
	l.record(mountpoint, labels)
	return nil
}

func (l *layerFS) Unmount(ctx context.Context, mountpoint string) error {
	l.mounted.Range(func(name, mp any) bool {
		if mp == mountpoint {
			l.mounted.CompareAndDelete(name, mp)
		}
		return true
	})
	return l.m.Unmount(ctx, mountpoint)
}

// otherLayers parses the image-layers label, leaving out self and what is
// not a digest (the label is a hint: a wrong entry only costs a warm-up).
func otherLayers(label string, self digest.Digest) []digest.Digest {
	var ds []digest.Digest
	for _, f := range strings.Split(label, ",") {
		d, err := digest.Parse(strings.TrimSpace(f))
		if err == nil && d != self && !slices.Contains(ds, d) {
			ds = append(ds, d)
		}
	}
	return ds
}

// layerOf returns the image reference and layer digest of a Prepare's
// labels. The reference is pinned by the manifest digest when containerd
// gives it: the layer is then described by exactly the manifest containerd
// pulled, whatever its tag names by now.
func layerOf(labels map[string]string) (string, digest.Digest, error) {
	ref, d := labels[LabelImageRef], labels[LabelLayerDigest]
	if ref == "" || d == "" {
		return "", "", ErrNoLayerLabels
	}
	dg, err := digest.Parse(d)
	if err != nil {
		return "", "", fmt.Errorf("label %s: %w", LabelLayerDigest, err)
	}
	md := labels[LabelManifestDigest]
	if md == "" {
		return ref, dg, nil
	}
	if _, err := digest.Parse(md); err != nil {
		return "", "", fmt.Errorf("label %s: %w", LabelManifestDigest, err)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", "", fmt.Errorf("label %s: %w", LabelImageRef, err)
	}
	return r.Context().Name() + "@" + md, dg, nil
}

// snapshotter is stargz-snapshotter's snapshotter with a Usage that counts
// lazy layers: stargz records them as empty so that committing does not
// walk (and so wait for the index of) the layer.
type snapshotter struct {
	snapshots.Snapshotter
	cache CacheReporter // nil if the LayerMounter is not one

	// usage memoizes what never changes of a lazy layer, by name and
	// creation time (a name can be reused after Remove): a lazyLayer.
	usage sync.Map
	// mounted is the layerFS's map of layer names to mount points.
	mounted *sync.Map
}

type usageKey struct {
	name    string
	created int64
}

// lazyLayer is what Usage knows of a committed lazy layer.
type lazyLayer struct {
	files      snapshots.Usage // its files' sizes and inodes
	mountpoint string
}

// Usage returns the resources taken by the snapshot key. For a lazy layer
// that is the disk space the node cache holds for it, which grows as it is
// read and filled (containerd sums Usage into the image file system's
// used bytes, which kubelet's image GC and eviction act on), and the
// inode count of its files. Without a CacheReporter, or if it fails, the
// size is that of the layer's files, what a download would take. The
// files are walked once, from the mount's metadata, without reading any
// file content.
func (s *snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	u, err := s.Snapshotter.Usage(ctx, key)
	if err != nil {
		return u, err
	}
	info, err := s.Snapshotter.Stat(ctx, key)
	if err != nil {
		return u, err
	}
	if _, remote := info.Labels[labelRemote]; !remote || info.Kind != snapshots.KindCommitted {
		return u, nil
	}
	k := usageKey{info.Name, info.Created.UnixNano()}
	var l lazyLayer
	if v, ok := s.usage.Load(k); ok {
		l = v.(lazyLayer)
	} else {
		if l, err = s.lazyLayer(ctx, info.Name); err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of lazy layer %s: %w", key, err)
		}
		s.usage.Store(k, l)
	}
	u = l.files
	if s.cache != nil {
		n, err := s.cache.CachedBytes(ctx, l.mountpoint)
		if err != nil {
			log.G(ctx).WithError(err).WithField("key", key).Debug("cache usage of a lazy layer unknown: giving its files' size")
			return u, nil
		}
		u.Size = n
	}
	return u, nil
}

// Remove removes the snapshot key and forgets what Usage knew of it. The
// unmount of a lazy layer's last snapshot tells the LayerMounter that the
// layer is no longer wanted (lazy.Manager.Unmount).
func (s *snapshotter) Remove(ctx context.Context, key string) error {
	if err := s.Snapshotter.Remove(ctx, key); err != nil {
		if strings.HasPrefix(key, usageViewPrefix) && errdefs.IsNotFound(err) {
			// Usage's own view, which it removed after containerd's
			// garbage collection listed it: failing here would end that
			// collection before it removes the layers it was after.
			return nil
		}
		return err
	}
	s.usage.Range(func(k, _ any) bool {
		if k.(usageKey).name == key {
			s.usage.Delete(k)
		}
		return true
	})
	return nil
}

// usageViewPrefix begins the keys of the views lazyLayer opens.
const usageViewPrefix = "weightsnap-usage-"

// lazyLayer walks the mount of the committed lazy layer name.
func (s *snapshotter) lazyLayer(ctx context.Context, name string) (lazyLayer, error) {
	if mp, ok := s.mounted.Load(name); ok {
		u, err := treeUsage(ctx, mp.(string))
		return lazyLayer{files: u, mountpoint: mp.(string)}, err
	}
	mp, done, err := s.viewMountpoint(ctx, name)
	if err != nil {
		return lazyLayer{}, err
	}
	defer done()
	u, err := treeUsage(ctx, mp)
	return lazyLayer{files: u, mountpoint: mp}, err
}

// viewMountpoint finds the mount point of a layer this process did not
// mount (its mounts were kept from a predecessor) through a View: stargz
// keeps a snapshot's directory to itself, but a View of a committed layer
// is a bind mount of exactly that directory, or, if the layer has
// parents, an overlay whose first lower directory it is. done removes the
// view. A View is a snapshot containerd's garbage collection can list
// (see Remove), so it is the exception, not the rule.
func (s *snapshotter) viewMountpoint(ctx context.Context, name string) (mp string, done func(), err error) {
	viewKey := fmt.Sprintf("%s%d-%s", usageViewPrefix, time.Now().UnixNano(), name)
	mounts, err := s.Snapshotter.View(ctx, viewKey, name)
	if err != nil {
		return "", nil, err
	}
	done = func() {
		if err := s.Snapshotter.Remove(ctx, viewKey); err != nil && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).WithField("key", viewKey).Warn("removing usage view")
		}
	}
	if mp = viewLayerDir(mounts); mp == "" {
		done()
		return "", nil, fmt.Errorf("unexpected view mounts %+v", mounts)
	}
	return mp, done, nil
}

// viewLayerDir returns the directory of the top layer of a View's mounts,
// "" if they are not a bind mount or an overlay of lower directories.
func viewLayerDir(mounts []mount.Mount) string {
	if len(mounts) != 1 {
		return ""
	}
	switch m := mounts[0]; m.Type {
	case "bind":
		return m.Source
	case "overlay":
		for _, o := range m.Options {
			if lower, ok := strings.CutPrefix(o, "lowerdir="); ok {
				dir, _, _ := strings.Cut(lower, ":")
				return dir
			}
		}
	}
	return ""
}

// treeUsage sums the sizes and counts the inodes of the tree at root,
// counting hard links once.
func treeUsage(ctx context.Context, root string) (snapshots.Usage, error) {
	var u snapshots.Usage
	seen := make(map[uint64]struct{})
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if _, dup := seen[st.Ino]; dup {
				return nil
			}
			seen[st.Ino] = struct{}{}
		}
		u.Inodes++
		if fi.Mode().IsRegular() {
			u.Size += fi.Size()
		}
		return nil
	})
	return u, err
}
