package fs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
)

// helperEnv, when set, makes the test binary a FUSE daemon for the
// stale-mount test: it mounts a fake layer there and waits to be killed.
const helperEnv = "WEIGHTSNAP_FS_TEST_HELPER_MOUNT"

// mmapEnv, when set, makes the test binary print the named file's content
// read through mmap. The mapping is read in a separate process: a page
// fault on a mapping served by the faulting process itself can deadlock
// with the Go runtime stopping the world, since the faulting thread never
// reaches a safe point while the FUSE server goroutines are stopped.
const mmapEnv = "WEIGHTSNAP_FS_TEST_MMAP"

func TestMain(m *testing.M) {
	if mp := os.Getenv(helperEnv); mp != "" {
		runHelperDaemon(mp)
		return
	}
	if p := os.Getenv(mmapEnv); p != "" {
		if err := catMmap(p); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	os.Exit(m.Run())
}

func catMmap(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	defer unix.Munmap(mem)
	_, err = os.Stdout.Write(mem)
	return err
}

func runHelperDaemon(mp string) {
	l := newFakeLayer()
	l.file("hello", []byte("hello"))
	if _, err := Serve(context.Background(), &layer.Opened{Layer: l}, mp, WithName("test:helper")); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	select {}
}

// randBytes returns n deterministic pseudo-random bytes.
func randBytes(seed uint64, n int) []byte {
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	b := make([]byte, n)
	r.Read(b)
	return b
}

// richLayer has one of every kind of entry the fs must present.
func richLayer() *fakeLayer {
	l := newFakeLayer()
	l.dir("dir")
	l.file("dir/regular", []byte("hello, weights\n"))
	l.file("empty", nil)
	l.add(&layer.Entry{Name: "owned", Type: layer.TypeReg, Mode: 0o640, UID: 1000, GID: 2000,
		ModTime: time.Unix(1600000000, 999999999)}, []byte("x"))
	l.add(&layer.Entry{Name: "setuid", Type: layer.TypeReg, Mode: 0o4755, UID: 0, GID: 0}, []byte("#!"))
	l.add(&layer.Entry{Name: "setgid", Type: layer.TypeReg, Mode: 0o2711, UID: 7, GID: 8}, []byte("#!"))
	l.add(&layer.Entry{Name: "sticky", Type: layer.TypeDir, Mode: 0o1777, UID: 65534, GID: 65534}, nil)
	l.add(&layer.Entry{Name: "noperm", Type: layer.TypeReg, Mode: 0}, []byte("secret"))
	l.add(&layer.Entry{Name: "rel", Type: layer.TypeSymlink, Mode: 0o777, Linkname: "dir/regular"}, nil)
	l.add(&layer.Entry{Name: "abs", Type: layer.TypeSymlink, Mode: 0o777, Linkname: "/etc/passwd"}, nil)
	l.add(&layer.Entry{Name: "dangling", Type: layer.TypeSymlink, Mode: 0o777, Linkname: "../nowhere/at all"}, nil)
	l.add(&layer.Entry{Name: "null", Type: layer.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}, nil)
	l.add(&layer.Entry{Name: "bigdev", Type: layer.TypeChar, Mode: 0o600, Devmajor: 259, Devminor: 300}, nil)
	l.add(&layer.Entry{Name: "sda", Type: layer.TypeBlock, Mode: 0o660, GID: 6, Devmajor: 8, Devminor: 0}, nil)
	l.add(&layer.Entry{Name: "fifo", Type: layer.TypeFifo, Mode: 0o644}, nil)
	l.add(&layer.Entry{Name: "gone", Type: layer.TypeWhiteout, Mode: 0}, nil)
	l.add(&layer.Entry{Name: "opaque", Type: layer.TypeDir, Mode: 0o755, Opaque: true}, nil)
	l.file("opaque/inside", []byte("in"))
	l.add(&layer.Entry{Name: "xattrs", Type: layer.TypeReg, Mode: 0o644, Xattrs: map[string]string{
		"user.model":          "llama",
		"user.empty":          "",
		"trusted.long":        strings.Repeat("v", 300),
		"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
	}}, []byte("x"))
	l.file("linked", []byte("shared content"))
	l.hardlink("dir/linked2", "linked")
	return l
}

func TestAttributes(t *testing.T) {
	l := richLayer()
	m := mountFake(t, l)
	mp := m.Mountpoint()

	// Fields passed through unchanged, for every entry.
	for name, e := range l.entries {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(mp, name), &st); err != nil {
			t.Errorf("lstat %q: %v", name, err)
			continue
		}
		if got, want := st.Mode&07777, e.Mode; got != want {
			t.Errorf("%q: perm %#o, want %#o", name, got, want)
		}
		if st.Uid != e.UID || st.Gid != e.GID {
			t.Errorf("%q: owner %d:%d, want %d:%d", name, st.Uid, st.Gid, e.UID, e.GID)
		}
		mt := time.Unix(st.Mtim.Unix())
		if !mt.Equal(e.ModTime) {
			t.Errorf("%q: mtime %v, want %v", name, mt, e.ModTime)
		}
		if ct := time.Unix(st.Ctim.Unix()); !ct.Equal(e.ModTime) {
			t.Errorf("%q: ctime %v, want %v", name, ct, e.ModTime)
		}
		if e.Type != layer.TypeDir && st.Nlink != uint64(e.Nlink) {
			t.Errorf("%q: nlink %d, want %d", name, st.Nlink, e.Nlink)
		}
		if st.Blksize <= 0 || st.Blocks != (st.Size+511)/512 {
			t.Errorf("%q: blksize %d blocks %d for size %d", name, st.Blksize, st.Blocks, st.Size)
		}
	}

	// Type, size and device numbers, spelled out per kind.
	for _, c := range []struct {
		name  string
		ifmt  uint32
		size  int64
		major uint32
		minor uint32
	}{
		{"", unix.S_IFDIR, 4096, 0, 0},
		{"dir", unix.S_IFDIR, 4096, 0, 0},
		{"dir/regular", unix.S_IFREG, 15, 0, 0},
		{"empty", unix.S_IFREG, 0, 0, 0},
		{"setuid", unix.S_IFREG, 2, 0, 0},
		{"sticky", unix.S_IFDIR, 4096, 0, 0},
		{"rel", unix.S_IFLNK, int64(len("dir/regular")), 0, 0},
		{"abs", unix.S_IFLNK, int64(len("/etc/passwd")), 0, 0},
		{"null", unix.S_IFCHR, 0, 1, 3},
		{"bigdev", unix.S_IFCHR, 0, 259, 300},
		{"sda", unix.S_IFBLK, 0, 8, 0},
		{"fifo", unix.S_IFIFO, 0, 0, 0},
		{"gone", unix.S_IFCHR, 0, 0, 0},
	} {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(mp, c.name), &st); err != nil {
			t.Errorf("lstat %q: %v", c.name, err)
			continue
		}
		if st.Mode&unix.S_IFMT != c.ifmt {
			t.Errorf("%q: type %#o, want %#o", c.name, st.Mode&unix.S_IFMT, c.ifmt)
		}
		if st.Size != c.size {
			t.Errorf("%q: size %d, want %d", c.name, st.Size, c.size)
		}
		if unix.Major(st.Rdev) != c.major || unix.Minor(st.Rdev) != c.minor {
			t.Errorf("%q: rdev %d:%d, want %d:%d", c.name, unix.Major(st.Rdev), unix.Minor(st.Rdev), c.major, c.minor)
		}
	}

	// The root's inode number comes from the layer.
	var root unix.Stat_t
	if err := unix.Stat(mp, &root); err != nil || root.Ino != l.entries[""].Ino {
		t.Errorf("root ino %d (err %v), want %d", root.Ino, err, l.entries[""].Ino)
	}
}

func TestReadlink(t *testing.T) {
	l := richLayer()
	mp := mountFake(t, l).Mountpoint()
	for _, name := range []string{"rel", "abs", "dangling"} {
		got, err := os.Readlink(filepath.Join(mp, name))
		if err != nil || got != l.entries[name].Linkname {
			t.Errorf("readlink %q = %q, %v; want %q", name, got, err, l.entries[name].Linkname)
		}
	}
	// A relative link resolves inside the mount.
	b, err := os.ReadFile(filepath.Join(mp, "rel"))
	if err != nil || string(b) != "hello, weights\n" {
		t.Errorf("read through rel = %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(mp, "dangling")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat through dangling link: %v, want not exist", err)
	}
}

func TestReadDir(t *testing.T) {
	l := richLayer()
	mp := mountFake(t, l).Mountpoint()
	for _, dir := range []string{"", "dir", "opaque", "sticky"} {
		want, _ := l.ReadDir(t.Context(), dir)
		got, err := os.ReadDir(filepath.Join(mp, dir))
		if err != nil {
			t.Fatalf("readdir %q: %v", dir, err)
		}
		if len(got) != len(want) {
			t.Errorf("readdir %q: %d entries, want %d", dir, len(got), len(want))
			continue
		}
		for i, g := range got {
			w := want[i]
			if g.Name() != filepath.Base(w.Name) {
				t.Errorf("readdir %q [%d]: %q, want %q", dir, i, g.Name(), filepath.Base(w.Name))
			}
			if uint32(g.Type()&os.ModeType) != uint32(fileModeType(w.Type)) {
				t.Errorf("readdir %q: %q type %v, want %v", dir, g.Name(), g.Type(), fileModeType(w.Type))
			}
		}
	}
	if _, err := os.Lstat(filepath.Join(mp, "no-such")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lstat missing: %v, want not exist", err)
	}
	if _, err := os.Lstat(filepath.Join(mp, "dir", "regular", "x")); !errors.Is(err, syscall.ENOTDIR) {
		t.Errorf("lstat under a file: %v, want ENOTDIR", err)
	}
}

// fileModeType is the os.FileMode type bits os.ReadDir reports for t.
func fileModeType(t layer.Type) os.FileMode {
	switch t {
	case layer.TypeDir:
		return os.ModeDir
	case layer.TypeSymlink:
		return os.ModeSymlink
	case layer.TypeChar, layer.TypeWhiteout:
		return os.ModeDevice | os.ModeCharDevice
	case layer.TypeBlock:
		return os.ModeDevice
	case layer.TypeFifo:
		return os.ModeNamedPipe
	}
	return 0
}

func TestXattrs(t *testing.T) {
	l := richLayer()
	mp := mountFake(t, l)
	p := filepath.Join(mp.Mountpoint(), "xattrs")
	for k, v := range l.entries["xattrs"].Xattrs {
		// Size probe first, as getfattr does.
		sz, err := unix.Lgetxattr(p, k, nil)
		if err != nil || sz != len(v) {
			t.Errorf("probe %s: size %d, %v; want %d", k, sz, err, len(v))
		}
		buf := make([]byte, 1024)
		n, err := unix.Lgetxattr(p, k, buf)
		if err != nil || string(buf[:n]) != v {
			t.Errorf("getxattr %s = %q, %v; want %q", k, buf[:n], err, v)
		}
	}
	if _, err := unix.Lgetxattr(p, "trusted.long", make([]byte, 10)); !errors.Is(err, unix.ERANGE) {
		t.Errorf("getxattr into a small buffer: %v, want ERANGE", err)
	}
	if _, err := unix.Lgetxattr(p, "user.absent", make([]byte, 10)); !errors.Is(err, unix.ENODATA) {
		t.Errorf("getxattr absent: %v, want ENODATA", err)
	}
	if _, err := unix.Lgetxattr(p, opaqueXattr, make([]byte, 10)); !errors.Is(err, unix.ENODATA) {
		t.Errorf("opaque xattr on a file: %v, want ENODATA", err)
	}

	want := slices.Sorted(func(yield func(string) bool) {
		for k := range l.entries["xattrs"].Xattrs {
			yield(k)
		}
	})
	if got := listxattr(t, p); !slices.Equal(got, want) {
		t.Errorf("listxattr = %q, want %q", got, want)
	}
	if _, err := unix.Llistxattr(p, make([]byte, 5)); !errors.Is(err, unix.ERANGE) {
		t.Errorf("listxattr into a small buffer: %v, want ERANGE", err)
	}

	op := filepath.Join(mp.Mountpoint(), "opaque")
	buf := make([]byte, 16)
	if n, err := unix.Lgetxattr(op, opaqueXattr, buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("opaque dir %s = %q, %v; want y", opaqueXattr, buf[:n], err)
	}
	if got := listxattr(t, op); !slices.Equal(got, []string{opaqueXattr}) {
		t.Errorf("listxattr opaque = %q", got)
	}
	if got := listxattr(t, filepath.Join(mp.Mountpoint(), "dir")); len(got) != 0 {
		t.Errorf("listxattr plain dir = %q, want none", got)
	}
}

func listxattr(t *testing.T, p string) []string {
	t.Helper()
	sz, err := unix.Llistxattr(p, nil)
	if err != nil {
		t.Fatalf("listxattr probe %s: %v", p, err)
	}
	buf := make([]byte, sz)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var names []string
	for _, s := range strings.Split(string(buf[:n]), "\x00") {
		if s != "" {
			names = append(names, s)
		}
	}
	sort.Strings(names)
	return names
}

func TestHardLink(t *testing.T) {
	l := richLayer()
	mp := mountFake(t, l).Mountpoint()
	var a, b unix.Stat_t
	if err := unix.Stat(filepath.Join(mp, "linked"), &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Join(mp, "dir/linked2"), &b); err != nil {
		t.Fatal(err)
	}
	if a.Ino != b.Ino || a.Nlink != 2 || b.Nlink != 2 {
		t.Errorf("hard links: ino %d/%d nlink %d/%d, want same ino, nlink 2", a.Ino, b.Ino, a.Nlink, b.Nlink)
	}
	for _, name := range []string{"linked", "dir/linked2"} {
		if c, err := os.ReadFile(filepath.Join(mp, name)); err != nil || string(c) != "shared content" {
			t.Errorf("read %s = %q, %v", name, c, err)
		}
	}
}

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

func TestUnmount(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("data"))
	parent := t.TempDir()
	mp := filepath.Join(parent, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:unmount"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	if !isMountpoint(t, mp) {
		t.Fatal("not mounted after Serve")
	}
	if err := m.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after Unmount")
	}
	<-m.Done() // nothing holds it: the server exits
	if err := m.Unmount(); err != nil {
		t.Errorf("second Unmount: %v", err)
	}
}

// TestUnmountHeldByAnotherMount unmounts a layer that another mount still
// holds, as a running container's overlay holds its lower layers: Unmount
// returns at once, the server serves the holder until it goes, and Done
// tells when.
func TestUnmountHeldByAnotherMount(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("held"))
	mp := filepath.Join(t.TempDir(), "mnt")
	holder := filepath.Join(t.TempDir(), "holder")
	for _, d := range []string{mp, holder} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:held"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	if err := unix.Mount(mp, holder, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(holder, unix.MNT_DETACH) })
	if err := m.Unmount(); err != nil { // waited forever for the holder before
		t.Fatal(err)
	}
	select {
	case <-m.Done():
		t.Fatal("server exited while another mount holds it")
	default:
	}
	if b, err := os.ReadFile(filepath.Join(holder, "f")); string(b) != "held" {
		t.Fatalf("read through the holder = %q, %v", b, err)
	}
	if err := unix.Unmount(holder, 0); err != nil {
		t.Fatal(err)
	}
	<-m.Done()
}

// TestUnmountRetriedAfterFailure makes an unmount fail (its mountpoint's
// path is gone for a moment) and checks that a later Unmount tries again
// instead of repeating the first failure.
func TestUnmountRetriedAfterFailure(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("data"))
	root := t.TempDir()
	parent, moved := filepath.Join(root, "p"), filepath.Join(root, "moved")
	mp := filepath.Join(parent, "mnt")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:retry"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Rename(moved, parent)
		m.Unmount()
	})
	if err := os.Rename(parent, moved); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); err == nil {
		t.Fatal("Unmount of a mountpoint whose path is gone succeeded")
	}
	if err := os.Rename(moved, parent); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); err != nil {
		t.Fatalf("second Unmount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after the second Unmount")
	}
}

// TestUnmountBusy holds a file open across Unmount: the mount is detached
// at once, the open file keeps working, and Unmount returns once it is
// closed.
func TestUnmountBusy(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("still readable"))
	mp := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:busy"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	f, err := os.Open(filepath.Join(mp, "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })

	// A busy mount is detached: Unmount returns, the mountpoint is free,
	// and the server keeps serving the open file until it is closed.
	if err := m.Unmount(); err != nil {
		t.Fatalf("Unmount of busy mount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Fatal("busy mount was not detached")
	}
	select {
	case <-m.Done():
		t.Fatal("server exited while a file was open")
	default:
	}
	b := make([]byte, 64)
	if n, err := f.ReadAt(b, 0); string(b[:n]) != "still readable" {
		t.Errorf("read from detached mount = %q, %v", b[:n], err)
	}
	f.Close()
	select {
	case <-m.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("server did not exit after the last file was closed")
	}
}

// startHelperDaemon runs this test binary as a separate FUSE daemon
// serving a fake layer at a fresh mountpoint, so a test can kill it.
func startHelperDaemon(t *testing.T) (string, *exec.Cmd) {
	t.Helper()
	testutil.RequireFUSE(t)
	mp := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mp)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		CleanupMount(mp)
	})
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		t.Fatalf("helper daemon: %q", line)
	}
	if b, err := os.ReadFile(filepath.Join(mp, "hello")); err != nil || string(b) != "hello" {
		t.Fatalf("read from helper mount = %q, %v", b, err)
	}
	return mp, cmd
}

// TestCleanupStaleMount kills a FUSE daemon with SIGKILL and clears the
// "transport endpoint is not connected" mount it leaves.
func TestCleanupStaleMount(t *testing.T) {
	mp, cmd := startHelperDaemon(t)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// A name never looked up must reach the dead daemon (the root's
	// attributes may be served from the kernel's cache).
	if _, err := os.Lstat(filepath.Join(mp, "never-looked-up")); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("lstat after SIGKILL: %v, want ENOTCONN", err)
	}
	if err := CleanupMount(mp); err != nil {
		t.Fatalf("CleanupMount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after CleanupMount")
	}
	if err := CleanupMount(mp); err != nil {
		t.Errorf("CleanupMount of an unmounted dir: %v", err)
	}
}

// TestCleanupHungMount clears the mount of a daemon that stopped
// answering, and frees the caller waiting on it.
func TestCleanupHungMount(t *testing.T) {
	mp, cmd := startHelperDaemon(t)
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stuck := make(chan error, 1)
	go func() {
		_, err := os.Lstat(filepath.Join(mp, "never-looked-up"))
		stuck <- err
	}()
	if err := CleanupMount(mp); err != nil {
		t.Fatalf("CleanupMount: %v", err)
	}
	// Whether the lookup was already waiting or came after the abort,
	// it fails instead of hanging.
	if err := <-stuck; err == nil {
		t.Error("lookup on a hung mount succeeded")
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after CleanupMount")
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

// isMountpoint reports whether p is a mount point: its device differs
// from its parent's.
func isMountpoint(t *testing.T, p string) bool {
	t.Helper()
	var st, pst unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return true // a dead FUSE mount (ENOTCONN) is still mounted
	}
	if err := unix.Stat(filepath.Dir(p), &pst); err != nil {
		t.Fatal(err)
	}
	return st.Dev != pst.Dev
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

// TestInvalidate: once a layer's content is found wrong, Invalidate drops
// what the kernel cached of it, so the next read gets the layer's error
// instead of the cached bytes.
func TestInvalidate(t *testing.T) {
	l := newFakeLayer()
	l.file("f", []byte("cached bytes"))
	m := mountFake(t, l)
	p := filepath.Join(m.Mountpoint(), "f")
	if b, err := os.ReadFile(p); err != nil || string(b) != "cached bytes" {
		t.Fatalf("first read = %q, %v", b, err)
	}
	l.failReads("f", errors.New("content did not match its digest"))
	if b, err := os.ReadFile(p); err != nil || string(b) != "cached bytes" {
		t.Fatalf("before Invalidate the kernel's cached pages serve the read: got %q, %v", b, err)
	}
	m.Invalidate()
	if b, err := os.ReadFile(p); err == nil {
		t.Fatalf("after Invalidate a read of a failed file = %q, want an error", b)
	}
}
