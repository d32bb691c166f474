package integration

// Waiting for the disk to serve reads at its usual latency before a cold
// case. On this kind of machine (ext4 mounted with online discard, on a
// virtual disk) deleting a large file slows every read of the disk for
// seconds after unlink and sync have returned: 4 KiB direct reads took
// 40–106 ms on average, against 0.03–0.06 ms, for the 6 s that rm and
// sync of an 8 GiB file took, then spiked to 50 ms now and then for 8 s
// more. The benchmarks delete each finished phase's files (the full pull's
// image is twice the model) and would otherwise time the next cold case,
// registry, containerd and weightsnap alike, on that disk: more so the
// larger the model.

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// settleSlow is a probe read that counts as slow, settleQuiet how long
	// the disk must go without one, settleLimit how long to wait at most.
	settleSlow  = 5 * time.Millisecond
	settleQuiet = 3 * time.Second
	settleLimit = 2 * time.Minute
	// probeBytes is the probe file's size: reads spread over it hit the
	// disk, not a cache in front of one block.
	probeBytes = 64 << 20
)

// settleProbe, when set (useDiskProbe), makes dropCaches wait for the disk.
var settleProbe *diskProbe

// diskProbe times direct reads of random 4 KiB blocks of a file of its
// own, which bypass the page cache.
type diskProbe struct {
	f      *os.File
	buf    []byte // a page, for O_DIRECT
	blocks int64
	// waits are the seconds each settle saw the disk slow; unsettled
	// counts the settles that gave up.
	waits     []float64
	unsettled int
}

// useDiskProbe makes every dropCaches of the benchmark wait until the disk
// of dir is quiet. It returns the probe, whose waits the benchmark reports.
func useDiskProbe(tb testing.TB, dir string) *diskProbe {
	tb.Helper()
	p, err := newDiskProbe(filepath.Join(dir, "disk-probe"))
	if err != nil {
		tb.Fatal(err)
	}
	settleProbe = p
	tb.Cleanup(func() {
		settleProbe = nil
		p.f.Close()
		unix.Munmap(p.buf)
		os.Remove(p.f.Name())
	})
	return p
}

func newDiskProbe(path string) (*diskProbe, error) {
	data := make([]byte, probeBytes)
	rand.NewChaCha8([32]byte{}).Read(data)
	w, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	_, err = w.Write(data)
	if err = errors.Join(err, w.Sync(), w.Close()); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return nil, fmt.Errorf("disk probe: %w", err)
	}
	// A page of its own: O_DIRECT wants an aligned buffer.
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("disk probe: %w", err)
	}
	return &diskProbe{f: f, buf: buf, blocks: probeBytes / 4096}, nil
}

// settle returns once no probe read has taken settleSlow or more for
// settleQuiet, or after settleLimit (counted in unsettled). A read every
// 5 ms is enough to see a slow disk and too few to slow it.
func (p *diskProbe) settle() {
	start := time.Now()
	lastSlow := start
	for {
		t0 := time.Now()
		_, err := p.f.ReadAt(p.buf, rand.Int64N(p.blocks)*4096)
		now := time.Now()
		if err != nil || now.Sub(t0) >= settleSlow {
			lastSlow = now
		}
		switch {
		case now.Sub(lastSlow) >= settleQuiet:
			p.waits = append(p.waits, round3(lastSlow.Sub(start).Seconds()))
			return
		case now.Sub(start) >= settleLimit:
			p.unsettled++
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// note says what the settles waited, for the benchmark's report.
func (p *diskProbe) note() string {
	if len(p.waits) == 0 && p.unsettled == 0 {
		return ""
	}
	s := fmt.Sprintf(", each once the disk's 4 KiB direct reads had stayed under %v for %v (deleting a finished phase's files slows them for seconds)", settleSlow, settleQuiet)
	if len(p.waits) > 0 {
		s += fmt.Sprintf(": it was slow for %.1f–%.1f s before them", slices.Min(p.waits), slices.Max(p.waits))
	}
	if p.unsettled > 0 {
		s += fmt.Sprintf("; %d times it was still slow after %v, and the case ran anyway", p.unsettled, settleLimit)
	}
	return s
}
