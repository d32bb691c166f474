package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// cpuSampleEvery is how often a cpuSampler reads its processes' CPU time:
// at 2 cores, a cut is off by at most 0.04 CPU seconds per process.
const cpuSampleEvery = 20 * time.Millisecond

// cpuSampler records the CPU seconds of processes every cpuSampleEvery,
// so that a phase's CPU can be cut at a moment known only afterwards: the
// last byte of a reader in a pod, which the pod reports once it exited.
// Without it a pod's window takes in what follows the read (the FUSE
// manager's hash of the whole blob, the pod's removal).
type cpuSampler struct {
	pids    []int
	stop    chan struct{}
	stopped chan struct{}
	samples []cpuSample // owned by the sampling goroutine until stopped
	err     error
}

type cpuSample struct {
	at  time.Time
	cpu []float64 // seconds, by pid
}

// startCPUSampler takes a first sample before it returns.
func startCPUSampler(pids ...int) *cpuSampler {
	s := &cpuSampler{pids: pids, stop: make(chan struct{}), stopped: make(chan struct{})}
	s.sample()
	go func() {
		defer close(s.stopped)
		t := time.NewTicker(cpuSampleEvery)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				s.sample()
				return
			case <-t.C:
				s.sample()
			}
		}
	}()
	return s
}

func (s *cpuSampler) sample() {
	c := cpuSample{at: time.Now(), cpu: make([]float64, len(s.pids))}
	for i, pid := range s.pids {
		v, err := procCPUSeconds(pid)
		if err != nil && s.err == nil {
			s.err = err
		}
		c.cpu[i] = v
	}
	s.samples = append(s.samples, c)
}

// halt stops sampling, after a last sample, and returns the first error
// reading a process's CPU time.
func (s *cpuSampler) halt() error {
	select {
	case <-s.stopped:
	default:
		close(s.stop)
		<-s.stopped
	}
	return s.err
}

// since returns each process's CPU seconds from the first sample to the
// last one taken at or before t. Call it after halt.
func (s *cpuSampler) since(t time.Time) []float64 {
	last := s.samples[0]
	for _, c := range s.samples {
		if c.at.After(t) {
			break
		}
		last = c
	}
	d := make([]float64, len(s.pids))
	for i := range d {
		d[i] = last.cpu[i] - s.samples[0].cpu[i]
	}
	return d
}

// procCPUSeconds is utime+stime of pid (0: this process).
func procCPUSeconds(pid int) (float64, error) {
	p := "/proc/self/stat"
	if pid > 0 {
		p = fmt.Sprintf("/proc/%d/stat", pid)
	}
	s, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(s), ')')
	if i < 0 || i+2 > len(s) {
		return 0, fmt.Errorf("%s: no command name", p)
	}
	f := strings.Fields(string(s[i+2:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("%s: %d fields", p, len(f))
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("%s: utime %q, stime %q", p, f[11], f[12])
	}
	return (ut + st) / 100, nil // USER_HZ
}
