package integration

// BenchmarkColdRead is the cold full read of the bench, small enough to
// profile: a generated model (one uncompressed layer with a chunk table)
// on Debian's docker-registry, read whole by dd through a lazy mount in
// this process after the page cache is dropped, next to a raw GET of the
// same blob by curl. It reports MB/s of both and the CPU seconds per GiB
// of this process (the FUSE server), the registry and the reader; with
// the bench's own reader (WEIGHTSNAP_COLD_READER below), its MB/s by
// quarter of the bytes read too.
//
//	sudo go test ./integration -run '^$' -bench BenchmarkColdRead -benchtime 3x
//	  WEIGHTSNAP_COLD_SIZE=2GiB  WEIGHTSNAP_COLD_PROFILE=/tmp/cold.pprof
//	  WEIGHTSNAP_COLD_READER=load (the bench's loader: mmap, tensors in
//	  header order) or read (its sequential reader) instead of dd, which
//	  reads the first *.safetensors file; WEIGHTSNAP_COLD_SHARDS=4;
//	  WEIGHTSNAP_COLD_THREADS=4 (the loader's threads)

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/bytesize"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/prefetch"
	"github.com/weightsnap/weightsnap/remote"
)

func BenchmarkColdRead(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root (FUSE, drop_caches)")
	}
	testutil.RequireFUSE(b)
	size := int64(1 << 30)
	if v := os.Getenv("WEIGHTSNAP_COLD_SIZE"); v != "" {
		n, err := bytesize.Parse(v)
		if err != nil {
			b.Fatal(err)
		}
		size = n
	}
	ctx := b.Context()
	dir := b.TempDir()
	useDiskProbe(b, dir)
	reg := testutil.StartRegistry(b)
	shards := 1
	if v := os.Getenv("WEIGHTSNAP_COLD_SHARDS"); v != "" {
		var err error
		if shards, err = strconv.Atoi(v); err != nil || shards < 1 {
			b.Fatalf("WEIGHTSNAP_COLD_SHARDS=%q: want a positive count", v)
		}
	}
	m, err := writeBenchModel(ctx, filepath.Join(dir, "model"), []byte("#!/bin/true\n"), size, shards, 1, "cold")
	if err != nil {
		b.Fatal(err)
	}
	ref := reg.Addr + "/bench/cold:v1"
	layers, err := packAndPush(ctx, m, ref)
	if err != nil {
		b.Fatal(err)
	}
	os.RemoveAll(filepath.Join(dir, "model", "models"))
	var weights v1.Descriptor
	for _, l := range layers {
		if l.Size > weights.Size {
			weights = l
		}
	}

	// The reader's command line for the mount at target, and the bytes
	// it reads.
	reader, readBytes := func(target string) []string {
		return []string{"dd", "if=" + filepath.Join(target, m.weights[0]), "of=/dev/null", "bs=1M", "status=none"}
	}, size/int64(shards)
	if v := os.Getenv("WEIGHTSNAP_COLD_READER"); v != "" && v != "dd" {
		tool := toolBinary(b)
		args := []string{tool, v}
		if t := os.Getenv("WEIGHTSNAP_COLD_THREADS"); t != "" && v == "load" {
			args = append(args, "-threads", t)
		}
		reader, readBytes = func(target string) []string {
			return append(slices.Clone(args), m.modelFiles(target)...)
		}, size
	}
	for i := range b.N {
		b.StopTimer()
		raw := coldGet(b, reg, "bench/cold", weights.Digest.String())
		lz := coldLazy(b, reg, ref, filepath.Join(dir, fmt.Sprint("run", i)), reader, readBytes, i)
		b.Logf("run %d: raw GET %.0f MB/s (curl %.2f, registry %.2f CPU-s/GiB); lazy %.0f MB/s = %.2fx (daemon %.2f [to verified %.2f], registry %.2f, reader %.2f CPU-s/GiB)",
			i, raw.mbps, raw.reader, raw.registry, lz.mbps, lz.mbps/raw.mbps, lz.daemon, lz.daemonAll, lz.registry, lz.reader)
		b.ReportMetric(lz.mbps/raw.mbps, "ratio")
		b.ReportMetric(lz.mbps, "lazyMB/s")
		b.ReportMetric(raw.mbps, "rawMB/s")
		b.ReportMetric(lz.daemon, "daemonCPUs/GiB")
		b.ReportMetric(lz.registry, "regCPUs/GiB")
	}
}

type coldResult struct {
	mbps                                float64
	daemon, daemonAll, registry, reader float64 // CPU seconds per GiB
}

// cpuSeconds is utime+stime of pid (0: this process).
func cpuSeconds(b *testing.B, pid int) float64 {
	v, err := procCPUSeconds(pid)
	if err != nil {
		b.Fatal(err)
	}
	return v
}

func coldGet(b *testing.B, reg *testutil.Registry, repo, dgst string) coldResult {
	if err := dropCaches(); err != nil {
		b.Fatal(err)
	}
	r0 := cpuSeconds(b, reg.Pid())
	t0 := time.Now()
	cmd := exec.Command("curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", reg.URL()+"/v2/"+repo+"/blobs/"+dgst)
	out, err := cmd.Output()
	if err != nil {
		b.Fatalf("curl: %v", err)
	}
	d := time.Since(t0)
	n, _ := strconv.ParseFloat(string(out), 64)
	gib := n / (1 << 30)
	ps := cmd.ProcessState
	return coldResult{
		mbps:     n / d.Seconds() / 1e6,
		registry: (cpuSeconds(b, reg.Pid()) - r0) / gib,
		reader:   (ps.UserTime() + ps.SystemTime()).Seconds() / gib,
	}
}

// coldLazy mounts ref lazily in this process, drops the page cache and
// runs the command reader gives for the mount, which reads readBytes.
func coldLazy(b *testing.B, reg *testutil.Registry, ref, dir string, reader func(target string) []string, readBytes int64, i int) coldResult {
	ctx, cancel := context.WithTimeout(b.Context(), 5*time.Minute)
	defer cancel()
	// The disk settles before the mount, whose layers' fill would start
	// during the wait; the page cache is dropped again after it.
	if err := dropCaches(); err != nil {
		b.Fatal(err)
	}
	n, done := coldNode(b, dir)
	defer done()
	target := filepath.Join(dir, "merged")
	im, err := n.MountImage(ctx, ref, target, filepath.Join(dir, "layers"))
	if err != nil {
		b.Fatal(err)
	}
	defer im.Unmount()
	if err := dropPageCache(); err != nil {
		b.Fatal(err)
	}
	// The profile covers the timed read only, not the hash after it.
	stopProfile := func() {}
	if p := os.Getenv("WEIGHTSNAP_COLD_PROFILE"); p != "" {
		f, err := os.Create(fmt.Sprintf("%s.%d", p, i))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		pprof.StartCPUProfile(f)
		stopProfile = pprof.StopCPUProfile
		defer stopProfile()
	}
	d0, r0 := cpuSeconds(b, 0), cpuSeconds(b, reg.Pid())
	t0 := time.Now()
	args := reader(target)
	cmd := exec.Command(args[0], args[1:]...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("%s: %v: %s", args[0], err, out)
	}
	if tr, err := parseToolOutput(strings.Split(string(out), "\n")); err == nil {
		// Where the read slowed: this VM's memory once the host has
		// taken it back costs more to touch (README).
		b.Logf("run %d: the reader's MB/s by quarter of its bytes: %s", i, quarterRates(tr))
	}
	d := time.Since(t0)
	d1, r1 := cpuSeconds(b, 0), cpuSeconds(b, reg.Pid())
	stopProfile()
	// The background fill and the whole-blob hash after the read.
	d2 := coldSettle(b)
	gib := float64(readBytes) / (1 << 30)
	ps := cmd.ProcessState
	return coldResult{
		mbps:      float64(readBytes) / d.Seconds() / 1e6,
		daemon:    (d1 - d0) / gib,
		daemonAll: (d2 - d0) / gib,
		registry:  (r1 - r0) / gib,
		reader:    (ps.UserTime() + ps.SystemTime()).Seconds() / gib,
	}
}

// coldSettle waits until this process stops using CPU (its background
// fill and whole-blob hash are over), at most 30 s, and returns its CPU
// seconds then.
func coldSettle(b *testing.B) float64 {
	last := cpuSeconds(b, 0)
	for range 150 {
		time.Sleep(200 * time.Millisecond)
		now := cpuSeconds(b, 0)
		if now-last < 0.02 {
			return now
		}
		last = now
	}
	return last
}

// coldNode is a Manager with weightsnapd's defaults over a cache in dir.
func coldNode(b *testing.B, dir string) (*lazy.Manager, func()) {
	store, err := cache.Open(filepath.Join(dir, "cache"))
	if err != nil {
		b.Fatal(err)
	}
	var opts []lazy.Option
	if v := os.Getenv("WEIGHTSNAP_COLD_SPAN"); v != "" {
		n, err := bytesize.Parse(v)
		if err != nil {
			b.Fatal(err)
		}
		opts = append(opts, lazy.WithPrefetch(prefetch.WithSpanSize(n)))
	}
	if v := os.Getenv("WEIGHTSNAP_COLD_AHEAD"); v != "" {
		n, err := bytesize.Parse(v)
		if err != nil {
			b.Fatal(err)
		}
		opts = append(opts, lazy.WithMaxReadAhead(n))
	}
	if os.Getenv("WEIGHTSNAP_COLD_NOFILL") != "" {
		opts = append(opts, lazy.WithBackgroundFill(false))
	}
	m := lazy.New(store, remote.New(remote.WithPlainHTTP(true)), opts...)
	return m, func() {
		m.Close()
		store.Close()
		os.RemoveAll(dir)
	}
}

// quarterRates is the throughput of each quarter of a read's bytes, in
// MB/s, from the reader's progress lines.
func quarterRates(tr readTrace) string {
	pts := tr.series(tr.start)
	var rates []string
	last := benchPoint{0, 0}
	for q := 1; q <= 4; q++ {
		want := float64(tr.bytes) * float64(q) / 4
		for _, p := range pts {
			if p[1] >= want {
				if p[0] > last[0] {
					rates = append(rates, fmt.Sprintf("%.0f", (p[1]-last[1])/(p[0]-last[0])/1e6))
				}
				last = p
				break
			}
		}
	}
	return strings.Join(rates, " / ")
}
