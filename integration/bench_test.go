package integration

// This file is long because BenchmarkModelPull runs every path (raw GET,
// full pull, lazy cold, warm, shared) in one function, one after another on
// one stack, so that their ratios are measured side by side.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// benchOverlayUnpack lets ctr's pulls (the transfer service) unpack into
// containerd's overlayfs snapshotter too: the harness' config names only
// weightsnap, and an unpack_config list replaces the default one.
const benchOverlayUnpack = `
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = %q
  snapshotter = "overlayfs"
`

// benchNamespace is the containerd namespace of the overlayfs full pull,
// apart from CRI's.
const benchNamespace = "bench"

// benchUnverifiedLazy makes weightsnapd serve layers without a chunk table
// before they verified, for the path that measures what the table's checks
// cost. It changes nothing for a layer with a table: every other image of
// the run has them.
const benchUnverifiedLazy = `
[verify]
unverified_layers = "lazy"
`

// BenchmarkModelPull is `make bench`: it builds a model image, starts a
// registry (behind a byte-counting proxy), weightsnapd and containerd, and
// in one run measures reading the whole model by every path: a raw
// registry GET (the physical limit), a local file, a full pull through
// containerd's overlayfs snapshotter, and weightsnap through CRI image
// volumes (cold, warm, and eight pods sharing a model). A second model of
// the same shape, pushed without chunk tables, is read cold too: what
// checking every range costs; and two more are loaded cold as
// safetensors-based servers load (mmap, tensors in header order), from one
// thread and from four, with the same loader warm on the host. It prints a table and writes bench.json and
// bench.svg. Targets are reported, not asserted. What a finished phase no
// longer needs is deleted (generated files once read and pushed, the full
// pull's image, each model from containerd, weightsnap's cache and the
// registry once its paths are done), so that the disk holds at most about
// three copies of the model (during the full pull); the disk is sampled
// by phase.
// Knobs: WEIGHTSNAP_BENCH_SIZE, WEIGHTSNAP_BENCH_SHARDS, WEIGHTSNAP_BENCH_OUT,
// WEIGHTSNAP_BENCH_CONFIG (TOML added to weightsnapd's config, to compare
// settings; its tables must not repeat the bench's own, [verify] and
// [cache]).
// Run it once: -run '^$' -bench BenchmarkModelPull -benchtime 1x.
func BenchmarkModelPull(b *testing.B) {
	cfg := benchPrerequisites(b)
	ctx, cancel := context.WithTimeout(b.Context(), 55*time.Minute)
	defer cancel()
	r := benchResult{
		Time:    time.Now().UTC().Format(time.RFC3339),
		Command: fmt.Sprintf("make bench %s=%s %s=%d", benchEnvSize, gibString(cfg.size), benchEnvShards, cfg.shards),
		Machine: machineInfo(),
		Setup:   map[string]float64{},
	}
	step := func(name string, start time.Time) {
		r.Setup[name] = round3(time.Since(start).Seconds())
		b.Logf("%s: %.1f s", name, time.Since(start).Seconds())
	}
	var dropErr error
	drop := func() {
		if err := dropCaches(); err != nil && dropErr == nil {
			dropErr = err
			b.Logf("warning: %v; cold cases read from the page cache", err)
		}
	}

	// The stack: as newStack, plus overlayfs for ctr's pulls. Images are
	// pushed to the registry directly. The timed paths pull from it
	// directly too: on two cores the counting proxy, a copy through the
	// test process, halves the registry's throughput. Only the shared-model
	// case, which counts registry bytes, pulls through the proxy.
	// The disk it uses is sampled from here on, by phase. weightsnapd's
	// cache is bounded (benchCacheBound) when the disk could not hold
	// every model, so that a model removed once its phase is over leaves
	// the disk at once.
	t0 := time.Now()
	dir := shortTempDir(b, "wsb")
	settle := useDiskProbe(b, dir)
	reg := testutil.StartRegistry(b)
	fsDirs, err := distinctFileSystems(dir, reg.Dir)
	if err != nil {
		b.Fatal(err)
	}
	disk, err := newDiskSampler(fsDirs, fsUsed, "stack")
	if err != nil {
		b.Fatal(err)
	}
	disk.start(benchDiskEvery)
	b.Cleanup(disk.halt)
	origin := testutil.StartProxy(b, reg.URL(), testutil.Faults{})
	free := freeBytes(dir)
	bound := benchCacheBound(cfg, free)
	// With room for it, model A's local copy stays until weightsnap's warm
	// host paths, and the two are measured in turn (runToolWarmPair).
	keepLocal := benchKeepLocal(cfg, free)
	st := startBenchStack(b, ctx, dir, origin.Addr, benchUnverifiedLazy+benchCacheConfig(bound)+os.Getenv(benchEnvConfig), origin.Addr, reg.Addr)
	hosts, toolPath, tool, tools := st.hosts, st.toolPath, st.tool, st.tools
	ws, ctd, rt, is, logs := st.ws, st.ctd, st.rt, st.is, st.logs
	step("stack", t0)
	remover := &benchRemover{b: b, ws: ws, ctd: ctd, is: is, reg: reg, bounded: bound > 0}
	var cachePoints []benchCachePoint
	var diskNotes []string
	cacheDir := filepath.Join(ws.root, "cache")
	cachePoint := func(when string) {
		c, err := measureCache(cacheDir)
		if err != nil {
			b.Fatal(err)
		}
		cachePoints = append(cachePoints, benchCachePoint{When: when, AllocatedBytes: c.allocated, DataBytes: c.present, Keys: c.keys, Ratio: c.ratio()})
	}

	// Model A: the one every path reads.
	disk.phase("model A: generate")
	t0 = time.Now()
	data := mkdir(b, filepath.Join(dir, "data"))
	ma, err := writeBenchModel(ctx, filepath.Join(data, "a"), tool, cfg.size, cfg.shards, 1, "a")
	if err != nil {
		b.Fatal(err)
	}
	step("generate model", t0)
	disk.phase("model A: pack and push")
	t0 = time.Now()
	refA := reg.Addr + "/bench/model:a"
	layersA, err := packAndPush(ctx, ma, reg.Addr+"/bench/model:a")
	if err != nil {
		b.Fatal(err)
	}
	step("pack and push model", t0)
	weightsA := weightDigests(layersA)
	r.Model = benchModelInfo{
		WeightsBytes: ma.size, Shards: cfg.shards, Files: append(slices.Clone(ma.others), ma.weights...),
		ImageBytes: layersSize(layersA), Layers: len(layersA), Ref: refA,
	}

	// 1. The registry GET: the physical limit, and through the proxy.
	disk.phase("registry GETs, local files")
	var paths []benchPath
	for _, g := range []struct {
		key, name, base string
		cold            bool
	}{
		{"get-cold", "registry GET, cold", reg.URL(), true},
		{"get-warm", "registry GET, warm", reg.URL(), false},
		{"get-proxy-cold", "registry GET via proxy, cold", origin.URL(), true},
		{"get-proxy-warm", "registry GET via proxy, warm", origin.URL(), false},
	} {
		if g.cold {
			drop()
		}
		if g.key == "get-cold" {
			r.CPU.ProbeGet = cpuProbe()
		}
		reg0, self0 := cpuSeconds(b, reg.Pid()), cpuSeconds(b, 0)
		tr, err := timedGet(ctx, g.base, "bench/model", weightsA)
		if err != nil {
			b.Fatal(err)
		}
		if g.key == "get-cold" {
			gib := float64(tr.bytes) / (1 << 30)
			r.CPU.GetRegistry = round3((cpuSeconds(b, reg.Pid()) - reg0) / gib)
			r.CPU.GetClient = round3((cpuSeconds(b, 0) - self0) / gib)
		}
		via := "straight to the registry, as the timed paths below"
		if g.base == origin.URL() {
			via = "through the counting proxy, as the shared-model case"
		}
		note := fmt.Sprintf("one HTTP GET per weights blob, in turn, %s; clock from the first request; %s", via, coldNote(g.cold))
		paths = append(paths, newBenchPath(g.key, g.name, note, tr.start, tr))
	}

	// 2. The same bytes from a local file, by the same reader program:
	// cold here, warm here too unless it is measured later in turn with
	// weightsnap's mount (keepLocal).
	localNote := func(warm string) string {
		if keepLocal {
			return fmt.Sprintf("%s; the median of %d runs, taken in turn with the same runs on weightsnap's mount, after one untimed run", warm, warmRuns)
		}
		return fmt.Sprintf("%s; the median of %d runs", warm, warmRuns)
	}
	localRead := append([]string{"read"}, ma.modelFiles(ma.dir)...)
	localLoad := append([]string{"load"}, ma.modelFiles(ma.dir)...)
	drop()
	tr, err := runTool(ctx, toolPath, localRead...)
	if err != nil {
		b.Fatal(err)
	}
	paths = append(paths, newBenchPath("local-cold", "local file, cold",
		"the generated files on the host's disk (ext4), read by the tool on the host; clock from the reader's start; "+coldNote(true),
		tr.start, tr))
	localWarm := func(read, load readTrace) {
		paths = append(paths, newBenchPath("local-warm", "local file, warm",
			localNote("the generated files on the host's disk (ext4), read by the tool on the host; clock from the reader's start; page cache warm"),
			read.start, read))
		// The loader (header order, mmap) on the same files, warm: what the
		// loader on weightsnap's mount and the full pull's pull + load are
		// held to.
		paths = append(paths, newBenchPath("local-load-warm", "local file, warm, loader",
			localNote("tool load on the host: headers read, files mapped, one byte of every page of each tensor touched in header order; clock from the loader's start; page cache warm"),
			load.start, load))
	}
	if !keepLocal {
		read, err := runToolWarm(ctx, toolPath, localRead...)
		if err != nil {
			b.Fatal(err)
		}
		load, err := runToolWarm(ctx, toolPath, localLoad...)
		if err != nil {
			b.Fatal(err)
		}
		localWarm(read, load)
		// Model A's files are no longer needed: the full pull below makes
		// two copies of its own.
		if err := os.RemoveAll(ma.dir); err != nil {
			b.Fatal(err)
		}
	}

	// 3. A full pull through containerd's overlayfs snapshotter, then a
	// container of the model image reading it.
	disk.phase("overlayfs full pull")
	ctdBefore, err := containerdOnDisk(ctd)
	if err != nil {
		b.Fatal(err)
	}
	drop()
	t0 = time.Now()
	if _, err := ctd.ctr(b, ctx, "--namespace", benchNamespace, "images", "pull", "--snapshotter", "overlayfs",
		"--plain-http", "--hosts-dir", hosts, refA); err != nil {
		b.Fatal(err)
	}
	pulled := time.Now()
	out, err := ctd.ctr(b, ctx, append([]string{"--namespace", benchNamespace, "run", "--rm", "--snapshotter", "overlayfs",
		refA, "bench-overlay", "/tool", "read"}, ma.modelFiles("/")...)...)
	if err != nil {
		b.Fatal(err)
	}
	tr, err = parseToolOutput(strings.Split(out, "\n"))
	if err != nil {
		b.Fatal(err)
	}
	overlay := newBenchPath("overlayfs", "overlayfs full pull (ctr)",
		"ctr images pull (transfer service, unpack to overlayfs), then ctr run of the model image reading it; clock from the pull request; caches dropped",
		t0, tr)
	overlay.Steps = map[string]float64{"pull": round3(pulled.Sub(t0).Seconds()), "reader": round3(tr.start.Sub(t0).Seconds())}
	paths = append(paths, overlay)
	// Free the disk for the rest of the run: containerd's garbage
	// collection (--sync waits for it) removes the image's content and
	// its overlayfs snapshots.
	ctdPulled, err := containerdOnDisk(ctd)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := ctd.ctr(b, ctx, "--namespace", benchNamespace, "images", "rm", "--sync", refA); err != nil {
		b.Logf("removing the overlayfs image: %v", err)
	}
	ctdAfter, err := containerdOnDisk(ctd)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("containerd's content store and overlayfs snapshots: %s before the full pull, %s with its image, %s after its removal", mib(ctdBefore), mib(ctdPulled), mib(ctdAfter))
	if left := ctdAfter - ctdBefore; left > 16<<20 {
		diskNotes = append(diskNotes, fmt.Sprintf("the overlayfs full pull left %s in containerd's content store and snapshots", mib(left)))
	}

	// 4. weightsnap through CRI: pull, pod, image volume, read; the cache
	// empty and the page cache dropped.
	// kubelet creates the pod sandbox first and then pulls the image
	// volume; the clock starts at PullImage.
	disk.phase("weightsnap, model A: cold, warm, host, ctr run")
	drop()
	volFiles := ma.modelFiles("/models-volume")
	manager := ws.managerPID()
	if manager <= 0 {
		b.Fatal("no FUSE manager pid file")
	}
	r.CPU.ProbeCold = cpuProbe()
	man0 := cpuSeconds(b, manager)
	cpu := startCPUSampler(manager, reg.Pid())
	b.Cleanup(func() { cpu.halt() })
	cold, err := coldPod(b, ctx, ws, rt, is, logs, tools.Ref, "bench-a", refA, append([]string{"read"}, volFiles...), "chunks")
	if err != nil {
		b.Fatal(err)
	}
	wsCold := podPath("ws-cold", "weightsnap CRI, cold",
		fmt.Sprintf("RunPodSandbox, then (clock starts) CRI PullImage, CreateContainer with the image volume, StartContainer, tool read; weightsnap cache empty, caches dropped; %d of %d layers opened with their chunk table, every fetched range checked before it is served", cold.opened, len(layersA)),
		cold.pullStart, cold.pulled, cold.readerPod)
	paths = append(paths, wsCold)
	coldAt := len(paths) - 1
	gibA := float64(ma.size) / (1 << 30)
	if err := cpu.halt(); err != nil {
		b.Fatal(err)
	}
	read := cpu.since(cold.trace.done)
	r.CPU.Manager = round3(read[0] / gibA)
	r.CPU.Registry = round3(read[1] / gibA)
	r.CPU.Reader = round3(cold.trace.cpu.Seconds() / gibA)
	if r.PullTrace, err = tracePull(ws.log, cold.pullStart, cold.pulled); err != nil {
		b.Logf("tracing the cold pull: %v", err)
	}

	// 5. A second pod while everything is warm, and a third after the
	// page cache was dropped (weightsnap's cache holds the model on disk).
	// Both start once weightsnap has verified the layers the cold pod
	// read, when their large files are passed through to the cache.
	t0 = time.Now()
	if err := ws.waitVerified(ctx, weightDigests(layersA)); err != nil {
		b.Fatal(err)
	}
	step("layers verified after the cold read", t0)
	r.CPU.ManagerVerified = round3((cpuSeconds(b, manager) - man0) / gibA)
	for _, c := range []struct {
		key, name, note string
		drop            bool
	}{
		{"ws-warm", "weightsnap CRI, warm re-read", "a new pod (image present, no pull) once weightsnap has verified the layers (large files passed through); clock from RunPodSandbox; weightsnap cache and page cache warm", false},
		{"ws-cached", "weightsnap CRI, cache on disk", "a new pod (image present, no pull); clock from RunPodSandbox; weightsnap cache full, page cache dropped", true},
	} {
		if c.drop {
			drop()
		}
		opens, err := ws.metric(ctx, passthroughOpensSeries)
		if err != nil {
			b.Fatal(err)
		}
		// What the kernel was still writing to disk when the pod started:
		// the cache's data of the cold read, synced once its blob verified.
		dirty := dirtyBytes()
		p, err := runReaderPod(b, ctx, rt, logs, tools.Ref, "bench-b", c.key, refA, volFiles)
		if err != nil {
			b.Fatal(err)
		}
		removePod(b, rt, p.pod)
		after, err := ws.metric(ctx, passthroughOpensSeries)
		if err != nil {
			b.Fatal(err)
		}
		note := fmt.Sprintf("%s; %.0f file opens passed through; %s dirty or under writeback at its start", c.note, after-opens, gib(dirty))
		bp := podPath(c.key, c.name, note, p.sandboxStart, time.Time{}, p)
		paths = append(paths, bp)
	}
	// The same reader as "local file, warm", on the host, through
	// weightsnap's layer mounts: the one difference is the file system.
	hostFiles, err := filesInMounts(mountsUnder(b, ws.root), ma.modelFiles(""))
	if err != nil {
		b.Fatal(err)
	}
	opens, err := ws.metric(ctx, passthroughOpensSeries)
	if err != nil {
		b.Fatal(err)
	}
	hostRead := append([]string{"read"}, hostFiles...)
	hostLoad := append([]string{"load"}, hostFiles...)
	var localRun readTrace
	if keepLocal {
		localRun, tr, err = runToolWarmPair(ctx, toolPath, localRead, hostRead)
	} else {
		tr, err = runToolWarm(ctx, toolPath, hostRead...)
	}
	if err != nil {
		b.Fatal(err)
	}
	after, err := ws.metric(ctx, passthroughOpensSeries)
	if err != nil {
		b.Fatal(err)
	}
	// What the host paths' notes say of their runs.
	hostRuns := fmt.Sprintf("the median of %d runs", warmRuns)
	if keepLocal {
		hostRuns += ", taken in turn with the local file's, after one untimed run"
	}
	paths = append(paths, newBenchPath("ws-host-warm", "weightsnap mount, warm (host)",
		fmt.Sprintf("the layer mounts weightsnapd made for the image, read by the tool on the host as the local file; clock from the reader's start; page cache warm; %s; %.0f file opens passed through", hostRuns, after-opens),
		tr.start, tr))
	// And the loader, as on the local file.
	opens = after
	if keepLocal {
		var localLoadRun readTrace
		if localLoadRun, tr, err = runToolWarmPair(ctx, toolPath, localLoad, hostLoad); err != nil {
			b.Fatal(err)
		}
		localWarm(localRun, localLoadRun)
		if err := os.RemoveAll(ma.dir); err != nil {
			b.Fatal(err)
		}
	} else if tr, err = runToolWarm(ctx, toolPath, hostLoad...); err != nil {
		b.Fatal(err)
	}
	if after, err = ws.metric(ctx, passthroughOpensSeries); err != nil {
		b.Fatal(err)
	}
	paths = append(paths, newBenchPath("ws-host-load-warm", "weightsnap mount, warm, loader (host)",
		fmt.Sprintf("tool load on the host through weightsnapd's layer mounts, as local file, warm, loader; clock from the loader's start; page cache warm; %s; %.0f file opens passed through", hostRuns, after-opens),
		tr.start, tr))
	// The same container as the overlayfs path (ctr run, the model image
	// as root file system), on weightsnap's layers: the in-container
	// comparison without the difference between ctr and a CRI pod.
	if _, err := ctd.ctr(b, ctx, "--namespace", benchNamespace, "images", "pull", "--snapshotter", "weightsnap",
		"--plain-http", "--hosts-dir", hosts, refA); err != nil {
		b.Fatal(err)
	}
	if opens, err = ws.metric(ctx, passthroughOpensSeries); err != nil {
		b.Fatal(err)
	}
	out, err = ctd.ctr(b, ctx, append([]string{"--namespace", benchNamespace, "run", "--rm", "--snapshotter", "weightsnap",
		refA, "bench-ws-ctr", "/tool", "read"}, ma.modelFiles("/")...)...)
	if err != nil {
		b.Fatal(err)
	}
	if tr, err = parseToolOutput(strings.Split(out, "\n")); err != nil {
		b.Fatal(err)
	}
	if after, err = ws.metric(ctx, passthroughOpensSeries); err != nil {
		b.Fatal(err)
	}
	paths = append(paths, newBenchPath("ws-ctr-warm", "weightsnap ctr run, warm",
		fmt.Sprintf("ctr run of the model image on weightsnap's layers (image present), as the overlayfs path; clock from the reader's start; page cache warm; %.0f file opens passed through", after-opens),
		tr.start, tr))
	// Model A's paths are done: remove it (ctr's image, CRI's, the
	// registry's) and so its layers from weightsnap's cache.
	cachePoint("model A, read whole and verified")
	t0 = time.Now()
	remover.removeModel(ctx, refA, layersA, true)
	step("remove model A", t0)

	// 6. What the chunk table's checks cost a cold read: model C, of A's
	// size and shape but its own seed (none of it cached), pushed with the
	// chunk tables stripped from its manifest (the same blobs), read cold
	// as model A was. weightsnapd serves its layers before they verified
	// (benchUnverifiedLazy): no range is checked as it arrives, background
	// fill checks each blob whole.
	disk.phase("model C: generate, pack and push")
	t0 = time.Now()
	mc, err := writeBenchModel(ctx, filepath.Join(data, "c"), tool, cfg.size, cfg.shards, 3, "no-table")
	if err != nil {
		b.Fatal(err)
	}
	refC := reg.Addr + "/bench/model-no-table:c"
	layersC, err := packAndPush(ctx, mc, refC, withoutChunkTables)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.RemoveAll(mc.dir); err != nil {
		b.Fatal(err)
	}
	step("generate, pack and push the model without chunk tables", t0)
	disk.phase("weightsnap, model C: cold")
	drop()
	coldC, err := coldPod(b, ctx, ws, rt, is, logs, tools.Ref, "bench-c", refC, append([]string{"read"}, mc.modelFiles("/models-volume")...), "blob-lazy")
	if err != nil {
		b.Fatal(err)
	}
	if coldC.opened == 0 {
		b.Fatalf("no layer of %s was opened unverified (unverified_layers = lazy): the path would not measure reads without chunk tables", refC)
	}
	paths = slices.Insert(paths, coldAt+1, podPath("ws-cold-notable", "weightsnap CRI, cold, no chunk table",
		fmt.Sprintf("as weightsnap CRI, cold, for another model of the same size and shape pushed without chunk tables; weightsnapd's unverified_layers = \"lazy\": %d of %d layers opened unverified, served before their blob verified (background fill checks it whole); weightsnap cache empty for it, caches dropped", coldC.opened, len(layersC)),
		coldC.pullStart, coldC.pulled, coldC.readerPod))
	r.Verification = chunkVerification(paths, "ws-cold", "ws-cold-notable")
	// Its background fill ends before the next case starts.
	t0 = time.Now()
	if err := ws.waitVerified(ctx, weightDigests(layersC)); err != nil {
		b.Fatal(err)
	}
	step("layers without chunk tables verified after their cold read", t0)
	cachePoint("model C, read whole and verified")
	t0 = time.Now()
	remover.removeModel(ctx, refC, layersC, false)
	step("remove model C", t0)

	// 7. The loader, cold: as safetensors-based servers load (headers,
	// mmap, every tensor's pages in header order), from one thread and
	// from four as sharded loaders do. Each reads a model of A's size and
	// shape but its own seed, with chunk tables, so that nothing of it is
	// cached; its files are deleted once pushed, and it is removed once
	// verified.
	for i, c := range []struct {
		key, name string
		seed      uint64
		threads   int
	}{
		{"ws-cold-load", "weightsnap CRI, cold, loader (mmap, header order)", 4, 1},
		{"ws-cold-load4", "weightsnap CRI, cold, loader, 4 threads", 5, 4},
	} {
		disk.phase(c.key + ": generate, pack and push")
		t0 = time.Now()
		m, err := writeBenchModel(ctx, filepath.Join(data, c.key), tool, cfg.size, cfg.shards, c.seed, c.key)
		if err != nil {
			b.Fatal(err)
		}
		ref := fmt.Sprintf("%s/bench/model-%s:v1", reg.Addr, c.key)
		layers, err := packAndPush(ctx, m, ref)
		if err != nil {
			b.Fatal(err)
		}
		if err := os.RemoveAll(m.dir); err != nil {
			b.Fatal(err)
		}
		step("generate, pack and push the model for "+c.key, t0)
		disk.phase("weightsnap, " + c.key + ": cold")
		drop()
		args := append([]string{"load", "-threads", fmt.Sprint(c.threads)}, m.modelFiles("/models-volume")...)
		cl, err := coldPod(b, ctx, ws, rt, is, logs, tools.Ref, "bench-"+c.key, ref, args, "chunks")
		if err != nil {
			b.Fatal(err)
		}
		paths = slices.Insert(paths, coldAt+2+i, podPath(c.key, c.name,
			fmt.Sprintf("as weightsnap CRI, cold, for another model of the same size and shape (its own seed, nothing of it cached), the reader being tool load -threads %d: headers read, files mapped, one byte of every page of each tensor touched in header order, each thread taking the next tensor; %d of %d layers opened with their chunk table; caches dropped", c.threads, cl.opened, len(layers)),
			cl.pullStart, cl.pulled, cl.readerPod))
		// Its background fill ends before the next case starts.
		t0 = time.Now()
		if err := ws.waitVerified(ctx, weightDigests(layers)); err != nil {
			b.Fatal(err)
		}
		step("layers of "+c.key+" verified after their cold read", t0)
		cachePoint(c.key + ", read whole and verified")
		t0 = time.Now()
		remover.removeModel(ctx, ref, layers, false)
		step("remove the model for "+c.key, t0)
	}
	r.Paths = paths

	// 8. Eight pods in two namespaces through two tags of another model
	// (the same weights; the tags' manifests differ in config.json), its
	// layers new to weightsnap's cache, all at once.
	disk.phase("shared model: generate, pack and push")
	t0 = time.Now()
	var refsB []string
	var mb benchModel
	layersB := map[string]v1.Descriptor{}
	for i, tag := range []string{"v1", "v1-tuned"} {
		bdir := filepath.Join(data, "b")
		if i == 0 {
			if mb, err = writeBenchModel(ctx, bdir, tool, cfg.size, cfg.shards, 2, tag); err != nil {
				b.Fatal(err)
			}
		} else if err := rewriteVariant(filepath.Join(bdir, "models", "config.json"), tag); err != nil {
			b.Fatal(err)
		}
		ls, err := packAndPush(ctx, benchModel{dir: bdir}, reg.Addr+"/bench/shared:"+tag)
		if err != nil {
			b.Fatal(err)
		}
		for _, l := range ls {
			layersB[l.Digest.String()] = l
		}
		refsB = append(refsB, origin.Addr+"/bench/shared:"+tag)
	}
	if err := os.RemoveAll(filepath.Join(data, "b")); err != nil {
		b.Fatal(err)
	}
	step("generate, pack and push the shared model", t0)
	sharedLayers := slices.Collect(maps.Values(layersB))

	disk.phase("shared model: 8 pods")
	drop()
	beforeB := servedBytes(origin, sharedLayers)
	t0 = time.Now()
	for _, ref := range refsB {
		if _, err := is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: ref}}); err != nil {
			b.Fatalf("CRI PullImage %s: %v", ref, err)
		}
	}
	pulled = time.Now()
	namespaces := []string{"team-a", "team-b"}
	pods := make([]readerPod, 8)
	errs := make([]error, len(pods))
	var wg sync.WaitGroup
	for i := range pods {
		wg.Go(func() {
			ns, ref := namespaces[i%2], refsB[(i/2)%2]
			pods[i], errs[i] = runReaderPod(b, ctx, rt, logs, tools.Ref, ns, fmt.Sprintf("shared-%d", i), ref, mb.modelFiles("/models-volume"))
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	var firstMax, lastMax time.Duration
	var total int64
	for _, p := range pods {
		firstMax = max(firstMax, p.trace.first.Sub(t0))
		lastMax = max(lastMax, p.trace.done.Sub(t0))
		total += p.trace.bytes
		removePod(b, rt, p.pod)
	}
	r.Shared = benchShared{
		Pods: len(pods), Namespaces: namespaces, Refs: refsB,
		ModelBytes: layersSize(sharedLayers), RegistryBytes: servedBytes(origin, sharedLayers) - beforeB,
		PullS: round3(pulled.Sub(t0).Seconds()), FirstMiBMaxS: round3(firstMax.Seconds()), LastByteMaxS: round3(lastMax.Seconds()),
	}
	r.Shared.Ratio = round4(float64(r.Shared.RegistryBytes) / float64(r.Shared.ModelBytes))
	r.Shared.AggregateMBps = round3(float64(total) / lastMax.Seconds() / 1e6)

	// 9. Peak RSS of every weightsnap process, and the cache on disk:
	// what it still holds (the shared model, the tools image), and each
	// model as measured before its removal.
	var rssNotes []string
	peakRSS := func(pid int, what string) int64 {
		if pid <= 0 {
			rssNotes = append(rssNotes, "no pid of the "+what)
			return 0
		}
		v, err := vmHWM(pid)
		if err != nil {
			rssNotes = append(rssNotes, what+": "+err.Error())
		}
		return v
	}
	if ws.proc.cmd.Process != nil {
		r.RSS.WeightsnapdBytes = peakRSS(ws.proc.cmd.Process.Pid, "weightsnapd")
	}
	r.RSS.ManagerBytes = peakRSS(ws.managerPID(), "FUSE manager")
	r.RSS.HolderBytes = peakRSS(ws.holderPID(), "holder")
	r.RSS.Note = strings.Join(rssNotes, "; ")
	end, err := measureCache(cacheDir)
	if err != nil {
		b.Fatal(err)
	}
	cachePoints = append(cachePoints, benchCachePoint{When: "the end: the shared model read by 8 pods, the tools image", AllocatedBytes: end.allocated, DataBytes: end.present, Keys: end.keys, Ratio: end.ratio()})
	evicted, err := ws.metric(ctx, "weightsnap_cache_evicted_bytes_total")
	if err != nil {
		b.Fatal(err)
	}
	r.Cache = benchCache{Dir: cacheDir, AllocatedBytes: end.allocated, ApparentBytes: end.apparent, DataBytes: end.present, Ratio: end.ratio(), Keys: end.keys, Points: cachePoints, Bound: bound}
	for _, p := range cachePoints {
		r.Cache.MaxRatio = max(r.Cache.MaxRatio, p.Ratio)
	}
	r.Cache.Note = fmt.Sprintf("data: the bytes the cache's records hold, whole or not; at the end over what is still cached (%d keys), and before each model's removal over what was cached then; %s; weightsnap evicted %s at the removals (the removed models' weights layers: %s) and %s at other times (their other layers: %s)",
		end.keys, boundNote(bound), gib(remover.evicted), gib(remover.weights), gib(int64(evicted)-remover.evicted), gib(remover.others))

	r.Disk = disk.finish()
	if r.Model.ImageBytes > 0 {
		r.Disk.PeakPerImage = round3(float64(r.Disk.PeakBytes) / float64(r.Model.ImageBytes))
	}
	r.Disk.Note = strings.Join(append(diskNotes, r.Disk.Note), "; ")
	r.Disk.Note = strings.Trim(r.Disk.Note, "; ")

	r.DropCaches = "dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every cold case" + settle.note()
	r.DiskSettle = settle.waits
	if dropErr != nil {
		r.DropCaches = "NOT dropped, cold cases may have read from the page cache: " + dropErr.Error()
	}
	r.Targets = benchTargets(r)
	reportMetrics(b, r)
	writeTable(os.Stdout, r)
	jsonPath, svgPath, err := writeOutputs(cfg.out, r)
	if err != nil {
		b.Fatal(err)
	}
	fmt.Printf("wrote %s and %s\n", jsonPath, svgPath)
}

// benchTargets computes the targets from the result.
func benchTargets(r benchResult) []benchTarget {
	p := map[string]benchPath{}
	for _, x := range r.Paths {
		p[x.Key] = x
	}
	mib256 := float64(256 << 20)
	// What a full pull costs a loader: the pull and the container until
	// the reader started, then the load from a local file.
	fullPullLoad := p["overlayfs"].Steps["reader"] + p["local-load-warm"].LastByte
	overhead, floor := ttfrOverhead(p["ws-cold"], p["ws-warm"])
	return []benchTarget{
		atMost("time to first read, lazy overhead", "≤ 0.5 × stargz's", overhead, 0.5*stargzOverheadS,
			fmt.Sprintf("%.3f s: the cold pod's %.3f s from PullImage to the first MiB, minus the floor, %.3f s for a pod of an image on the node (container created, started, first MiB; warm re-read); stargz-snapshotter added %.3f s, measured side by side on this kind of machine (1 GiB), not in this run; the pull's trace is below",
				overhead, p["ws-cold"].FirstMiB, floor, stargzOverheadS)),
		atMost("time to first read", "≤ 0.02 × full pull's", p["ws-cold"].FirstMiB, 0.02*p["overlayfs"].FirstMiB,
			fmt.Sprintf("%.3f s vs %.2f s (%.4f×); weightsnap: pull %.2f s, pod and container until the reader ran %.2f s, first MiB %.3f s; overlayfs: pull %.2f s, container %.2f s; flatness in size needs runs at several sizes",
				p["ws-cold"].FirstMiB, p["overlayfs"].FirstMiB, p["ws-cold"].FirstMiB/p["overlayfs"].FirstMiB,
				p["ws-cold"].Steps["pull"], p["ws-cold"].Steps["reader"]-p["ws-cold"].Steps["pull"], p["ws-cold"].FirstMiB-p["ws-cold"].Steps["reader"],
				p["overlayfs"].Steps["pull"], p["overlayfs"].Steps["reader"]-p["overlayfs"].Steps["pull"])),
		atLeast("cold full read throughput", "≥ 0.8 × registry GET cold", p["ws-cold"].EndToEndMBps, 0.8*p["get-cold"].EndToEndMBps,
			fmt.Sprintf("%.0f vs %.0f MB/s (%.2f×), each bytes over the time from the pull request (the GET) to the last byte, since weightsnap fetches from the mount on; the reader alone saw %.0f MB/s. CPU s/GiB: weightsnap cold: FUSE manager %.2f (%.2f until verified), registry %.2f, reader %.2f, so at most %.0f MB/s on %d cores; the GET: registry %.2f, client %.2f; the cores hashed sha256 at %.2f GB/s before the GET, %.2f before the cold read",
				p["ws-cold"].EndToEndMBps, p["get-cold"].EndToEndMBps, p["ws-cold"].EndToEndMBps/p["get-cold"].EndToEndMBps, p["ws-cold"].ReadMBps,
				r.CPU.Manager, r.CPU.ManagerVerified, r.CPU.Registry, r.CPU.Reader, r.CPU.ceilingMBps(r.Machine.CPUs), r.Machine.CPUs, r.CPU.GetRegistry, r.CPU.GetClient, r.CPU.ProbeGet, r.CPU.ProbeCold)),
		atMost("cold time to last byte", "≤ full pull's", p["ws-cold"].LastByte, p["overlayfs"].LastByte,
			fmt.Sprintf("%.2f s vs %.2f s", p["ws-cold"].LastByte, p["overlayfs"].LastByte)),
		atLeast("warm re-read throughput", "≥ 0.9 × local file, warm", p["ws-host-warm"].ReadMBps, 0.9*p["local-warm"].ReadMBps,
			fmt.Sprintf("%.0f vs %.0f MB/s (%.2f×), the same reader on the host, page cache warm; in containers: weightsnap %.0f (CRI pod) and %.0f (ctr run), overlayfs %.0f MB/s (ctr run; %.2f×)",
				p["ws-host-warm"].ReadMBps, p["local-warm"].ReadMBps, p["ws-host-warm"].ReadMBps/p["local-warm"].ReadMBps,
				p["ws-warm"].ReadMBps, p["ws-ctr-warm"].ReadMBps, p["overlayfs"].ReadMBps, p["ws-ctr-warm"].ReadMBps/p["overlayfs"].ReadMBps)),
		atMost("cold load, header order", "≤ 1.1 × cold sequential read", p["ws-cold-load"].LastByte, 1.1*p["ws-cold"].LastByte,
			fmt.Sprintf("%.2f s vs %.2f s (%.2f×), each from PullImage to the last byte, different models of one size and shape; %.0f vs %.0f MB/s end to end",
				p["ws-cold-load"].LastByte, p["ws-cold"].LastByte, p["ws-cold-load"].LastByte/p["ws-cold"].LastByte, p["ws-cold-load"].EndToEndMBps, p["ws-cold"].EndToEndMBps)),
		atMost("cold load, 4 threads", "≤ 1.1 × cold sequential read", p["ws-cold-load4"].LastByte, 1.1*p["ws-cold"].LastByte,
			fmt.Sprintf("%.2f s vs %.2f s (%.2f×); %.0f vs %.0f MB/s end to end",
				p["ws-cold-load4"].LastByte, p["ws-cold"].LastByte, p["ws-cold-load4"].LastByte/p["ws-cold"].LastByte, p["ws-cold-load4"].EndToEndMBps, p["ws-cold"].EndToEndMBps)),
		atMost("cold load vs full pull + load", "≤ full pull's pull + load", p["ws-cold-load"].LastByte, fullPullLoad,
			fmt.Sprintf("%.2f s vs %.2f s: the full pull until its reader started (%.2f s) plus the loader on the local file, warm (%.2f s), as after an unpack; 4 threads: %.2f s",
				p["ws-cold-load"].LastByte, fullPullLoad, p["overlayfs"].Steps["reader"], p["local-load-warm"].LastByte, p["ws-cold-load4"].LastByte)),
		atMost("warm load", "≤ 1.1 × local file's", p["ws-host-load-warm"].LastByte, 1.1*p["local-load-warm"].LastByte,
			fmt.Sprintf("%.3f s vs %.3f s (%.2f×), %.0f vs %.0f MB/s, the loader on the host through weightsnap's mount (passthrough) and on the local file, page cache warm, the median of %d runs each",
				p["ws-host-load-warm"].LastByte, p["local-load-warm"].LastByte, p["ws-host-load-warm"].LastByte/p["local-load-warm"].LastByte,
				p["ws-host-load-warm"].ReadMBps, p["local-load-warm"].ReadMBps, warmRuns)),
		atMost("registry bytes, 8 pods", "≤ 1.02 × model", r.Shared.Ratio, 1.02,
			fmt.Sprintf("%s served for %s", gib(r.Shared.RegistryBytes), gib(r.Shared.ModelBytes))),
		atMost("cache on disk", "≤ 1.02 × data", max(r.Cache.Ratio, r.Cache.MaxRatio), 1.02,
			fmt.Sprintf("the most of %d measurements, each model's before its removal and the end's; at the end %s for %s (%.4f×), what is still cached",
				len(r.Cache.Points), gib(r.Cache.AllocatedBytes), gib(r.Cache.DataBytes), r.Cache.Ratio)),
		atMost("weightsnapd peak RSS, MiB", "≤ 256 MiB", float64(r.RSS.WeightsnapdBytes)/(1<<20), mib256/(1<<20),
			fmt.Sprintf("streaming %s, not 16 GiB", gib(r.Model.WeightsBytes))),
		atMost("FUSE manager peak RSS, MiB", "≤ 256 MiB", float64(r.RSS.ManagerBytes)/(1<<20), mib256/(1<<20),
			"the process serving FUSE and fetching"),
		atMost("holder peak RSS, MiB", "≤ 256 MiB", float64(r.RSS.HolderBytes)/(1<<20), mib256/(1<<20),
			"the process keeping the mounts' FUSE connections"),
	}
}

// reportMetrics reports the headline numbers as benchmark metrics.
func reportMetrics(b *testing.B, r benchResult) {
	for _, p := range r.Paths {
		b.ReportMetric(p.FirstMiB, p.Key+"-first-MiB-s")
		b.ReportMetric(p.LastByte, p.Key+"-last-byte-s")
		b.ReportMetric(p.ReadMBps, p.Key+"-read-MB/s")
		b.ReportMetric(p.EndToEndMBps, p.Key+"-e2e-MB/s")
	}
	if r.Verification.Ratio > 0 {
		b.ReportMetric(r.Verification.Ratio, "cold-e2e-chunk-table/none")
	}
	b.ReportMetric(r.Shared.Ratio, "8pods-registry-bytes/model")
	b.ReportMetric(r.Cache.Ratio, "cache-bytes/data")
	b.ReportMetric(float64(r.RSS.WeightsnapdBytes)/(1<<20), "weightsnapd-peak-RSS-MiB")
	b.ReportMetric(float64(r.RSS.ManagerBytes)/(1<<20), "fuse-manager-peak-RSS-MiB")
	b.ReportMetric(float64(r.RSS.HolderBytes)/(1<<20), "holder-peak-RSS-MiB")
	b.ReportMetric(float64(r.Disk.PeakBytes)/(1<<30), "disk-peak-GiB")
}

// podPath fills a benchPath for a reader pod, its clock from origin; a
// non-zero pulled adds the pull as a step.
func podPath(key, name, note string, origin, pulled time.Time, p readerPod) benchPath {
	bp := newBenchPath(key, name, note, origin, p.trace)
	sec := func(t time.Time) float64 { return round3(t.Sub(origin).Seconds()) }
	bp.Steps = map[string]float64{"sandbox": sec(p.sandboxReady), "created": sec(p.created), "started": sec(p.started), "reader": sec(p.trace.start)}
	if !pulled.IsZero() {
		bp.Steps["pull"] = sec(pulled)
	}
	return bp
}

func coldNote(cold bool) string {
	if cold {
		return "caches dropped"
	}
	return "right after the cold one, page cache warm"
}

// weightDigests returns the digests of the layers holding a
// *.safetensors file, in manifest order.
func weightDigests(layers []v1.Descriptor) []string {
	var ds []string
	for _, l := range weightLayers(layers) {
		ds = append(ds, l.Digest.String())
	}
	return ds
}

func layersSize(layers []v1.Descriptor) int64 {
	var n int64
	for _, l := range layers {
		n += l.Size
	}
	return n
}

// filesInMounts returns, for each path relative to a layer's root, where
// it is found under one of mounts.
func filesInMounts(mounts, rels []string) ([]string, error) {
	var out []string
	for _, rel := range rels {
		found := ""
		for _, mp := range mounts {
			if _, err := os.Stat(filepath.Join(mp, rel)); err == nil {
				found = filepath.Join(mp, rel)
				break
			}
		}
		if found == "" {
			return nil, fmt.Errorf("%s is in none of weightsnapd's mounts %v", rel, mounts)
		}
		out = append(out, found)
	}
	return out, nil
}

// passthroughOpensSeries is the series counting opens the kernel passes through.
const passthroughOpensSeries = `weightsnap_file_opens_total{mode="passthrough"}`

// servedBytes sums what the proxy has served of the layers' blobs.
func servedBytes(p *testutil.Proxy, layers []v1.Descriptor) int64 {
	var n int64
	for _, l := range layers {
		n += p.BlobBytes(l.Digest.String())
	}
	return n
}

// rewriteVariant rewrites the variant in a generated config.json, which
// makes a second image of the same weights.
func rewriteVariant(path, variant string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	i := strings.Index(string(b), `"weightsnap_bench_variant": "`)
	if i < 0 {
		return fmt.Errorf("%s: no variant", path)
	}
	j := i + len(`"weightsnap_bench_variant": "`)
	k := strings.IndexByte(string(b[j:]), '"')
	out := string(b[:j]) + variant + string(b[j+k:])
	return os.WriteFile(path, []byte(out), 0o644)
}

func round4(v float64) float64 { return float64(int64(v*10000+0.5)) / 10000 }

func gibString(n int64) string {
	if n%(1<<30) == 0 {
		return fmt.Sprintf("%dGiB", n>>30)
	}
	return fmt.Sprintf("%dMiB", n>>20)
}

// TestBenchModelIsValidSafetensors checks the benchmark's generated model:
// exact sizes, parseable headers whose tensors tile the data, non-zero
// data, and an index naming every tensor's shard.
func TestBenchModelIsValidSafetensors(t *testing.T) {
	const size = 3<<20 + 12345
	m, err := writeBenchModel(t.Context(), t.TempDir(), []byte("tool"), size, 2, 9, "x")
	if err != nil {
		t.Fatal(err)
	}
	if len(m.weights) != 2 || filepath.Base(m.weights[1]) != "model-00002-of-00002.safetensors" {
		t.Fatalf("weights files %v", m.weights)
	}
	var total int64
	shardOf := map[string]string{}
	for _, w := range m.weights {
		b, err := os.ReadFile(filepath.Join(m.dir, w))
		if err != nil {
			t.Fatal(err)
		}
		total += int64(len(b))
		n := int64(binary.LittleEndian.Uint64(b[:8]))
		var hdr map[string]json.RawMessage
		if err := json.Unmarshal(b[8:8+n], &hdr); err != nil {
			t.Fatalf("%s: header: %v", w, err)
		}
		var spans [][2]int64
		for name, raw := range hdr {
			if name == "__metadata__" {
				continue
			}
			var ts stTensor
			if err := json.Unmarshal(raw, &ts); err != nil {
				t.Fatalf("%s: tensor %s: %v", w, name, err)
			}
			elems := int64(1)
			for _, d := range ts.Shape {
				elems *= d
			}
			if width := map[string]int64{"BF16": 2, "U8": 1}[ts.Dtype]; elems*width != ts.Offsets[1]-ts.Offsets[0] {
				t.Errorf("%s: tensor %s: %s%v does not fill %v", w, name, ts.Dtype, ts.Shape, ts.Offsets)
			}
			spans = append(spans, ts.Offsets)
			shardOf[name] = filepath.Base(w)
		}
		slices.SortFunc(spans, func(a, b [2]int64) int { return int(a[0] - b[0]) })
		end := int64(0)
		for _, s := range spans {
			if s[0] != end {
				t.Errorf("%s: tensors leave a gap or overlap at %d", w, end)
			}
			end = s[1]
		}
		if data := b[8+n:]; end != int64(len(data)) {
			t.Errorf("%s: tensors cover %d of %d data bytes", w, end, len(data))
		} else if i := bytes.IndexByte(data, 0); i >= 0 {
			t.Errorf("%s: zero byte at data offset %d", w, i)
		}
	}
	if total != size {
		t.Errorf("weights files hold %d bytes, want %d", total, size)
	}
	var index struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	b, err := os.ReadFile(filepath.Join(m.dir, "models", "model.safetensors.index.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &index); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(index.WeightMap, shardOf) {
		t.Errorf("index weight_map %v, want %v", index.WeightMap, shardOf)
	}
	if len(m.modelFiles("/v")) != 5 { // config, index, tokenizer, 2 shards
		t.Errorf("model files %v", m.modelFiles("/v"))
	}
}

// TestSafetensorsHeaderIsInDataOrder checks the generated header against
// the layout the safetensors library writes: the header lists the tensors
// in the order of their data, which tile it, BF16 ones sorted by name
// (model.layers.10 before model.layers.2) and the U8 remainder last.
func TestSafetensorsHeaderIsInDataOrder(t *testing.T) {
	const tensor = 1 << 10
	size := int64(12*tensor + 300 + 4096) // the header takes the rest
	hdr, names, err := safetensorsHeader(size, tensor, 0)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(hdr))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("header starts with %v, %v", tok, err)
	}
	var order []string
	var end int64
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatal(err)
		}
		name := tok.(string)
		if name == "__metadata__" {
			var md map[string]string
			if err := dec.Decode(&md); err != nil || md["format"] != "pt" {
				t.Fatalf("metadata %v, %v", md, err)
			}
			continue
		}
		var ts stTensor
		if err := dec.Decode(&ts); err != nil {
			t.Fatal(err)
		}
		if ts.Offsets[0] != end {
			t.Fatalf("tensor %s at %v, want it to start at %d: header order is not data order", name, ts.Offsets, end)
		}
		end = ts.Offsets[1]
		order = append(order, name+" "+ts.Dtype)
	}
	if want := size - 8 - int64(len(hdr)); end != want {
		t.Fatalf("tensors cover %d data bytes, want %d", end, want)
	}
	if len(order) != len(names) || len(order) < 12 {
		t.Fatalf("header order %v, names %v", order, names)
	}
	for i, n := range names[:len(names)-1] {
		if order[i] != n+" BF16" {
			t.Fatalf("header entry %d is %s, want %s BF16", i, order[i], n)
		}
	}
	if !slices.IsSorted(names[:len(names)-1]) || names[1] != "model.layers.1.mlp.weight" || names[2] != "model.layers.10.mlp.weight" {
		t.Fatalf("BF16 tensors not in the library's name order: %v", names)
	}
	if last := order[len(order)-1]; last != names[len(names)-1]+" U8" {
		t.Fatalf("last entry %s, want the U8 remainder", last)
	}
}

// TestBenchCPUProbe checks that the probe measures something and that the
// cold read's note gives both probes.
func TestBenchCPUProbe(t *testing.T) {
	if p := cpuProbe(); !(p > 0) || math.IsInf(p, 0) {
		t.Fatalf("cpuProbe() = %v GB/s", p)
	}
	r := benchResult{CPU: benchCPU{ProbeGet: 1.234, ProbeCold: 0.567}}
	for _, tg := range benchTargets(r) {
		if tg.Name == "cold full read throughput" {
			if !strings.Contains(tg.Note, "sha256 at 1.23 GB/s before the GET, 0.57 before the cold read") {
				t.Fatalf("note %q gives no probes", tg.Note)
			}
			return
		}
	}
	t.Fatal("no cold read target")
}
