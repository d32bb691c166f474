package integration

// What one benchmark run measured, and against which targets.

import (
	"crypto/sha256"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// benchMachine describes where the benchmark ran.
type benchMachine struct {
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpu_model"`
	MemBytes  int64  `json:"mem_bytes"`
	Kernel    string `json:"kernel"`
	OS        string `json:"os"`
	GoVersion string `json:"go"`
}

func machineInfo() benchMachine {
	m := benchMachine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	m.MemBytes = meminfo()["MemTotal"]
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for l := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for l := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	return m
}

// benchPath is the result of reading the model one way.
type benchPath struct {
	Key  string `json:"key"`
	Name string `json:"name"`
	// Note says what the clock starts at and what was cached.
	Note string `json:"note"`
	// Steps are times of the steps before the read (pull, sandbox, …),
	// in seconds from the path's start.
	Steps map[string]float64 `json:"steps_s,omitempty"`
	// FirstMiB, Headers and LastByte are seconds from the path's start to
	// the first MiB of the first weights file, every header and small file,
	// and the last byte of the weights.
	FirstMiB float64 `json:"first_mib_s"`
	Headers  float64 `json:"headers_s,omitempty"`
	LastByte float64 `json:"last_byte_s"`
	Bytes    int64   `json:"bytes"`
	// ReadMBps is Bytes over the read itself (from the reader's start to
	// its last byte), in MB/s.
	ReadMBps float64 `json:"read_MBps"`
	// EndToEndMBps is Bytes over LastByte, in MB/s.
	EndToEndMBps float64      `json:"end_to_end_MBps"`
	Series       []benchPoint `json:"series"`
}

// newBenchPath fills a benchPath from a trace whose clock starts at origin.
func newBenchPath(key, name, note string, origin time.Time, tr readTrace) benchPath {
	sec := func(t time.Time) float64 {
		if t.IsZero() {
			return 0
		}
		return round3(t.Sub(origin).Seconds())
	}
	return benchPath{
		Key: key, Name: name, Note: note,
		FirstMiB: sec(tr.first), Headers: sec(tr.headers), LastByte: sec(tr.done),
		Bytes: tr.bytes, ReadMBps: math.Round(tr.readMBps()), Series: tr.series(origin),
		EndToEndMBps: math.Round(float64(tr.bytes) / tr.done.Sub(origin).Seconds() / 1e6),
	}
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

// benchTarget is one of the targets, measured, not asserted.
type benchTarget struct {
	Name  string  `json:"name"`
	Want  string  `json:"want"`
	Value float64 `json:"value"`
	Limit float64 `json:"limit"`
	Pass  bool    `json:"pass"`
	Note  string  `json:"note,omitempty"`
}

// atMost and atLeast build a target for value against limit.
func atMost(name, want string, value, limit float64, note string) benchTarget {
	return benchTarget{Name: name, Want: want, Value: value, Limit: limit, Pass: value <= limit, Note: note}
}

func atLeast(name, want string, value, limit float64, note string) benchTarget {
	return benchTarget{Name: name, Want: want, Value: value, Limit: limit, Pass: value >= limit, Note: note}
}

// benchResult is bench.json.
type benchResult struct {
	Time       string         `json:"time"`
	Command    string         `json:"command"`
	Machine    benchMachine   `json:"machine"`
	Model      benchModelInfo `json:"model"`
	DropCaches string         `json:"drop_caches"`
	// DiskSettle is how long the disk was slow before each cold case
	// (bench_settle_test.go), in seconds.
	DiskSettle []float64          `json:"disk_settle_s,omitempty"`
	Paths      []benchPath        `json:"paths"`
	Shared     benchShared        `json:"shared"`
	RSS        benchRSS           `json:"rss"`
	Cache      benchCache         `json:"cache"`
	Disk       benchDisk          `json:"disk"`
	Targets    []benchTarget      `json:"targets"`
	Setup      map[string]float64 `json:"setup_s"`
	// Verification is what checking ranges against chunk tables costs.
	Verification benchVerification `json:"chunk_verification"`
	// PullTrace is where the cold pull's time went (ws-cold).
	PullTrace pullTrace `json:"pull_trace"`
	// CPU is what the cold read and the cold GET cost each process.
	CPU benchCPU `json:"cpu"`
}

// benchCPU is the CPU time (user and system) the cold paths cost each
// process, in seconds per GiB of weights.
type benchCPU struct {
	// GetRegistry and GetClient: the registry serving the cold GET, and
	// the benchmark process receiving it.
	GetRegistry float64 `json:"get_registry_s_per_gib"`
	GetClient   float64 `json:"get_client_s_per_gib"`
	// Manager, Registry and Reader: weightsnapd's FUSE manager, the
	// registry and the reader in the pod, from PullImage until the
	// reader's last byte (weightsnap cold; cpuSampler).
	Manager  float64 `json:"manager_s_per_gib"`
	Registry float64 `json:"registry_s_per_gib"`
	Reader   float64 `json:"reader_s_per_gib"`
	// ManagerVerified is the FUSE manager's until the layers verified:
	// with the hash of the whole blob after the read.
	ManagerVerified float64 `json:"manager_verified_s_per_gib"`
	// ProbeGet and ProbeCold are how fast the machine's cores ran a
	// fixed piece of work (cpuProbe) just before the cold GET and the
	// cold read.
	ProbeGet  float64 `json:"probe_get_gb_per_s"`
	ProbeCold float64 `json:"probe_cold_gb_per_s"`
}

// cpuProbe returns how fast the machine hashes right now on all its
// cores at once, in GB/s of sha256, the best of three tries. On a shared
// host the work a core does per second changes from run to run, and every
// process's CPU seconds per GiB of a cold read move with it; work left
// running from an earlier phase slows it too. The probe tells a slow run
// from a slow change.
func cpuProbe() float64 {
	buf := make([]byte, 32<<20) // what each core hashes
	best := 0.0
	for range 3 {
		var wg sync.WaitGroup
		t0 := time.Now()
		for range runtime.NumCPU() {
			wg.Go(func() { sha256.Sum256(buf) })
		}
		wg.Wait()
		gbps := float64(runtime.NumCPU()*len(buf)) / time.Since(t0).Seconds() / 1e9
		best = max(best, gbps)
	}
	return round3(best)
}

// ceilingMBps is the fastest the cold read could go if the machine's
// cores did nothing but its work: cores over the CPU seconds per GiB of
// the three processes, in MB/s.
func (c benchCPU) ceilingMBps(cores int) float64 {
	sum := c.Manager + c.Registry + c.Reader
	if sum <= 0 {
		return 0
	}
	return float64(cores) / sum * (1 << 30) / 1e6
}

type benchModelInfo struct {
	WeightsBytes int64    `json:"weights_bytes"`
	Shards       int      `json:"shards"`
	Files        []string `json:"files"`
	ImageBytes   int64    `json:"image_bytes"` // all layers
	Layers       int      `json:"layers"`
	Ref          string   `json:"ref"`
}

// benchShared is the many-pods case: pods in namespaces reading a model
// through two tags (manifests that differ only in config.json).
type benchShared struct {
	Pods          int      `json:"pods"`
	Namespaces    []string `json:"namespaces"`
	Refs          []string `json:"refs"`
	ModelBytes    int64    `json:"model_bytes"` // distinct layers of both tags
	RegistryBytes int64    `json:"registry_bytes"`
	Ratio         float64  `json:"ratio"`
	PullS         float64  `json:"pull_s"`
	FirstMiBMaxS  float64  `json:"first_mib_max_s"`
	LastByteMaxS  float64  `json:"last_byte_max_s"`
	AggregateMBps float64  `json:"aggregate_read_MBps"`
}

type benchRSS struct {
	WeightsnapdBytes int64  `json:"weightsnapd_vmhwm_bytes"`
	ManagerBytes     int64  `json:"fuse_manager_vmhwm_bytes"`
	HolderBytes      int64  `json:"holder_vmhwm_bytes"`
	Note             string `json:"note,omitempty"`
}

// benchCache is weightsnap's cache on disk at the end of the run, over
// what it still holds, and at each point it was measured.
type benchCache struct {
	Dir            string            `json:"dir"`
	AllocatedBytes int64             `json:"allocated_bytes"`
	ApparentBytes  int64             `json:"apparent_bytes"`
	DataBytes      int64             `json:"data_bytes"`
	Ratio          float64           `json:"ratio"`
	Keys           int               `json:"keys"`
	Points         []benchCachePoint `json:"points,omitempty"`
	MaxRatio       float64           `json:"max_ratio"`
	// Bound is the cache's byte bound in the run (benchCacheBound), 0
	// for none.
	Bound int64  `json:"bound_bytes"`
	Note  string `json:"note,omitempty"`
}

// benchVerification compares the cold CRI path (a chunk table on every
// layer: each fetched range checked before it is served) with the same
// path for a model of the same shape without tables, which weightsnapd
// serves unchecked (unverified_layers = "lazy"), in the same run.
type benchVerification struct {
	WithPath    string `json:"with_table_path"`
	WithoutPath string `json:"without_table_path"`
	// ColdMBps and ColdMBpsWithout are the paths' end-to-end MB/s (bytes
	// over the time from PullImage to the last byte); Ratio is their
	// quotient, with over without.
	ColdMBps        float64 `json:"cold_e2e_MBps"`
	ColdMBpsWithout float64 `json:"cold_e2e_MBps_without_table"`
	Ratio           float64 `json:"ratio"`
	// FirstMiBS and FirstMiBSWithout are the seconds from PullImage to the
	// first MiB read.
	FirstMiBS        float64 `json:"first_mib_s"`
	FirstMiBSWithout float64 `json:"first_mib_s_without_table"`
}

// chunkVerification compares the paths keyed with and without in paths;
// the zero value if either is missing.
func chunkVerification(paths []benchPath, with, without string) benchVerification {
	var w, wo *benchPath
	for i := range paths {
		switch paths[i].Key {
		case with:
			w = &paths[i]
		case without:
			wo = &paths[i]
		}
	}
	if w == nil || wo == nil {
		return benchVerification{}
	}
	v := benchVerification{
		WithPath: with, WithoutPath: without,
		ColdMBps: w.EndToEndMBps, ColdMBpsWithout: wo.EndToEndMBps,
		FirstMiBS: w.FirstMiB, FirstMiBSWithout: wo.FirstMiB,
	}
	if wo.EndToEndMBps > 0 {
		v.Ratio = round3(w.EndToEndMBps / wo.EndToEndMBps)
	}
	return v
}

// dirtyBytes is the page cache waiting for or under writeback
// (/proc/meminfo Dirty + Writeback); 0 if unknown.
func dirtyBytes() int64 {
	mi := meminfo()
	return mi["Dirty"] + mi["Writeback"]
}

// meminfo is /proc/meminfo by key, sizes in bytes; empty if unreadable.
func meminfo() map[string]int64 {
	m := map[string]int64{}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return m
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		v, kB := strings.CutSuffix(strings.TrimSpace(v), " kB")
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			continue
		}
		if kB {
			n <<= 10
		}
		m[k] = n
	}
	return m
}
