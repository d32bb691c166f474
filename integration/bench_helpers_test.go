package integration

// Helpers of BenchmarkModelPull: configuration, model generation, timed
// reads (registry GET, local file, containers), machine facts, and the
// table, JSON and SVG outputs.

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/internal/bytesize"
	"github.com/weightsnap/weightsnap/pack"
)

// Environment knobs of the benchmark.
const (
	benchEnvSize   = "WEIGHTSNAP_BENCH_SIZE"   // model size: "2GiB" (default), "512MiB", "16G", bytes
	benchEnvShards = "WEIGHTSNAP_BENCH_SHARDS" // number of *.safetensors files (default 1)
	benchEnvOut    = "WEIGHTSNAP_BENCH_OUT"    // output directory (default <repo>/out/bench)
	benchEnvConfig = "WEIGHTSNAP_BENCH_CONFIG" // TOML added to weightsnapd's config
)

// benchProgressStep is how often (in bytes read) the timed readers record
// a point of their progress; the container tool uses the same step.
const benchProgressStep = 64 << 20

// benchConfig is what the environment asks the benchmark to do.
type benchConfig struct {
	size   int64 // bytes of weights, over all shards
	shards int
	out    string
}

// benchConfigFromEnv reads the knobs, with their defaults.
func benchConfigFromEnv(repoRoot string) (benchConfig, error) {
	c := benchConfig{size: 2 << 30, shards: 1, out: filepath.Join(repoRoot, "out", "bench")}
	if v := os.Getenv(benchEnvSize); v != "" {
		n, err := bytesize.Parse(v)
		if err != nil {
			return c, fmt.Errorf("%s: %w", benchEnvSize, err)
		}
		c.size = n
	}
	if v := os.Getenv(benchEnvShards); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 999 {
			return c, fmt.Errorf("%s=%q: want a shard count from 1 to 999", benchEnvShards, v)
		}
		c.shards = n
	}
	if v := os.Getenv(benchEnvOut); v != "" {
		c.out = v
	}
	// Each shard holds at least one tensor after its header.
	if c.size/int64(c.shards) < 1<<20 {
		return c, fmt.Errorf("%d bytes in %d shards: want at least 1 MiB per shard", c.size, c.shards)
	}
	return c, nil
}

// benchModel is a generated model directory, laid out for pack.Build with
// Prefix "/": the tool program at the root (so that a container can run
// the model image itself, as the overlayfs path does) and the model files
// under models/.
type benchModel struct {
	dir     string
	weights []string // *.safetensors paths relative to dir, in shard order
	others  []string // config, tokenizer and index paths relative to dir
	size    int64    // bytes of the weights files
}

// modelFiles returns the model's files under root (a mount point of the
// model image, or the directory itself), the metadata files first.
func (m benchModel) modelFiles(root string) []string {
	var fs []string
	for _, p := range append(append([]string(nil), m.others...), m.weights...) {
		fs = append(fs, filepath.Join(root, p))
	}
	return fs
}

// writeBenchModel writes a model of size bytes of weights in shards
// safetensors files (Hugging Face names and, when sharded, an index),
// with a config.json carrying variant, into dir.
func writeBenchModel(ctx context.Context, dir string, tool []byte, size int64, shards int, seed uint64, variant string) (benchModel, error) {
	m := benchModel{dir: dir, size: size}
	md := filepath.Join(dir, "models")
	if err := os.MkdirAll(md, 0o755); err != nil {
		return m, err
	}
	if err := os.WriteFile(filepath.Join(dir, "tool"), tool, 0o755); err != nil {
		return m, err
	}
	weightMap := map[string]string{}
	tensor := 0
	for i := range shards {
		name := "model.safetensors"
		if shards > 1 {
			name = fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, shards)
		}
		n := size / int64(shards)
		if i == shards-1 {
			n = size - n*int64(shards-1)
		}
		names, err := writeSafetensors(ctx, filepath.Join(md, name), n, seed*1000+uint64(i), &tensor)
		if err != nil {
			return m, err
		}
		for _, t := range names {
			weightMap[t] = name
		}
		m.weights = append(m.weights, filepath.Join("models", name))
	}
	small := map[string]any{
		"config.json": map[string]any{
			"architectures": []string{"BenchForCausalLM"}, "model_type": "bench",
			"torch_dtype": "bfloat16", "hidden_size": 4096, "num_hidden_layers": tensor,
			"weightsnap_bench_variant": variant,
		},
		"tokenizer.json": benchTokenizer(seed),
	}
	if shards > 1 {
		small["model.safetensors.index.json"] = map[string]any{
			"metadata": map[string]any{"total_size": size}, "weight_map": weightMap,
		}
	}
	for _, name := range []string{"config.json", "model.safetensors.index.json", "tokenizer.json"} {
		v, ok := small[name]
		if !ok {
			continue
		}
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return m, err
		}
		if err := os.WriteFile(filepath.Join(md, name), b, 0o644); err != nil {
			return m, err
		}
		m.others = append(m.others, filepath.Join("models", name))
	}
	return m, nil
}

// benchTokenizer is a tokenizer.json of some hundred KiB, about what a
// real one weighs.
func benchTokenizer(seed uint64) map[string]any {
	r := rand.New(rand.NewPCG(seed, 7))
	vocab := make(map[string]int, 20000)
	for i := range 20000 {
		vocab[fmt.Sprintf("tok%x", r.Uint64()>>40)] = i
	}
	return map[string]any{"version": "1.0", "model": map[string]any{"type": "BPE", "vocab": vocab}}
}

// benchTensorBytes is the size of the generated tensors (BF16 8192×4096).
const benchTensorBytes = 64 << 20

// stTensor is a tensor entry of a safetensors header.
type stTensor struct {
	Dtype   string   `json:"dtype"`
	Shape   []int64  `json:"shape"`
	Offsets [2]int64 `json:"data_offsets"`
}

// writeSafetensors writes a valid safetensors file of exactly size bytes:
// tensors of benchTensorBytes and one smaller remainder, filled with
// seeded pseudo-random non-zero bytes. Tensor names continue from *next.
func writeSafetensors(ctx context.Context, path string, size int64, seed uint64, next *int) ([]string, error) {
	hdr, names, err := safetensorsHeader(size, benchTensorBytes, *next)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	*next += len(names)

	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lenb [8]byte
	binary.LittleEndian.PutUint64(lenb[:], uint64(len(hdr)))
	if _, err := f.Write(append(lenb[:], hdr...)); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	if err := fillRandom(ctx, f, 8+int64(len(hdr)), size, seed); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	return names, f.Close()
}

// safetensorsHeader returns the header (padded with spaces, as the format
// allows) of a safetensors file of size bytes holding BF16 tensors of
// tensorBytes and a smaller U8 remainder, named from model.layers.<first>
// on, and the names in the order of their data. The layout is the one the
// safetensors library writes: data sorted by dtype (wider first) and
// then by name, the header listing the tensors in that order, so that a
// loader taking them in header order reads the file front to back.
func safetensorsHeader(size, tensorBytes int64, first int) ([]byte, []string, error) {
	// The header's length decides how many data bytes are left, which
	// decides the header: grow a reserve until the header fits in it.
	for reserve := int64(0); ; {
		data := size - 8 - reserve
		if data <= 0 {
			return nil, nil, fmt.Errorf("%d bytes cannot hold a safetensors header", size)
		}
		var names []string
		for i := int64(0); i < data/tensorBytes; i++ {
			names = append(names, fmt.Sprintf("model.layers.%d.mlp.weight", first+int(i)))
		}
		slices.Sort(names)
		var rest int64
		if rest = data % tensorBytes; rest > 0 {
			names = append(names, fmt.Sprintf("model.layers.%d.mlp.weight", first+len(names)))
		}
		js := []byte(`{"__metadata__":{"format":"pt"}`)
		for i, name := range names {
			t := stTensor{Dtype: "BF16", Shape: []int64{tensorBytes / 2 / 4096, 4096}, Offsets: [2]int64{int64(i) * tensorBytes, int64(i+1) * tensorBytes}}
			if i == len(names)-1 && rest > 0 {
				t.Dtype, t.Shape, t.Offsets[1] = "U8", []int64{rest}, t.Offsets[0]+rest
			}
			k, _ := json.Marshal(name)
			v, err := json.Marshal(t)
			if err != nil {
				return nil, nil, err
			}
			js = append(append(append(append(js, ','), k...), ':'), v...)
		}
		js = append(js, '}')
		if int64(len(js)) <= reserve {
			return append(js, bytes.Repeat([]byte(" "), int(reserve)-len(js))...), names, nil
		}
		reserve = (int64(len(js)) + 64 + 7) &^ 7
	}
}

// benchFillChunk is the unit of fillRandom: each chunk has its own
// ChaCha8 stream, so that chunks are generated in parallel and the bytes
// do not depend on the number of workers.
const benchFillChunk = 4 << 20

// fillRandom writes pseudo-random non-zero bytes into f from off to end,
// on every CPU.
func fillRandom(ctx context.Context, f *os.File, off, end int64, seed uint64) error {
	chunks := (end - off + benchFillChunk - 1) / benchFillChunk
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, runtime.NumCPU())
	for w := range errs {
		wg.Go(func() {
			buf := make([]byte, benchFillChunk)
			for {
				c := next.Add(1) - 1
				if c >= chunks || ctx.Err() != nil {
					errs[w] = ctx.Err()
					return
				}
				at := off + c*benchFillChunk
				b := buf[:min(benchFillChunk, end-at)]
				var s [32]byte
				binary.LittleEndian.PutUint64(s[:], seed)
				binary.LittleEndian.PutUint64(s[8:], uint64(c))
				_, _ = rand.NewChaCha8(s).Read(b)
				for i := 0; ; i++ {
					j := bytes.IndexByte(b[i:], 0)
					if j < 0 {
						break
					}
					i += j
					b[i] = byte(i) | 1
				}
				if _, err := f.WriteAt(b, at); err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// packAndPush builds m's directory into an image (pack's layout: one
// uncompressed layer per large file, each with its chunk table), applies
// edits in turn, and pushes it to ref. It returns the pushed manifest's
// layers.
func packAndPush(ctx context.Context, m benchModel, ref string, edits ...func(v1.Image) (v1.Image, error)) ([]v1.Descriptor, error) {
	img, err := pack.Build(ctx, m.dir, pack.Options{Prefix: "/"})
	if err != nil {
		return nil, err
	}
	for _, edit := range edits {
		if img, err = edit(img); err != nil {
			return nil, err
		}
	}
	if err := pack.Push(ctx, img, ref, true, nil); err != nil {
		return nil, err
	}
	mf, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	return mf.Layers, nil
}

// pushedModel writes a model as writeBenchModel does into dir, packs and
// pushes it to ref, and removes its files: the registry's copy is the
// model. It returns the model and the pushed manifest's layers.
func pushedModel(b *testing.B, ctx context.Context, dir string, tool []byte, cfg benchConfig, seed uint64, variant, ref string) (benchModel, []v1.Descriptor) {
	b.Helper()
	m, err := writeBenchModel(ctx, dir, tool, cfg.size, cfg.shards, seed, variant)
	if err != nil {
		b.Fatal(err)
	}
	layers, err := packAndPush(ctx, m, ref)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.RemoveAll(m.dir); err != nil {
		b.Fatal(err)
	}
	return m, layers
}

// dropCaches writes back dirty pages and drops the page cache, dentries
// and inodes, so that the next reads come from disk; with a disk probe
// (useDiskProbe), once the disk is quiet. Call it before anything of the
// case is mounted: a mounted layer's fill starts during a long wait.
func dropCaches() error {
	unix.Sync()
	if p := settleProbe; p != nil {
		p.settle()
	}
	return dropPageCache()
}

// dropPageCache is dropCaches without the wait for the disk.
func dropPageCache() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
		return fmt.Errorf("dropping the page cache: %w", err)
	}
	return nil
}

// benchPoint is a point of a read's progress: seconds since the path's
// start, bytes read so far.
type benchPoint [2]float64

// readTrace is the timeline of one full read of the model's weights.
type readTrace struct {
	start, first, headers, done time.Time // zero when not applicable
	bytes                       int64
	cpu                         time.Duration // the reader's, user and system; 0 if not known
	progress                    []struct {
		at    time.Time
		bytes int64
	}
}

// parseToolOutput parses the lines of the tool's "read" and "load" modes
// (readFiles and loadFiles in toolSource); other lines are ignored.
func parseToolOutput(lines []string) (readTrace, error) {
	var tr readTrace
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue
		}
		ns, err1 := strconv.ParseInt(f[1], 10, 64)
		n, err2 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		at := time.Unix(0, ns)
		switch f[0] {
		case "start":
			tr.start = at
		case "first":
			tr.first = at
		case "headers":
			tr.headers = at
		case "progress":
			tr.progress = append(tr.progress, struct {
				at    time.Time
				bytes int64
			}{at, n})
		case "done":
			tr.done, tr.bytes = at, n
		case "cpu":
			tr.cpu = time.Duration(n) * time.Microsecond
		}
	}
	if tr.start.IsZero() || tr.done.IsZero() {
		return tr, fmt.Errorf("incomplete reader output (no start or done line):\n%s", strings.Join(lines, "\n"))
	}
	return tr, nil
}

// series returns the trace as points relative to origin.
func (tr readTrace) series(origin time.Time) []benchPoint {
	sec := func(t time.Time) float64 { return t.Sub(origin).Seconds() }
	pts := []benchPoint{{0, 0}, {sec(tr.start), 0}}
	if !tr.first.IsZero() {
		pts = append(pts, benchPoint{sec(tr.first), 1 << 20})
	}
	for _, p := range tr.progress {
		pts = append(pts, benchPoint{sec(p.at), float64(p.bytes)})
	}
	return append(pts, benchPoint{sec(tr.done), float64(tr.bytes)})
}

// readMBps is the throughput of the read itself, from its start to its
// last byte, in MB/s (10^6 bytes).
func (tr readTrace) readMBps() float64 {
	d := tr.done.Sub(tr.start).Seconds()
	if d <= 0 {
		return 0
	}
	return float64(tr.bytes) / d / 1e6
}

// progressWriter records a readTrace of what is written to it.
type progressWriter struct {
	tr   *readTrace
	next int64
}

func (w *progressWriter) Write(p []byte) (int, error) {
	if w.tr.first.IsZero() && w.tr.bytes+int64(len(p)) >= 1<<20 {
		w.tr.first = time.Now()
	}
	w.tr.bytes += int64(len(p))
	for w.tr.bytes >= w.next {
		w.tr.progress = append(w.tr.progress, struct {
			at    time.Time
			bytes int64
		}{time.Now(), w.tr.bytes})
		w.next += benchProgressStep
	}
	return len(p), nil
}

// timedGet GETs each blob from base (http://host:port) in turn, one
// stream at a time like curl, and discards the bodies.
func timedGet(ctx context.Context, base, repo string, digests []string) (readTrace, error) {
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true}}
	defer client.CloseIdleConnections()
	tr := readTrace{start: time.Now()}
	w := &progressWriter{tr: &tr, next: benchProgressStep}
	for _, d := range digests {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/"+repo+"/blobs/"+d, nil)
		if err != nil {
			return tr, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return tr, fmt.Errorf("GET %s: %w", d, err)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return tr, fmt.Errorf("GET %s: %s", d, resp.Status)
		}
		_, err = io.CopyBuffer(w, resp.Body, make([]byte, 1<<20))
		resp.Body.Close()
		if err != nil {
			return tr, fmt.Errorf("GET %s: %w", d, err)
		}
	}
	tr.done = time.Now()
	return tr, nil
}

// runTool runs the tool on the host and parses its output (the events of
// "read" and "load").
func runTool(ctx context.Context, tool string, args ...string) (readTrace, error) {
	cmd := exec.CommandContext(ctx, tool, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return readTrace{}, fmt.Errorf("%s %s: %w\n%s", tool, strings.Join(args, " "), err, stderr.String())
	}
	return parseToolOutput(strings.Split(string(out), "\n"))
}

// warmRuns is how many times a warm read on the host is repeated: it takes
// tens of milliseconds, where one descheduling of the reader shows.
const warmRuns = 5

// runToolWarm runs the tool on the host with args ("read FILE...", "load
// FILE...") warmRuns times and returns the run with the median read
// throughput.
func runToolWarm(ctx context.Context, tool string, args ...string) (readTrace, error) {
	var runs []readTrace
	for range warmRuns {
		tr, err := runTool(ctx, tool, args...)
		if err != nil {
			return readTrace{}, err
		}
		runs = append(runs, tr)
	}
	return medianRun(runs), nil
}

// runToolWarmPair runs the tool with the arguments a and b warmRuns times
// each, in turn (a, b, a, b, …) after one untimed run of each, so that
// both see the same machine and a warm page cache, and returns each one's
// run with the median read rate. Two paths compared with a 10% margin
// need it: this 2-core VM's speed drifts between one part of the bench
// and another by more than that.
func runToolWarmPair(ctx context.Context, tool string, a, b []string) (readTrace, readTrace, error) {
	var ra, rb []readTrace
	run := func(args []string, into *[]readTrace) func() error {
		return func() error {
			tr, err := runTool(ctx, tool, args...)
			*into = append(*into, tr)
			return err
		}
	}
	var warmA, warmB []readTrace
	if err := alternate(1, run(a, &warmA), run(b, &warmB)); err != nil {
		return readTrace{}, readTrace{}, err
	}
	if err := alternate(warmRuns, run(a, &ra), run(b, &rb)); err != nil {
		return readTrace{}, readTrace{}, err
	}
	return medianRun(ra), medianRun(rb), nil
}

// alternate calls fa and fb in turn, n times each, and stops at the first
// error.
func alternate(n int, fa, fb func() error) error {
	for range n {
		if err := fa(); err != nil {
			return err
		}
		if err := fb(); err != nil {
			return err
		}
	}
	return nil
}

// medianRun returns the run of runs (not empty) with the median read rate.
func medianRun(runs []readTrace) readTrace {
	runs = slices.Clone(runs)
	slices.SortFunc(runs, func(a, b readTrace) int { return cmp.Compare(a.readMBps(), b.readMBps()) })
	return runs[len(runs)/2]
}

// vmHWM returns the peak resident set size of process pid, in bytes.
func vmHWM(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("VmHWM of %d: %w", pid, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}

// diskUsage returns what the files under dir occupy on disk (allocated
// blocks, as du reports, hard links counted once) and their apparent size.
func diskUsage(dir string) (allocated, apparent int64, err error) {
	seen := map[[2]uint64]bool{}
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		key := [2]uint64{st.Dev, st.Ino}
		if seen[key] {
			return nil
		}
		seen[key] = true
		allocated += st.Blocks * 512
		if fi.Mode().IsRegular() {
			apparent += fi.Size()
		}
		return nil
	})
	return allocated, apparent, err
}

func (m benchMachine) String() string {
	return fmt.Sprintf("%d CPUs (%s), %.1f GiB RAM, Linux %s, %s, %s",
		m.CPUs, m.CPUModel, float64(m.MemBytes)/(1<<30), m.Kernel, m.OS, m.GoVersion)
}
