package fs

// Tests of reading file content: whole, by mmap, concurrently, failing, read-only.

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
	"golang.org/x/sys/unix"
)

func TestReadContent(t *testing.T) {
	l := newFakeLayer()
	data := randBytes(1, 3<<20+12345)
	l.file("big", data)
	l.file("empty", nil)
	l.add(&layer.Entry{Name: "noperm", Type: layer.TypeReg, Mode: 0}, []byte("root reads anyway"))
	var onRead atomic.Int64
	name := "test:read-content"
	m := mountFake(t, l, WithName(name), WithOnRead(func(e *layer.Entry, off, n int64) {
		if e.Name == "big" && off >= 0 && off+n <= int64(len(data)) {
			onRead.Add(1)
		}
	}))
	mp := m.Mountpoint()

	if b, err := os.ReadFile(filepath.Join(mp, "empty")); err != nil || len(b) != 0 {
		t.Errorf("read empty = %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(mp, "noperm")); err != nil || string(b) != "root reads anyway" {
		t.Errorf("read mode-0 file as root = %q, %v", b, err)
	}

	okBefore := readLatencyCount(t, "ok")
	f, err := os.Open(filepath.Join(mp, "big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		off := r.Int64N(int64(len(data)))
		n := r.IntN(300 << 10)
		buf := make([]byte, n)
		got, err := f.ReadAt(buf, off)
		want := data[off:min(off+int64(n), int64(len(data)))]
		if !bytes.Equal(buf[:got], want) || (got < n) != (err != nil) {
			t.Fatalf("read %d at %d (+%d): got %d bytes (err %v), want %d matching", i, off, n, got, err, len(want))
		}
	}
	// Past the end.
	if n, err := f.ReadAt(make([]byte, 10), int64(len(data))+5); n != 0 || err == nil {
		t.Errorf("read past end: %d, %v", n, err)
	}
	if readLatencyCount(t, "ok") == okBefore {
		t.Error("no read latency recorded")
	}
	if onRead.Load() == 0 {
		t.Error("OnRead was never called with the file's entry")
	}
	var ttfr dto.Metric
	if err := metrics.TimeToFirstRead.WithLabelValues(mp).Write(&ttfr); err != nil {
		t.Fatal(err)
	}
	if v := ttfr.GetGauge().GetValue(); v <= 0 {
		t.Errorf("time to first read for %s = %v, want > 0", mp, v)
	}
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	if ttfrSeries(t, mp) {
		t.Errorf("the time to first read of %s outlived its mount", mp)
	}
}

func TestMmap(t *testing.T) {
	l := newFakeLayer()
	data := randBytes(2, 1<<20+777)
	l.file("weights.bin", data)
	mp := mountFake(t, l).Mountpoint()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), mmapEnv+"="+filepath.Join(mp, "weights.bin"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	got, err := cmd.Output()
	if err != nil {
		t.Fatalf("mmap reader: %v: %s", err, stderr.Bytes())
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("mmap content differs from the layer's (%d bytes, want %d)", len(got), len(data))
	}
}

func TestConcurrentReaders(t *testing.T) {
	l := newFakeLayer()
	const files = 4
	var data [files][]byte
	for i := range files {
		data[i] = randBytes(uint64(10+i), 2<<20+i*4099)
		l.file(fmt.Sprintf("f%d", i), data[i])
	}
	mp := mountFake(t, l).Mountpoint()

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Go(func() {
			i := g % files
			f, err := os.Open(filepath.Join(mp, fmt.Sprintf("f%d", i)))
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			r := rand.New(rand.NewPCG(uint64(g), 0))
			for range 50 {
				off := r.Int64N(int64(len(data[i])))
				buf := make([]byte, min(int64(r.IntN(256<<10)+1), int64(len(data[i]))-off))
				if _, err := f.ReadAt(buf, off); err != nil {
					errs <- fmt.Errorf("reader %d: read at %d: %w", g, off, err)
					return
				}
				if !bytes.Equal(buf, data[i][off:off+int64(len(buf))]) {
					errs <- fmt.Errorf("reader %d: wrong bytes at %d", g, off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestReadErrorIsEIO(t *testing.T) {
	l := newFakeLayer()
	l.file("bad", randBytes(3, 100000))
	l.file("short", []byte("0123456789"))
	l.readErr["bad"] = errors.New("registry said 500")
	// "short" claims 20 bytes but the content has 10.
	l.entries["short"].Size = 20
	mp := mountFake(t, l).Mountpoint()
	errorsBefore := readLatencyCount(t, "error")

	for _, name := range []string{"bad", "short"} {
		_, err := os.ReadFile(filepath.Join(mp, name))
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("read %s: %v, want EIO", name, err)
		}
	}
	if got := readLatencyCount(t, "error"); got < errorsBefore+2 {
		t.Errorf("read latency error samples %d, want at least %d", got, errorsBefore+2)
	}
	// Attributes still work for a file whose content fails.
	if fi, err := os.Stat(filepath.Join(mp, "bad")); err != nil || fi.Size() != 100000 {
		t.Errorf("stat bad = %v, %v", fi, err)
	}
}

func TestReadOnly(t *testing.T) {
	l := richLayer()
	mp := mountFake(t, l).Mountpoint()
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"open for write", func() error {
			f, err := os.OpenFile(filepath.Join(mp, "dir/regular"), os.O_WRONLY, 0)
			if err == nil {
				f.Close()
			}
			return err
		}},
		{"open rdwr", func() error {
			f, err := os.OpenFile(filepath.Join(mp, "empty"), os.O_RDWR, 0)
			if err == nil {
				f.Close()
			}
			return err
		}},
		{"create", func() error { return os.WriteFile(filepath.Join(mp, "new"), nil, 0o644) }},
		{"mkdir", func() error { return os.Mkdir(filepath.Join(mp, "newdir"), 0o755) }},
		{"remove", func() error { return os.Remove(filepath.Join(mp, "empty")) }},
		{"chmod", func() error { return os.Chmod(filepath.Join(mp, "empty"), 0o600) }},
		{"setxattr", func() error { return unix.Setxattr(filepath.Join(mp, "empty"), "user.x", []byte("y"), 0) }},
	} {
		if err := op.do(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", op.name, err)
		}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(mp, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Flags&unix.ST_RDONLY == 0 || sfs.Bfree != 0 || sfs.Bavail != 0 || sfs.Bsize <= 0 {
		t.Errorf("statfs = %+v, want read-only, nothing free", sfs)
	}
	if want := uint64((l.Size() + 4095) / 4096); sfs.Blocks != want || sfs.Frsize != 4096 {
		t.Errorf("statfs blocks %d of %d bytes, want %d of 4096", sfs.Blocks, sfs.Frsize, want)
	}
}

// readLatencyCount is the number of reads recorded with result.
func readLatencyCount(t *testing.T, result string) uint64 {
	t.Helper()
	var m dto.Metric
	if err := metrics.ReadLatency.WithLabelValues(result).(prometheus.Histogram).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// ttfrSeries reports whether a time-to-first-read series of mp exists.
func ttfrSeries(t *testing.T, mp string) bool {
	t.Helper()
	fams, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "weightsnap_time_to_first_read_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "mount" && l.GetValue() == mp {
					return true
				}
			}
		}
	}
	return false
}
