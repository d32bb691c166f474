package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/cache"
)

const oneMiB = 1 << 20

// TestRemoveImageEvictsItsLayersFirst removes a model image through the
// CRI image service (what `crictl rmi` and kubelet's image GC call) while
// its layer's background fill is in flight, and checks from the outside
// what the node does with it: containerd's snapshots and weightsnap's
// mount of the layer go, the fill's registry request is abandoned and no
// byte of the layer is fetched after, and when another model needs room
// the removed layer's bytes are the ones evicted: not those of an image
// still present, nor older data no snapshot uses (least recently used,
// but not removed by containerd). Usage of a lazy layer's snapshot is what
// the cache holds for it.
func TestRemoveImageEvictsItsLayersFirst(t *testing.T) {
	// Sizes in MiB. The bound fits the stray data, B, the tools layer
	// and C (with a margin), and also A as far as its fill gets while
	// part of it is held, but not all of them: C's fill has to evict
	// between 16 (A's extra file, which its pod reads) and 32 MiB (all
	// of A but the held range) of A's.
	const (
		strayBytes = 8 * oneMiB
		aExtra     = 16 * oneMiB // read by A's pod
		aModel     = 32 * oneMiB // its bytes [8, 24) MiB are held
		bSize      = 8 * oneMiB  // pushModel: +bSize/4 extra
		cSize      = 32 * oneMiB // pushModel: +cSize/4 extra
		margin     = 8 * oneMiB
	)
	var (
		cacheDir string
		stray    digest.Digest
	)
	s := newStackWithConfig(t, nil, func(dir, _ string) string {
		// weightsnapd's root is <dir>/wsd/state and its cache <root>/cache.
		cacheDir = filepath.Join(dir, "wsd", "state", "cache")
		stray = writeStrayBlob(t, cacheDir, strayBytes)
		tool, err := os.Stat(toolBinary(t))
		if err != nil {
			t.Fatal(err)
		}
		tools := tool.Size() + 64<<10 // its tar layer: the binary and headers
		bound := strayBytes + (bSize + bSize/4) + tools + (cSize + cSize/4) + margin
		return fmt.Sprintf("[cache]\nmax_bytes = %d\nmin_free_bytes = 0\n", bound)
	})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	rt, is := s.ctd.cri(t)

	// A: a small file read first, then a large one whose middle the
	// registry holds back, so that A's background fill is provably in
	// flight (waiting on the registry) when A is removed.
	aLayer := tarLayer(t, map[string][]byte{
		extraPath: randomBytes(aExtra, 201),
		modelPath: randomBytes(aModel, 202),
	}, nil)
	aImg := pushImage(t, s.origin.Addr, "model-a:v1", []string{"/tool", "sleep"}, aLayer)
	a := aImg.Layers[0].Digest.String()
	aExtraSum := sha256Hex(randomBytes(aExtra, 201))
	// In the blob: the models/ directory's header, extra.bin's header and
	// bytes, model.bin's header, then its bytes.
	modelOff := int64(3*512 + aExtra)
	release := s.origin.Hold(a, modelOff+8*oneMiB, modelOff+24*oneMiB)
	t.Cleanup(release)
	b := s.pushModel(t, s.origin.Addr, "model-b:v1", bSize, 203)
	c := s.pushModel(t, s.origin.Addr, "model-c:v1", cSize, 204)

	pullImage(t, ctx, is, s.tools.Ref)

	// B: pulled, read whole in a pod, filled and verified, the pod gone.
	pullImage(t, ctx, is, b.Ref)
	pb := s.runPod(t, ctx, rt, "team-b", "infer", b.Ref)
	if got := sumInPod(t, ctx, rt, pb); got != b.sum {
		t.Fatalf("pod of B read sha256 %s, want %s", got, b.sum)
	}
	if err := s.ws.waitVerified(ctx, []string{b.weight}); err != nil {
		t.Fatal(err)
	}
	removePod(t, rt, pb)

	// A: pulled and its small file read in a pod (after B's, so B is the
	// less recently used of the two); its fill reaches the held range.
	pullImage(t, ctx, is, aImg.Ref)
	pa := s.runPod(t, ctx, rt, "team-a", "infer", aImg.Ref)
	if got := sumFileInPod(t, ctx, rt, pa, extraPath); got != aExtraSum {
		t.Fatalf("pod of A read sha256 %s of %s, want %s", got, extraPath, aExtraSum)
	}
	removePod(t, rt, pa)
	lazyWaitFor(t, "A's background fill to reach the range the registry holds", func() bool { return s.origin.Held(a) > 0 })
	if n := len(layerMounts(t, a)); n != 1 {
		t.Fatalf("A's layer has %d weightsnap mounts after its pull, want 1", n)
	}

	// Usage of a lazy layer's snapshot is what the cache holds for it:
	// all of B's blob, part of A's (less than its files' size, which is
	// what a snapshotter that walked the files would report).
	if got := s.snapshotUsage(t, ctx, b.weight); got != b.size {
		t.Errorf("Usage of B's snapshot = %d bytes, want %d, its blob, all cached", got, b.size)
	}
	if got := s.snapshotUsage(t, ctx, a); got < aExtra || got >= aExtra+aModel {
		t.Errorf("Usage of A's snapshot = %d bytes, want what the cache holds: at least %d (the file its pod read), less than %d (its files)", got, aExtra, aExtra+aModel)
	}
	aMetric := fmt.Sprintf("weightsnap_layer_size_bytes{layer=%q}", a)
	if !s.hasMetric(t, ctx, aMetric) {
		t.Fatalf("weightsnapd exports no %s while A's layer is open", aMetric)
	}
	evictedBefore := s.metricValue(t, ctx, "weightsnap_cache_evicted_bytes_total")

	if _, err := is.RemoveImage(ctx, &criapi.RemoveImageRequest{Image: &criapi.ImageSpec{Image: aImg.Ref}}); err != nil {
		t.Fatalf("CRI RemoveImage %s: %v", aImg.Ref, err)
	}
	lazyWaitFor(t, "containerd to remove A's snapshots", func() bool { return !s.hasSnapshot(t, ctx, a) })
	lazyWaitFor(t, "weightsnap to unmount A's layer", func() bool { return len(layerMounts(t, a)) == 0 })
	// The layer closes, which is after its fill returned (its metrics go
	// with it), and the fill's request, still waiting for the held bytes
	// (nothing released them), has been given up. (Held alone could drop
	// to 0 between a stalled request and its retry.)
	lazyWaitFor(t, "A's layer to close", func() bool { return !s.hasMetric(t, ctx, aMetric) })
	lazyWaitFor(t, "A's closed layer's registry request to end", func() bool { return s.origin.Held(a) == 0 })
	fetched := s.origin.BlobBytes(a)
	release()
	if !s.hasSnapshot(t, ctx, b.weight) || len(layerMounts(t, b.weight)) != 1 {
		t.Errorf("B's snapshot or mount went with A's removal")
	}

	// C needs room: a pod reads it whole and its fill completes. A fill
	// of A still going would have fetched A's held bytes meanwhile.
	pullImage(t, ctx, is, c.Ref)
	pc := s.runPod(t, ctx, rt, "team-c", "infer", c.Ref)
	if got := sumInPod(t, ctx, rt, pc); got != c.sum {
		t.Fatalf("pod of C read sha256 %s, want %s", got, c.sum)
	}
	if err := s.ws.waitVerified(ctx, []string{c.weight}); err != nil {
		t.Fatal(err)
	}
	if got, held := s.origin.BlobBytes(a), s.origin.Held(a); got != fetched || held != 0 {
		t.Errorf("after A's removal the registry served %d more bytes of A's layer (%d before, %d now), and %d requests for it wait", got-fetched, fetched, got, held)
	}

	list := cacheList(t, cacheDir)
	t.Logf("weightsnap cache list after C was read:\n%s", list)
	if cacheHas(list, a) {
		t.Errorf("A's layer %s is still in the cache after C needed room", a)
	}
	if !cacheHas(list, stray.String()) {
		t.Errorf("the older data no snapshot uses (%s) was evicted before A's, which containerd removed", stray)
	}
	for _, l := range []struct{ name, key string }{{"B", b.weight}, {"C", c.weight}} {
		if !cacheHasWhole(list, l.key) {
			t.Errorf("%s's layer %s is not in the cache whole and verified", l.name, l.key)
		}
	}
	if evicted := s.metricValue(t, ctx, "weightsnap_cache_evicted_bytes_total") - evictedBefore; evicted < aExtra {
		t.Errorf("weightsnap_cache_evicted_bytes_total grew by %.0f, want at least %d (A's bytes)", evicted, aExtra)
	}
	if got := s.snapshotUsage(t, ctx, b.weight); got != b.size {
		t.Errorf("Usage of B's snapshot after the eviction = %d bytes, want %d", got, b.size)
	}
	removePod(t, rt, pc)
}

// writeStrayBlob puts n bytes, complete, into the cache at dir under their
// digest, which no image names: what a layer whose snapshots went while
// no weightsnap held it leaves.
func writeStrayBlob(t *testing.T, dir string, n int) digest.Digest {
	t.Helper()
	data := randomBytes(n, 200)
	key := digest.FromBytes(data)
	st, err := cache.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	h, err := st.Blob(key, int64(n), func(_ context.Context, p []byte, off int64) error {
		copy(p, data[off:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.Fetch(t.Context(), 0, int64(n)); err != nil {
		t.Fatal(err)
	}
	return key
}

// layerMounts returns weightsnap's FUSE mounts of layer d.
func layerMounts(t testing.TB, d string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var mps []string
	for line := range strings.SplitSeq(string(b), "\n") {
		_, after, ok := strings.Cut(line, " - ")
		f := strings.Fields(after)
		if ok && len(f) >= 2 && f[1] == "weightsnap:"+d {
			mps = append(mps, unescapeMountinfo(strings.Fields(line)[4]))
		}
	}
	return mps
}

// hasSnapshot reports whether containerd's CRI namespace has a weightsnap
// snapshot of the single-layer image whose layer is d (its chain ID is
// the layer's diff ID, d itself for an uncompressed layer), or one on it.
func (s *stack) hasSnapshot(t *testing.T, ctx context.Context, d string) bool {
	t.Helper()
	out, err := s.ctd.ctr(t, ctx, "--namespace", criNamespace, "snapshots", "--snapshotter", "weightsnap", "ls")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(out, d)
}

// snapshotUsage returns the size containerd's Usage gives for the
// committed snapshot of the single-layer image whose layer is d.
func (s *stack) snapshotUsage(t *testing.T, ctx context.Context, d string) int64 {
	t.Helper()
	out, err := s.ctd.ctr(t, ctx, "--namespace", criNamespace, "snapshots", "--snapshotter", "weightsnap", "usage", "-b", d)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == d {
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatalf("ctr snapshots usage: %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("ctr snapshots usage %s printed no usage for it:\n%s", d, out)
	return 0
}

// metricValue returns the value of series from weightsnapd's /metrics.
func (s *stack) metricValue(t *testing.T, ctx context.Context, series string) float64 {
	t.Helper()
	v, err := s.ws.metric(ctx, series)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// hasMetric reports whether weightsnapd's /metrics has a sample of series.
func (s *stack) hasMetric(t *testing.T, ctx context.Context, series string) bool {
	t.Helper()
	body, err := httpGet(ctx, "http://"+s.ws.metrics+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(body, "\n"+series+" ")
}

// cacheList returns the output of `weightsnap cache list` for dir.
func cacheList(t *testing.T, dir string) string {
	t.Helper()
	out, err := exec.Command(weightsnapBinary(t), "cache", "--cache-dir", dir, "list").CombinedOutput()
	if err != nil {
		t.Fatalf("weightsnap cache list: %v\n%s", err, out)
	}
	return string(out)
}

// cacheHas reports whether the cache list has an entry keyed key.
func cacheHas(list, key string) bool { return cacheLine(list, key) != "" }

// cacheHasWhole reports whether the cache list has key all present and
// verified.
func cacheHasWhole(list, key string) bool {
	l := cacheLine(list, key)
	return strings.Contains(l, "100.0%") && strings.Contains(l, "yes")
}

func cacheLine(list, key string) string {
	for line := range strings.SplitSeq(list, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[1] == key {
			return line
		}
	}
	return ""
}
