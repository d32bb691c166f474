package integration

// BenchmarkModelPull's disk and memory: a sampler of the used bytes of
// the file systems holding its directories, by phase, the removal of what
// a finished phase no longer needs, so that a 16 GiB model fits, and the
// peak RSS of weightsnap's processes.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/pack"
)

// benchDiskEvery is how often the disk sampler looks at the file systems.
const benchDiskEvery = 100 * time.Millisecond

// benchDisk is what the bench used of its file systems: bytes above their
// use at its start (others' writes to them count too).
type benchDisk struct {
	// Dirs are a directory of each file system sampled.
	Dirs           []string `json:"dirs"`
	StartUsedBytes int64    `json:"start_used_bytes"`
	PeakBytes      int64    `json:"peak_above_start_bytes"`
	PeakPhase      string   `json:"peak_phase"`
	// PeakPerImage is PeakBytes over the model image's bytes.
	PeakPerImage float64          `json:"peak_per_image"`
	EndBytes     int64            `json:"end_above_start_bytes"`
	IntervalMS   int64            `json:"interval_ms"`
	Samples      int              `json:"samples"`
	Phases       []benchDiskPhase `json:"phases"`
	Note         string           `json:"note,omitempty"`
}

// benchDiskPhase is one phase of the bench: the most it used, and what it
// left for the next (after its own deletions).
type benchDiskPhase struct {
	Name      string `json:"name"`
	PeakBytes int64  `json:"peak_above_start_bytes"`
	EndBytes  int64  `json:"end_above_start_bytes"`
}

// diskSampler polls the used bytes of some file systems and keeps the
// peak of each phase. Polling, not a hook: it measures; nothing waits on it.
type diskSampler struct {
	used     func(dir string) (int64, error)
	stop     chan struct{}
	done     chan struct{}
	haltOnce sync.Once

	mu sync.Mutex
	d  benchDisk
}

// fsUsed is the used bytes of the file system holding dir: its blocks
// less its free ones, as df counts them.
func fsUsed(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	unit := st.Frsize
	if unit == 0 {
		unit = st.Bsize
	}
	return int64(st.Blocks-st.Bfree) * unit, nil
}

// distinctFileSystems returns the first of dirs on each file system.
func distinctFileSystems(dirs ...string) ([]string, error) {
	seen := map[uint64]bool{}
	var out []string
	for _, d := range dirs {
		var st syscall.Stat_t
		if err := syscall.Stat(d, &st); err != nil {
			return nil, fmt.Errorf("stat %s: %w", d, err)
		}
		if !seen[st.Dev] {
			seen[st.Dev] = true
			out = append(out, d)
		}
	}
	return out, nil
}

// newDiskSampler takes the first sample of the file systems of dirs (one
// each), in phase first; used says how full one is.
func newDiskSampler(dirs []string, used func(string) (int64, error), first string) (*diskSampler, error) {
	s := &diskSampler{used: used, d: benchDisk{Dirs: dirs}}
	n, err := s.total()
	if err != nil {
		return nil, err
	}
	s.d.StartUsedBytes = n
	s.d.Samples = 1
	s.d.PeakPhase = first
	s.d.Phases = []benchDiskPhase{{Name: first}}
	return s, nil
}

func (s *diskSampler) total() (int64, error) {
	var sum int64
	for _, d := range s.d.Dirs {
		n, err := s.used(d)
		if err != nil {
			return 0, err
		}
		sum += n
	}
	return sum, nil
}

// start polls every interval until finish.
func (s *diskSampler) start(every time.Duration) {
	s.d.IntervalMS = every.Milliseconds()
	s.stop, s.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				s.sample()
			}
		}
	}()
}

// sample adds one look at the file systems to the current phase.
func (s *diskSampler) sample() {
	n, err := s.total()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if s.d.Note == "" {
			s.d.Note = "sampling failed: " + err.Error()
		}
		return
	}
	s.d.Samples++
	n -= s.d.StartUsedBytes
	p := &s.d.Phases[len(s.d.Phases)-1]
	p.PeakBytes = max(p.PeakBytes, n)
	p.EndBytes = n
	if n > s.d.PeakBytes {
		s.d.PeakBytes, s.d.PeakPhase = n, p.Name
	}
	s.d.EndBytes = n
}

// phase ends the current phase with a sample and begins the next.
func (s *diskSampler) phase(name string) {
	s.sample()
	s.mu.Lock()
	defer s.mu.Unlock()
	end := s.d.Phases[len(s.d.Phases)-1].EndBytes
	s.d.Phases = append(s.d.Phases, benchDiskPhase{Name: name, PeakBytes: end, EndBytes: end})
}

// halt stops the polling, if started; it may be called more than once.
func (s *diskSampler) halt() {
	s.haltOnce.Do(func() {
		if s.stop != nil {
			close(s.stop)
			<-s.done
		}
	})
}

// finish stops the polling, takes a last sample and returns the result.
func (s *diskSampler) finish() benchDisk {
	s.halt()
	s.sample()
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.d
	d.Phases = append([]benchDiskPhase(nil), s.d.Phases...)
	return d
}

// writeDisk prints the disk lines of the bench's output.
func writeDisk(w io.Writer, d benchDisk) {
	if len(d.Phases) == 0 {
		return
	}
	fmt.Fprintf(w, "disk: peak %s above the start (%.2f × the model image), in phase %q; %s at the end; file system(s) of %s, every %d ms%s\n",
		gib(d.PeakBytes), d.PeakPerImage, d.PeakPhase, gib(d.EndBytes), strings.Join(d.Dirs, ", "), d.IntervalMS, parenthesize(d.Note))
	width := 0
	for _, p := range d.Phases {
		width = max(width, len(p.Name)+1)
	}
	for _, p := range d.Phases {
		fmt.Fprintf(w, "  %-*s peak %s, left %s\n", width, p.Name+":", gib(p.PeakBytes), gib(p.EndBytes))
	}
}

// TestBenchDiskSampler drives the sampler by hand (it is never started):
// each phase's peak and end, and the run's, above the first sample.
func TestBenchDiskSampler(t *testing.T) {
	used := map[string]int64{"/a": 100, "/b": 10}
	s, err := newDiskSampler([]string{"/a", "/b"}, func(d string) (int64, error) { return used[d], nil }, "stack")
	if err != nil {
		t.Fatal(err)
	}
	s.phase("generate") // ends "stack" at 0
	used["/a"] = 130
	s.sample()
	used["/b"] = 40
	s.sample()
	used["/a"] = 105
	s.phase("pull") // ends "generate" at 35
	used["/a"] = 150
	s.sample()
	used["/a"], used["/b"] = 100, 12
	d := s.finish()
	want := []benchDiskPhase{{"stack", 0, 0}, {"generate", 60, 35}, {"pull", 80, 2}}
	if !slices.Equal(d.Phases, want) {
		t.Errorf("phases %+v, want %+v", d.Phases, want)
	}
	if d.StartUsedBytes != 110 || d.PeakBytes != 80 || d.PeakPhase != "pull" || d.EndBytes != 2 || d.Samples != 7 {
		t.Errorf("start %d, peak %d in %q, end %d, %d samples; want 110, 80 in \"pull\", 2, 7", d.StartUsedBytes, d.PeakBytes, d.PeakPhase, d.EndBytes, d.Samples)
	}

	var out strings.Builder
	d.PeakPerImage = 3.04
	writeDisk(&out, d)
	for _, line := range []string{`(3.04 × the model image), in phase "pull"`, "  generate: peak 0.000 GiB, left 0.000 GiB\n"} {
		if !strings.Contains(out.String(), line) {
			t.Errorf("disk lines lack %q:\n%s", line, out.String())
		}
	}
}

// benchCacheBound is the byte bound the bench gives weightsnapd's cache:
// the largest layer a model of cfg has (its largest safetensors file and
// its tar headers), so that every layer fits, while what the cache holds
// once a model is fetched (its layers and the tools image's, a binary of
// megabytes) is above it. Eviction then happens when a layer closes, not
// during a read: the layers of an image removed through CRI go at once,
// and nothing else does, since every layer of an image still present
// stays open. 0 (no bound) when the safetensors files are below pack's
// large-file threshold: one layer then holds the whole model; and when
// free, the bytes free on the bench's disk, holds every model the bench
// caches (benchUnboundedPeak): evicting a removed model's cache files
// slowed the cold cases after it by a quarter on this machine, whose disk
// discards freed blocks as they are freed, and only the cases after the
// first would pay for it.
func benchCacheBound(cfg benchConfig, free int64) int64 {
	if cfg.size/int64(cfg.shards) < pack.DefaultLargeFileThreshold {
		return 0
	}
	if free > 0 && float64(free) > benchUnboundedPeak*float64(cfg.size)+float64(benchDiskSlack) {
		return 0
	}
	largest := cfg.size - cfg.size/int64(cfg.shards)*int64(cfg.shards-1)
	return largest + 64<<10
}

// benchKeepLocal says whether the disk, with free bytes free, has room to
// keep model A's generated files (the model's size once more) until
// weightsnap's warm host paths are measured, through the full pull and
// the cold paths, with the cache not bounded.
func benchKeepLocal(cfg benchConfig, free int64) bool {
	return free > 0 && float64(free) > (benchUnboundedPeak+1)*float64(cfg.size)+float64(benchDiskSlack)
}

// benchUnboundedPeak is the disk a run with an unbounded cache takes at
// its peak, over the model's size (6.03 measured at 2 GiB: the registry's
// copy and the cache's of every model the bench reads), and
// benchDiskSlack what it leaves free besides.
const (
	benchUnboundedPeak = 6.5
	benchDiskSlack     = 8 << 30
)

// benchCacheConfig is weightsnapd's [cache] section for the bench, given
// its cache bound.
func benchCacheConfig(bound int64) string {
	if bound == 0 {
		return ""
	}
	return fmt.Sprintf("\n[cache]\nmax_bytes = %d\n", bound)
}

// boundNote says what bound the cache had in the bench's words.
func boundNote(bound int64) string {
	if bound == 0 {
		return "the cache was not bounded (the disk holds every model the bench reads)"
	}
	return fmt.Sprintf("the cache was bounded to %.3f GiB, the model's largest layer, so that removed models' layers are evicted", float64(bound)/(1<<30))
}

// freeBytes returns the bytes free to unprivileged use on dir's file
// system, 0 if unknown.
func freeBytes(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
}

// cacheOnDisk is what a weightsnap cache directory holds: its files'
// allocated and apparent bytes, and the content bytes its records vouch
// for (whole or not), over how many keys.
type cacheOnDisk struct {
	allocated, apparent, present int64
	keys                         int
}

func measureCache(dir string) (cacheOnDisk, error) {
	var c cacheOnDisk
	var err error
	if c.allocated, c.apparent, err = diskUsage(dir); err != nil {
		return c, err
	}
	entries, err := cache.Inspect(dir)
	if err != nil {
		return c, err
	}
	for _, e := range entries {
		c.present += e.Present
		c.keys++
	}
	return c, nil
}

func (c cacheOnDisk) ratio() float64 {
	if c.present == 0 {
		return 0
	}
	return round4(float64(c.allocated) / float64(c.present))
}

// benchCachePoint is the cache measured at one point of the run.
type benchCachePoint struct {
	When           string  `json:"when"`
	AllocatedBytes int64   `json:"allocated_bytes"`
	DataBytes      int64   `json:"data_bytes"`
	Keys           int     `json:"keys"`
	Ratio          float64 `json:"ratio"`
}

// benchRemover removes what a finished phase of the bench no longer
// needs: a model's image from containerd (CRI, and ctr's namespace) and
// from weightsnap's cache, and its blobs from the registry.
type benchRemover struct {
	b   *testing.B
	ws  *weightsnapd
	ctd *containerd
	is  criapi.ImageServiceClient
	reg *testutil.Registry
	// bounded is set when the cache has the bench's bound, without which
	// weightsnap keeps a removed model's bytes until it needs room.
	bounded bool
	// evicted is what weightsnap evicted at the removals, weights the
	// weights layers of the models removed and others their other layers.
	evicted, weights, others int64
}

// benchEvictWait bounds the wait for weightsnap to evict a removed
// model's layers; a model it kept would fill the disk at 16 GiB.
const benchEvictWait = 2 * time.Minute

// removeModel removes the image ref (host/repo:tag on reg) once its phase
// is over: from ctr's namespace if ctr pulled it there, through CRI
// RemoveImage, as kubelet's image GC does, and from the registry (API
// deletes, then its garbage collection). It waits until weightsnap has
// unmounted the image's layers and, with the bench's cache bound
// (benchCacheBound), evicted the weights layers' bytes: a removed image's
// layers are demoted, and the bound has them evicted when they close. A
// layer that closes once the cache is below its bound again (the small
// files' layer, megabytes, closes after the weights on it) stays until
// the next model's fetch passes the bound.
func (x *benchRemover) removeModel(ctx context.Context, ref string, layers []v1.Descriptor, ctrPulled bool) {
	b := x.b
	before, err := x.ws.metric(ctx, "weightsnap_cache_evicted_bytes_total")
	if err != nil {
		b.Fatal(err)
	}
	if ctrPulled {
		if _, err := x.ctd.ctr(b, ctx, "--namespace", benchNamespace, "images", "rm", "--sync", ref); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := x.is.RemoveImage(ctx, &criapi.RemoveImageRequest{Image: &criapi.ImageSpec{Image: ref}}); err != nil {
		b.Fatalf("CRI RemoveImage %s: %v", ref, err)
	}
	weights := layersSize(weightLayers(layers))
	var evicted float64
	deadline := time.Now().Add(benchEvictWait)
	for {
		mounted := 0
		for _, l := range layers {
			mounted += len(layerMounts(b, l.Digest.String()))
		}
		if evicted, err = x.ws.metric(ctx, "weightsnap_cache_evicted_bytes_total"); err != nil {
			b.Fatal(err)
		}
		if mounted == 0 && (!x.bounded || int64(evicted-before) >= weights) {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("removed %s: after %v, %d of its layers' mounts remain and weightsnap evicted %.0f of its %d bytes of weights; kept, they would fill the disk at 16 GiB", ref, benchEvictWait, mounted, evicted-before, weights)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			b.Fatal(err)
		}
	}
	x.evicted += int64(evicted - before)
	x.weights += weights
	x.others += layersSize(layers) - weights
	rest, ok := strings.CutPrefix(ref, x.reg.Addr+"/")
	repo, tag, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 {
		b.Fatalf("%s is not a tag on the registry %s", ref, x.reg.Addr)
	}
	if _, err := x.reg.DeleteImage(ctx, repo, tag); err != nil {
		b.Fatal(err)
	}
	if err := x.reg.GarbageCollect(ctx); err != nil {
		b.Fatal(err)
	}
}

// weightLayers returns the layers holding a *.safetensors file.
func weightLayers(layers []v1.Descriptor) []v1.Descriptor {
	var out []v1.Descriptor
	for _, l := range layers {
		if strings.HasSuffix(l.Annotations[pack.AnnotationTitle], ".safetensors") {
			out = append(out, l)
		}
	}
	return out
}

// containerdOnDisk is what containerd's content store and overlayfs
// snapshotter take on disk (allocated bytes).
func containerdOnDisk(ctd *containerd) (int64, error) {
	var total int64
	for _, d := range []string{"io.containerd.content.v1.content", "io.containerd.snapshotter.v1.overlayfs"} {
		n, _, err := diskUsage(filepath.Join(ctd.root, d))
		if err != nil {
			return 0, fmt.Errorf("containerd's %s: %w", d, err)
		}
		total += n
	}
	return total, nil
}

// writeCachePoints prints the cache's measurements and its note.
func writeCachePoints(w io.Writer, c benchCache) {
	for _, p := range c.Points {
		fmt.Fprintf(w, "  %s: %s allocated for %s of data in %d keys (%.4f×)\n", p.When, gib(p.AllocatedBytes), gib(p.DataBytes), p.Keys, p.Ratio)
	}
	if c.Note != "" {
		fmt.Fprintf(w, "  %s\n", c.Note)
	}
}

// TestBenchCacheBound checks that every layer of a model the bench
// generates fits the bound it gives weightsnap's cache, sharded or not,
// and that a model in one layer gets none.
func TestBenchCacheBound(t *testing.T) {
	if b := benchCacheBound(benchConfig{size: 6 << 20, shards: 1}, 0); b != 0 {
		t.Errorf("a bound of %d bytes for a model in one layer, want none", b)
	}
	big := benchConfig{size: 16 << 30, shards: 1}
	if b := benchCacheBound(big, 70<<30); b == 0 {
		t.Error("no bound for 16 GiB on a disk with 70 GiB free")
	}
	if b := benchCacheBound(big, 200<<30); b != 0 {
		t.Errorf("a bound of %d bytes for 16 GiB on a disk with 200 GiB free, want none", b)
	}
	for _, shards := range []int{1, 2} {
		cfg := benchConfig{size: int64(shards)*pack.DefaultLargeFileThreshold + 12345, shards: shards}
		m, err := writeBenchModel(t.Context(), filepath.Join(t.TempDir(), "m"), []byte("tool"), cfg.size, cfg.shards, 7, "x")
		if err != nil {
			t.Fatal(err)
		}
		img, err := pack.Build(t.Context(), m.dir, pack.Options{Prefix: "/"})
		if err != nil {
			t.Fatal(err)
		}
		mf, err := img.Manifest()
		if err != nil {
			t.Fatal(err)
		}
		var largest int64
		for _, l := range mf.Layers {
			largest = max(largest, l.Size)
		}
		if bound := benchCacheBound(cfg, 0); largest > bound || bound-largest > 64<<10 {
			t.Errorf("%d shards: largest layer %d bytes, cache bound %d: want the layer to fit, within 64 KiB", shards, largest, bound)
		}
	}
}

// The local model is kept for the paired warm runs only when the disk
// holds it besides everything an unbounded run keeps.
func TestBenchKeepLocal(t *testing.T) {
	two := benchConfig{size: 2 << 30, shards: 1}
	if !benchKeepLocal(two, 70<<30) {
		t.Error("2 GiB not kept on a disk with 70 GiB free")
	}
	if benchKeepLocal(benchConfig{size: 16 << 30, shards: 1}, 70<<30) {
		t.Error("16 GiB kept on a disk with 70 GiB free")
	}
	if benchKeepLocal(two, 0) {
		t.Error("kept on a disk of unknown free space")
	}
	// Keeping needs more room than not bounding the cache.
	for free := int64(1 << 30); free < 64<<30; free += 1 << 30 {
		if benchKeepLocal(two, free) && benchCacheBound(two, free) != 0 {
			t.Errorf("%d GiB free: local files kept with the cache bounded", free>>30)
		}
	}
}

// The pair's runs alternate, and each side gets its own median.
func TestRunsAlternate(t *testing.T) {
	var order []string
	var n int
	err := alternate(3, func() error { order = append(order, "a"); return nil }, func() error {
		order = append(order, "b")
		if n++; n == 3 {
			return errors.New("b failed")
		}
		return nil
	})
	if got := strings.Join(order, ""); got != "ababab" || err == nil {
		t.Errorf("order %q, err %v; want ababab and b's error", got, err)
	}
	runs := func(secs ...float64) []readTrace {
		var rs []readTrace
		start := time.Unix(0, 0)
		for _, s := range secs {
			rs = append(rs, readTrace{start: start, done: start.Add(time.Duration(s * float64(time.Second))), bytes: 1 << 30})
		}
		return rs
	}
	if m := medianRun(runs(5, 1, 3, 2, 4)); m.done.Sub(m.start) != 3*time.Second {
		t.Errorf("median run took %v, want 3s", m.done.Sub(m.start))
	}
}

// TestBenchRSSTargets checks that every weightsnap process's peak RSS is
// held to 256 MiB and printed.
func TestBenchRSSTargets(t *testing.T) {
	r := benchResult{RSS: benchRSS{WeightsnapdBytes: 25 << 20, ManagerBytes: 170 << 20, HolderBytes: 300 << 20}}
	got := map[string]bool{}
	for _, tg := range benchTargets(r) {
		if strings.HasSuffix(tg.Name, "peak RSS, MiB") {
			got[tg.Name] = tg.Pass
			if tg.Limit != 256 {
				t.Errorf("%s: limit %v MiB, want 256", tg.Name, tg.Limit)
			}
		}
	}
	want := map[string]bool{"weightsnapd peak RSS, MiB": true, "FUSE manager peak RSS, MiB": true, "holder peak RSS, MiB": false}
	if !maps.Equal(got, want) {
		t.Errorf("RSS targets passed %v, want %v", got, want)
	}
	var out strings.Builder
	writeTable(&out, r)
	if line := "peak RSS (VmHWM): weightsnapd 25.0 MiB, FUSE manager 170.0 MiB, holder 300.0 MiB\n"; !strings.Contains(out.String(), line) {
		t.Errorf("table has no line %q:\n%s", line, out.String())
	}
}
