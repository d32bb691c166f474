package snapshot

import (
	"context"
	"flag"
	"os"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
)

// TestConformance runs containerd's snapshotter conformance suite against
// the snapshotter. It mounts overlayfs, so it needs root.
func TestConformance(t *testing.T) {
	if os.Getuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("the conformance suite mounts overlayfs and needs root")
		}
		t.Skip("the conformance suite mounts overlayfs and needs root")
	}
	// The suite's root-only cases skip unless containerd's test flag is set.
	if err := flag.Set("test.root", "true"); err != nil {
		t.Fatal(err)
	}
	// The name selects the suite's expectations: ordinary snapshots are
	// overlayfs ones, which cannot rename a lower directory without
	// redirect_dir, as for containerd's own overlayfs snapshotter.
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := New(ctx, root, newFakeMounter(), Options{})
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}
