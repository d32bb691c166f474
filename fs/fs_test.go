package fs

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/layer"
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
	if mp := os.Getenv(resumeChildEnv); mp != "" {
		runResumeChild(mp)
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
