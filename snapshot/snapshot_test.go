package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// fakeMounter stands in for lazy.Manager: a "mount" writes the layer's files
// into the mount point directory, an unmount removes them.
type fakeMounter struct {
	mu      sync.Mutex
	fail    error             // returned by Mount when set
	mounted map[string]string // mount point → "ref@digest"
	calls   []string          // "ref@digest" of every Mount
}

func newFakeMounter() *fakeMounter { return &fakeMounter{mounted: make(map[string]string)} }

func (f *fakeMounter) Mount(ctx context.Context, mountpoint, ref string, d digest.Digest) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, ref+"@"+d.String())
	if f.fail != nil {
		return f.fail
	}
	if err := os.WriteFile(filepath.Join(mountpoint, "weights.bin"), make([]byte, 1000), 0o644); err != nil {
		return err
	}
	if err := os.Mkdir(filepath.Join(mountpoint, "dir"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(mountpoint, "dir", "config.json"), []byte("{}"), 0o644); err != nil {
		return err
	}
	f.mounted[mountpoint] = ref + "@" + d.String()
	return nil
}

func (f *fakeMounter) Check(ctx context.Context, mountpoint string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounted[mountpoint]; !ok {
		return errors.New("not mounted")
	}
	return nil
}

func (f *fakeMounter) Unmount(ctx context.Context, mountpoint string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounted[mountpoint]; !ok {
		return errors.New("not mounted")
	}
	delete(f.mounted, mountpoint)
	entries, err := os.ReadDir(mountpoint)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(mountpoint, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeMounter) mountCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.mounted)
}

const (
	testRef      = "registry.example/models/llm:v1"
	testManifest = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	// testPinned is testRef pinned by the manifest digest containerd gave.
	testPinned = "registry.example/models/llm@" + testManifest
	testLayer  = digest.Digest("sha256:1111111111111111111111111111111111111111111111111111111111111111")
)

// remoteLabels are the labels containerd's unpacker sends for a layer
// when snapshot annotations are enabled.
func remoteLabels(target string) map[string]string {
	return map[string]string{
		LabelTargetSnapshot: target,
		LabelImageRef:       testRef,
		LabelLayerDigest:    testLayer.String(),
		"containerd.io/snapshot/cri.image-layers":    testLayer.String(),
		"containerd.io/snapshot/cri.manifest-digest": testManifest,
	}
}

func newTestSnapshotter(t *testing.T, root string, m LayerMounter) snapshots.Snapshotter {
	t.Helper()
	sn, err := New(context.Background(), root, m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return sn
}

func testContext() context.Context {
	return namespaces.WithNamespace(context.Background(), "test")
}

func TestRemotePrepareCommitsLazily(t *testing.T) {
	ctx := testContext()
	m := newFakeMounter()
	sn := newTestSnapshotter(t, t.TempDir(), m)
	t.Cleanup(func() { sn.Close() })

	const chainID = "sha256:chain1"
	_, err := sn.Prepare(ctx, "extract-1 "+chainID, "", snapshots.WithLabels(remoteLabels(chainID)))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v, want ErrAlreadyExists", err)
	}
	if got, want := m.calls, []string{testPinned + "@" + testLayer.String()}; len(got) != 1 || got[0] != want[0] {
		t.Fatalf("Mount calls = %v, want %v", got, want)
	}
	info, err := sn.Stat(ctx, chainID)
	if err != nil {
		t.Fatalf("Stat of the committed remote layer: %v", err)
	}
	if info.Kind != snapshots.KindCommitted {
		t.Errorf("kind = %v, want committed", info.Kind)
	}
	if info.Labels[LabelLayerDigest] != testLayer.String() {
		t.Errorf("committed labels = %v, want the layer digest kept for restore", info.Labels)
	}

	// Usage counts the layer's files, not zero.
	u, err := sn.Usage(ctx, chainID)
	if err != nil {
		t.Fatal(err)
	}
	if want := (snapshots.Usage{Size: 1002, Inodes: 4}); u != want {
		t.Errorf("Usage = %+v, want %+v", u, want)
	}

	// containerd removes the abandoned extraction key.
	if err := sn.Remove(ctx, "extract-1 "+chainID); err != nil && !errdefs.IsNotFound(err) {
		t.Fatalf("Remove of the extraction key: %v", err)
	}
	if n := m.mountCount(); n != 1 {
		t.Errorf("mounts after the extraction key was removed = %d, want the committed layer's 1", n)
	}
}

// cachingMounter is a fakeMounter whose layers hold cached bytes.
type cachingMounter struct {
	*fakeMounter
	cached atomic.Int64
}

func (c *cachingMounter) CachedBytes(ctx context.Context, mountpoint string) (int64, error) {
	if err := c.Check(ctx, mountpoint); err != nil {
		return 0, err
	}
	return c.cached.Load(), nil
}

// Usage of a lazy layer is what the cache holds for it, as it grows: the
// image file system's usage containerd reports to kubelet is the sum.
func TestUsageIsCachedBytes(t *testing.T) {
	ctx := testContext()
	m := &cachingMounter{fakeMounter: newFakeMounter()}
	sn := newTestSnapshotter(t, t.TempDir(), m)
	t.Cleanup(func() { sn.Close() })
	const chainID = "sha256:chain1"
	if _, err := sn.Prepare(ctx, "extract-1 "+chainID, "", snapshots.WithLabels(remoteLabels(chainID))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v, want ErrAlreadyExists", err)
	}
	for _, cached := range []int64{0, 512, 1 << 20} {
		m.cached.Store(cached)
		u, err := sn.Usage(ctx, chainID)
		if err != nil {
			t.Fatal(err)
		}
		if want := (snapshots.Usage{Size: cached, Inodes: 4}); u != want {
			t.Errorf("Usage = %+v, want %+v", u, want)
		}
	}
}

func TestRemotePrepareFallsBack(t *testing.T) {
	for _, tc := range []struct {
		name   string
		labels map[string]string
		fail   error
	}{
		{"mount fails", remoteLabels("sha256:chain1"), errors.New("layer cannot be served lazily")},
		{"no layer labels", map[string]string{LabelTargetSnapshot: "sha256:chain1"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext()
			m := newFakeMounter()
			m.fail = tc.fail
			sn := newTestSnapshotter(t, t.TempDir(), m)
			t.Cleanup(func() { sn.Close() })

			mounts, err := sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(tc.labels))
			if err != nil {
				t.Fatalf("Prepare = %v, want a normal snapshot to download into", err)
			}
			if len(mounts) != 1 || mounts[0].Type != "bind" {
				t.Fatalf("mounts = %+v, want one bind mount of an empty directory", mounts)
			}
			if err := sn.Commit(ctx, "sha256:chain1", "extract-1"); err != nil {
				t.Fatal(err)
			}
			info, err := sn.Stat(ctx, "sha256:chain1")
			if err != nil {
				t.Fatal(err)
			}
			if _, remote := info.Labels[labelRemote]; remote {
				t.Errorf("fallback snapshot is labelled remote: %v", info.Labels)
			}
		})
	}
}

// TestImageVolumePrepare follows what containerd's CRI plugin does for an
// image volume: Prepare(target, chainID) with no labels, then Remove.
func TestImageVolumePrepare(t *testing.T) {
	ctx := testContext()
	m := newFakeMounter()
	root := t.TempDir()
	sn := newTestSnapshotter(t, root, m)
	t.Cleanup(func() { sn.Close() })

	const chainID = "sha256:chain1"
	if _, err := sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(remoteLabels(chainID))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v", err)
	}
	target := "/var/lib/containerd/io.containerd.grpc.v1.cri/image-volumes/sandbox1/sha256:abc"
	mounts, err := sn.Prepare(ctx, target, chainID)
	if err != nil {
		t.Fatalf("image volume Prepare: %v", err)
	}
	if len(mounts) != 1 || mounts[0].Type != "overlay" {
		t.Fatalf("mounts = %+v, want one overlay", mounts)
	}
	var lower string
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			lower = v
		}
	}
	if _, err := os.Stat(filepath.Join(lower, "weights.bin")); err != nil {
		t.Errorf("lowerdir %q is not the lazy layer: %v", lower, err)
	}
	// Mounts gives the same again (containerd asks after a restart).
	again, err := sn.Mounts(ctx, target)
	if err != nil || len(again) != 1 || again[0].Type != "overlay" {
		t.Errorf("Mounts = %+v, %v", again, err)
	}

	if err := sn.Remove(ctx, target); err != nil {
		t.Fatalf("Remove of the image volume: %v", err)
	}
	if n := m.mountCount(); n != 1 {
		t.Errorf("lazy mounts after the volume was removed = %d, want 1 (the image stays)", n)
	}
	if err := sn.Remove(ctx, chainID); err != nil {
		t.Fatalf("Remove of the image's layer: %v", err)
	}
	if n := m.mountCount(); n != 0 {
		t.Errorf("lazy mounts after the layer was removed = %d, want 0", n)
	}
}

// TestRestore checks that reopening the root mounts the lazy layers again
// with the labels they were prepared with.
func TestRestore(t *testing.T) {
	ctx := testContext()
	root := t.TempDir()
	m := newFakeMounter()
	sn := newTestSnapshotter(t, root, m)
	const chainID = "sha256:chain1"
	if _, err := sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(remoteLabels(chainID))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v", err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if n := m.mountCount(); n != 0 {
		t.Fatalf("mounts after Close = %d, want 0", n)
	}

	m2 := newFakeMounter()
	sn2 := newTestSnapshotter(t, root, m2)
	t.Cleanup(func() { sn2.Close() })
	if got := m2.calls; len(got) != 1 || got[0] != testPinned+"@"+testLayer.String() {
		t.Fatalf("Mount calls at restore = %v", got)
	}
	if _, err := sn2.Prepare(ctx, "volume", chainID); err != nil {
		t.Fatalf("Prepare on a restored layer: %v", err)
	}
	u, err := sn2.Usage(ctx, chainID)
	if err != nil || u.Size != 1002 {
		t.Errorf("Usage after restore = %+v, %v", u, err)
	}
}

// TestRestoreFailureLeavesLayerUnavailable: a layer that cannot be
// mounted again does not stop the daemon; using it fails clearly.
func TestRestoreFailureLeavesLayerUnavailable(t *testing.T) {
	ctx := testContext()
	root := t.TempDir()
	sn := newTestSnapshotter(t, root, newFakeMounter())
	const chainID = "sha256:chain1"
	if _, err := sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(remoteLabels(chainID))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v", err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	m2 := newFakeMounter()
	m2.fail = errors.New("registry unreachable")
	sn2 := newTestSnapshotter(t, root, m2)
	t.Cleanup(func() { sn2.Close() })
	if _, err := sn2.Prepare(ctx, "volume", chainID); !errdefs.IsUnavailable(err) {
		t.Errorf("Prepare on an unrestored layer = %v, want ErrUnavailable", err)
	}
}

// TestKeepMounts: when the mounts outlived the previous snapshotter (it
// was killed, the FUSE manager kept running), the new one uses them
// without remounting.
func TestKeepMounts(t *testing.T) {
	ctx := testContext()
	root := t.TempDir()
	m := newFakeMounter()
	sn := newTestSnapshotter(t, root, m)
	t.Cleanup(func() { sn.Close() })
	const chainID = "sha256:chain1"
	if _, err := sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(remoteLabels(chainID))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v", err)
	}
	crashed, m2 := crashCopy(t, root, m)

	sn2, err := New(ctx, crashed, m2, Options{KeepMounts: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn2.Close() })
	if len(m2.calls) != 0 {
		t.Errorf("Mount calls with KeepMounts = %v, want none", m2.calls)
	}
	mounts, err := sn2.Prepare(ctx, "volume", chainID)
	if err != nil {
		t.Fatalf("Prepare on a kept layer: %v", err)
	}
	if len(mounts) != 1 || mounts[0].Type != "overlay" {
		t.Errorf("mounts = %+v", mounts)
	}
	if u, err := sn2.Usage(ctx, chainID); err != nil || u.Size != 1002 {
		t.Errorf("Usage of a kept layer = %+v, %v", u, err)
	}
}

// crashCopy is what a killed snapshotter on root leaves, its mounts served
// on by m's process: a copy of root (the metadata is locked while the
// snapshotter is open) and a mounter that serves m's mounts under it.
func crashCopy(t *testing.T, root string, m *fakeMounter) (string, *fakeMounter) {
	t.Helper()
	crashed := filepath.Join(t.TempDir(), "root")
	if err := os.CopyFS(crashed, os.DirFS(root)); err != nil {
		t.Fatal(err)
	}
	m2 := newFakeMounter()
	for mp, l := range m.mounted {
		m2.mounted[strings.Replace(mp, root, crashed, 1)] = l
	}
	return crashed, m2
}

// warmingMounter is a fakeMounter that records the warm-up hints it gets.
type warmingMounter struct {
	*fakeMounter
	warmed [][]digest.Digest
}

func (w *warmingMounter) Warm(_ context.Context, ref string, layers []digest.Digest) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.warmed = append(w.warmed, layers)
}

// A remote Prepare passes the image's other layers, from containerd's
// image-layers label, to a Warmer before mounting: without the layer
// itself, duplicates or entries that are not digests.
func TestRemotePrepareWarmsOtherLayers(t *testing.T) {
	ctx := testContext()
	m := &warmingMounter{fakeMounter: newFakeMounter()}
	sn := newTestSnapshotter(t, t.TempDir(), m)
	t.Cleanup(func() { sn.Close() })

	other := digest.FromString("other layer")
	labels := remoteLabels("sha256:chain1")
	labels[LabelImageLayers] = strings.Join([]string{testLayer.String(), other.String(), "not-a-digest", other.String()}, ",")
	if _, err := sn.Prepare(ctx, "extract-1 sha256:chain1", "", snapshots.WithLabels(labels)); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer = %v, want ErrAlreadyExists", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.warmed) != 1 || !slices.Equal(m.warmed[0], []digest.Digest{other}) {
		t.Fatalf("warm hints = %v, want one with %s", m.warmed, other)
	}
	if len(m.calls) != 1 {
		t.Fatalf("Mount calls = %v, want the layer's one", m.calls)
	}
}

// A layer is mounted as part of the manifest containerd pulled, whatever
// its tag names by now; without the manifest label, the reference as is.
func TestLayerOfPinsTheManifest(t *testing.T) {
	labels := remoteLabels("chain")
	if ref, d, err := layerOf(labels); err != nil || ref != testPinned || d != testLayer {
		t.Fatalf("layerOf = %q, %s, %v; want %q", ref, d, err, testPinned)
	}
	delete(labels, LabelManifestDigest)
	if ref, _, err := layerOf(labels); err != nil || ref != testRef {
		t.Fatalf("without the manifest label: %q, %v; want %q", ref, err, testRef)
	}
	labels[LabelManifestDigest] = "sha256:nothex"
	if _, _, err := layerOf(labels); err == nil {
		t.Fatal("a malformed manifest digest label was accepted")
	}
}

// viewCounter counts the Views opened on the snapshotter it wraps.
type viewCounter struct {
	snapshots.Snapshotter
	views atomic.Int32
}

func (v *viewCounter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	v.views.Add(1)
	return v.Snapshotter.View(ctx, key, parent, opts...)
}

// prepareTwoLayers commits two lazy layers, chain2 on chain1.
func prepareTwoLayers(t *testing.T, sn snapshots.Snapshotter) {
	t.Helper()
	ctx := testContext()
	if _, err := sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(remoteLabels("sha256:chain1"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of the first layer = %v", err)
	}
	if _, err := sn.Prepare(ctx, "extract-2", "sha256:chain1", snapshots.WithLabels(remoteLabels("sha256:chain2"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of the second layer = %v", err)
	}
}

// Usage of a layer mounted in this process opens no View: containerd's
// garbage collection lists a View's snapshot, and one removed under it
// ended a collection before it removed the layers of a deleted image.
// An upper layer (one with a parent) is counted too.
func TestUsageOpensNoView(t *testing.T) {
	ctx := testContext()
	m := newFakeMounter()
	sn := newTestSnapshotter(t, t.TempDir(), m)
	t.Cleanup(func() { sn.Close() })
	prepareTwoLayers(t, sn)
	vc := &viewCounter{Snapshotter: sn.(*snapshotter).Snapshotter}
	sn.(*snapshotter).Snapshotter = vc
	for _, name := range []string{"sha256:chain1", "sha256:chain2"} {
		u, err := sn.Usage(ctx, name)
		if err != nil {
			t.Fatalf("Usage of %s: %v", name, err)
		}
		if want := (snapshots.Usage{Size: 1002, Inodes: 4}); u != want {
			t.Errorf("Usage of %s = %+v, want %+v", name, u, want)
		}
	}
	if n := vc.views.Load(); n != 0 {
		t.Errorf("Usage opened %d Views, want none", n)
	}
}

// A layer whose mount was kept from a predecessor is found through a View,
// also with a parent (an overlay of lower directories).
func TestUsageOfKeptUpperLayer(t *testing.T) {
	ctx := testContext()
	root := t.TempDir()
	m := newFakeMounter()
	sn := newTestSnapshotter(t, root, m)
	prepareTwoLayers(t, sn)
	crashed, m2 := crashCopy(t, root, m)
	// A file only the upper layer has, to tell its directory apart.
	upper, ok := sn.(*snapshotter).mounted.Load("sha256:chain2")
	if !ok {
		t.Fatal("the upper layer's mount point is not recorded")
	}
	if err := os.WriteFile(filepath.Join(strings.Replace(upper.(string), root, crashed, 1), "upper"), make([]byte, 10), 0o644); err != nil {
		t.Fatal(err)
	}
	sn.Close()
	sn2, err := New(ctx, crashed, m2, Options{KeepMounts: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn2.Close() })
	u, err := sn2.Usage(ctx, "sha256:chain2")
	if err != nil {
		t.Fatal(err)
	}
	if want := (snapshots.Usage{Size: 1012, Inodes: 5}); u != want {
		t.Errorf("Usage = %+v, want %+v", u, want)
	}
	var left []string
	if err := sn2.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if strings.HasPrefix(info.Name, usageViewPrefix) {
			left = append(left, info.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("views left after Usage: %v", left)
	}
}

// containerd's garbage collection may remove a usage View that Usage
// removed meanwhile: that is no error, or the collection stops there.
func TestRemoveOfAGoneUsageView(t *testing.T) {
	ctx := testContext()
	sn := newTestSnapshotter(t, t.TempDir(), newFakeMounter())
	t.Cleanup(func() { sn.Close() })
	if err := sn.Remove(ctx, usageViewPrefix+"1-sha256:chain1"); err != nil {
		t.Errorf("Remove of a gone usage view = %v, want nil", err)
	}
	if err := sn.Remove(ctx, "sha256:chain1"); !errdefs.IsNotFound(err) {
		t.Errorf("Remove of a missing snapshot = %v, want not found", err)
	}
}
