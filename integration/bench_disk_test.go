package integration

// BenchmarkModelPull's disk and memory: a sampler of the used bytes of
// the file systems holding its directories, by phase, and the peak RSS of
// weightsnap's processes.

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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
