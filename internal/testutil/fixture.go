package testutil

import (
	"archive/tar"
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"
)

// Fixture paths that tests may want to single out. Every path is relative,
// without a leading "./", as in a Tree.
const (
	// FixtureRandomFile holds FixtureRandomSize bytes of random data (layer 1).
	FixtureRandomFile = "data/random.bin"
	// FixtureRandomSize is more than 4 MiB and deliberately not a multiple of
	// any power-of-two chunk size.
	FixtureRandomSize = 4<<20 + 12345
)

var (
	fixtureOnce   sync.Once
	fixtureLayers [][]byte
)

// FixtureLayers returns three uncompressed tar layers, base first, that
// together exercise every tar feature an image layer can use:
//
// Layer 1: names longer than 100 bytes, a path longer than 255 bytes, a long
// symlink target, two hard-link groups of three names, relative, absolute,
// dangling and directory symlinks, character and block devices, a fifo,
// setuid, setgid and sticky modes, several owners (including a uid/gid too
// large for the ustar header), PAX SCHILY.xattr.user.* xattrs, empty files,
// a random file of FixtureRandomSize bytes, nested directories and non-ASCII
// names. Every entry is PAX with sub-second mtimes.
//
// Layer 2: whiteouts of a file, of a directory and of one name of a hard-link
// group; an opaque directory with new content (the opaque marker placed after
// some of it, which is legal); a file replaced by a directory and a
// directory (with children) replaced by a file; a file overwritten.
//
// Layer 3 (entries named "./…"): the directory from layer 2 replaced by a
// file again, a file re-created after its whiteout, and a whiteout of a file
// added by layer 2 inside the opaque directory.
//
// Every directory a layer touches has an explicit entry in that layer, so no
// attribute of the expected tree depends on how an extractor invents missing
// parents. The layers are built once; callers get their own copies.
func FixtureLayers() [][]byte {
	fixtureOnce.Do(func() {
		fixtureLayers = [][]byte{fixtureLayer1(), fixtureLayer2(), fixtureLayer3()}
	})
	out := make([][]byte, len(fixtureLayers))
	for i, l := range fixtureLayers {
		out[i] = bytes.Clone(l)
	}
	return out
}

// Owners used by the fixtures. bigID does not fit in the 7 octal digits of a
// ustar header, so it forces a PAX uid/gid record.
const (
	bigID    = 3_000_000
	nobodyID = 65534
)

// Long names, shared with the tests.
var (
	fixtureLongName   = "data/" + strings.Repeat("long-name-", 15) + "end.txt"
	fixtureLongTarget = strings.Repeat("../target-", 12) + "nowhere"
	fixtureDeepDirs   = []string{
		"data/deep",
		"data/deep/" + strings.Repeat("a", 60),
		"data/deep/" + strings.Repeat("a", 60) + "/" + strings.Repeat("b", 60),
		"data/deep/" + strings.Repeat("a", 60) + "/" + strings.Repeat("b", 60) + "/" + strings.Repeat("c", 60),
		"data/deep/" + strings.Repeat("a", 60) + "/" + strings.Repeat("b", 60) + "/" + strings.Repeat("c", 60) + "/" + strings.Repeat("d", 60),
	}
	fixtureDeepFile = fixtureDeepDirs[len(fixtureDeepDirs)-1] + "/" + strings.Repeat("e", 40) + ".txt"
)

// layerWriter writes PAX tar entries with distinct, deterministic sub-second
// mtimes.
type layerWriter struct {
	buf    bytes.Buffer
	tw     *tar.Writer
	mtime  time.Time
	prefix string // "./" for layer 3
}

func newLayerWriter(start time.Time, prefix string) *layerWriter {
	w := &layerWriter{mtime: start, prefix: prefix}
	w.tw = tar.NewWriter(&w.buf)
	return w
}

// next returns a fresh mtime: whole seconds plus a varying fraction, so both
// the second and the nanosecond parts of a mismatch are visible.
func (w *layerWriter) next() time.Time {
	w.mtime = w.mtime.Add(time.Hour + 123_456_789*time.Nanosecond)
	return w.mtime
}

func (w *layerWriter) write(h *tar.Header, body []byte) {
	h.Name = w.prefix + h.Name
	h.Format = tar.FormatPAX
	if h.ModTime.IsZero() {
		h.ModTime = w.next()
	}
	if h.Typeflag == tar.TypeReg {
		h.Size = int64(len(body))
	}
	if err := w.tw.WriteHeader(h); err != nil {
		panic(fmt.Sprintf("fixture %s: %v", h.Name, err))
	}
	if _, err := w.tw.Write(body); err != nil {
		panic(fmt.Sprintf("fixture %s: %v", h.Name, err))
	}
}

func (w *layerWriter) dir(name string, mode int64, uid, gid int, xattrs ...string) {
	w.write(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: gid, PAXRecords: paxXattrs(xattrs)}, nil)
}

func (w *layerWriter) file(name string, mode int64, uid, gid int, body string, xattrs ...string) {
	w.fileBytes(name, mode, uid, gid, []byte(body), xattrs...)
}

func (w *layerWriter) fileBytes(name string, mode int64, uid, gid int, body []byte, xattrs ...string) {
	w.write(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: gid, PAXRecords: paxXattrs(xattrs)}, body)
}

func (w *layerWriter) symlink(name, target string) {
	w.write(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}, nil)
}

// hardlink writes a link entry whose header repeats the target's attributes,
// since they describe one inode.
func (w *layerWriter) hardlink(name string, target *tar.Header) {
	h := *target
	h.Typeflag = tar.TypeLink
	h.Name = name
	h.Linkname = target.Name
	h.Size = 0
	w.write(&h, nil)
}

func (w *layerWriter) special(name string, typ byte, mode int64, uid, gid int, major, minor int64) {
	w.write(&tar.Header{Typeflag: typ, Name: name, Mode: mode, Uid: uid, Gid: gid, Devmajor: major, Devminor: minor}, nil)
}

func (w *layerWriter) whiteout(dir, name string) {
	w.write(&tar.Header{Typeflag: tar.TypeReg, Name: dir + "/.wh." + name, Mode: 0o644}, nil)
}

func (w *layerWriter) bytes() []byte {
	if err := w.tw.Close(); err != nil {
		panic(fmt.Sprintf("fixture: %v", err))
	}
	return w.buf.Bytes()
}

// paxXattrs turns key, value pairs into SCHILY.xattr records.
func paxXattrs(kv []string) map[string]string {
	if len(kv) == 0 {
		return nil
	}
	m := make(map[string]string, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		m["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return m
}

// fixtureRandom is deterministic so that blob digests are stable across runs.
func fixtureRandom() []byte {
	b := make([]byte, FixtureRandomSize)
	r := rand.NewChaCha8([32]byte{'w', 'e', 'i', 'g', 'h', 't', 's', 'n', 'a', 'p'})
	_, _ = r.Read(b)
	return b
}

func fixtureLayer1() []byte {
	w := newLayerWriter(time.Date(2024, 5, 17, 10, 30, 0, 111_111_111, time.UTC), "")

	w.dir("etc", 0o755, 0, 0)
	w.file("etc/hostname", 0o644, 0, 0, "weightsnap\n")
	w.file("etc/empty", 0o600, 0, 0, "")

	w.dir("data", 0o755, 1000, 1000, "user.comment", "model weights")
	w.fileBytes(FixtureRandomFile, 0o644, 1000, 1000, fixtureRandom(), "user.checksum", "chacha8", "user.origin", "fixture")
	w.file(fixtureLongName, 0o644, 1000, 1000, "a name longer than 100 bytes\n")
	w.file("data/ünïcødé 名前.txt", 0o644, 1000, 1000, "non-ASCII name\n")
	w.file("data/empty-with-xattr", 0o640, 1000, 1000, "", "user.note", "empty file, one xattr")
	w.file("data/big-owner", 0o644, bigID, bigID, "owned by a uid beyond ustar's range\n")
	w.dir("data/nested", 0o755, 0, 0)
	w.dir("data/nested/a", 0o700, 1000, 1000)
	w.dir("data/nested/a/b", 0o750, 1000, nobodyID)
	w.dir("data/nested/a/b/c", 0o755, nobodyID, nobodyID)
	w.file("data/nested/a/b/c/file.txt", 0o444, nobodyID, nobodyID, "nested\n")
	for _, d := range fixtureDeepDirs {
		w.dir(d, 0o755, 0, 0)
	}
	w.file(fixtureDeepFile, 0o644, 0, 0, "a path longer than 255 bytes\n")

	w.dir("links", 0o755, 0, 0)
	orig := &tar.Header{Typeflag: tar.TypeReg, Name: "links/original", Mode: 0o640, Uid: 1001, Gid: 1002,
		ModTime: w.next(), PAXRecords: paxXattrs([]string{"user.who", "hard link group A"})}
	w.write(orig, []byte("hard-link group A\n"))
	w.hardlink("links/hard-a2", orig)
	w.dir("links/sub", 0o755, 0, 0)
	w.hardlink("links/sub/"+strings.Repeat("hard-a3-", 14), orig) // long link name
	b1 := &tar.Header{Typeflag: tar.TypeReg, Name: "links/b1", Mode: 0o600, Uid: 1000, Gid: 1000, ModTime: w.next()}
	w.write(b1, []byte("hard-link group B\n"))
	w.hardlink("links/b2", b1)
	w.hardlink("links/b3", b1)
	w.symlink("links/relative", "../etc/hostname")
	w.symlink("links/absolute", "/etc/hostname")
	w.symlink("links/dangling", "does/not/exist")
	w.symlink("links/to-dir", "../data/nested")
	w.symlink("links/long-target", fixtureLongTarget)

	w.dir("dev", 0o755, 0, 0)
	w.special("dev/char-1-3", tar.TypeChar, 0o666, 0, 0, 1, 3)
	w.special("dev/block-7-0", tar.TypeBlock, 0o660, 0, 6, 7, 0)
	w.special("dev/fifo", tar.TypeFifo, 0o620, 1000, 5, 0, 0)

	w.dir("bin", 0o755, 0, 0)
	w.file("bin/setuid", 0o4755, 0, 0, "#!/bin/true\n")
	w.file("bin/setgid", 0o2711, 0, 50, "#!/bin/true\n")
	w.dir("bin/setgid-dir", 0o2775, 0, 50)
	w.dir("tmp", 0o1777, 0, 0)

	// Targets of layer 2's whiteouts and replacements.
	w.dir("wh", 0o755, 0, 0)
	w.file("wh/keep", 0o644, 0, 0, "survives\n")
	w.file("wh/file1", 0o644, 0, 0, "whited out in layer 2\n")
	w.dir("wh/dir1", 0o755, 0, 0)
	w.file("wh/dir1/x", 0o644, 0, 0, "x\n")
	w.dir("wh/dir1/sub", 0o755, 0, 0)
	w.file("wh/dir1/sub/y", 0o644, 0, 0, "y\n")
	w.dir("opq", 0o755, 0, 0)
	w.file("opq/old1", 0o644, 0, 0, "hidden by layer 2's opaque marker\n")
	w.file("opq/keep-name", 0o644, 0, 0, "old content\n")
	w.dir("opq/olddir", 0o755, 0, 0)
	w.file("opq/olddir/x", 0o644, 0, 0, "x\n")
	w.dir("replace", 0o755, 0, 0)
	w.file("replace/me", 0o644, 0, 0, "a file in layer 1\n")
	w.dir("replace/dir2file", 0o755, 0, 0)
	w.file("replace/dir2file/child", 0o644, 0, 0, "gone when its dir becomes a file\n")
	return w.bytes()
}

func fixtureLayer2() []byte {
	w := newLayerWriter(time.Date(2024, 6, 1, 8, 0, 0, 222_222_222, time.UTC), "")

	w.dir("etc", 0o755, 0, 0)
	w.file("etc/hostname", 0o644, 0, 0, "weightsnap layer 2\n")

	w.dir("links", 0o755, 0, 0)
	w.whiteout("links", "b2") // group B shrinks to b1 and b3

	w.dir("wh", 0o755, 0, 0)
	w.whiteout("wh", "file1")
	w.whiteout("wh", "dir1")
	w.file("wh/new-in-2", 0o644, 0, 0, "whited out in layer 3\n")

	// Some new content precedes the opaque marker: the marker hides only the
	// lower layers, whatever its position in the tar.
	w.dir("opq", 0o750, 0, 0, "user.opaque", "yes")
	w.file("opq/new1", 0o644, 0, 0, "new in layer 2\n")
	w.write(&tar.Header{Typeflag: tar.TypeReg, Name: "opq/.wh..wh..opq", Mode: 0o644}, nil)
	w.file("opq/keep-name", 0o600, 1000, 1000, "new content\n")
	w.dir("opq/newdir", 0o755, 0, 0)
	w.file("opq/newdir/z", 0o644, 0, 0, "z\n")

	w.dir("replace", 0o755, 0, 0)
	w.dir("replace/me", 0o711, 1000, 1000)
	w.file("replace/me/inner", 0o644, 1000, 1000, "inside the directory that replaced a file\n")
	w.file("replace/dir2file", 0o644, 0, 0, "a file where layer 1 had a directory\n")
	return w.bytes()
}

func fixtureLayer3() []byte {
	w := newLayerWriter(time.Date(2024, 7, 4, 12, 0, 0, 333_333_333, time.UTC), "./")

	w.dir("replace", 0o755, 0, 0)
	w.file("replace/me", 0o600, 0, 0, "a file again in layer 3\n")

	w.dir("wh", 0o755, 0, 0)
	w.whiteout("wh", "new-in-2")
	w.file("wh/file1", 0o644, 0, 0, "re-created in layer 3\n")

	w.dir("opq", 0o750, 0, 0, "user.opaque", "yes")
	w.whiteout("opq", "new1")
	// Past 2038: needs more than 32 bits of seconds.
	w.write(&tar.Header{Typeflag: tar.TypeReg, Name: "opq/future", Mode: 0o644,
		ModTime: time.Date(2040, 1, 2, 3, 4, 5, 987_654_321, time.UTC)}, []byte("from the future\n"))
	return w.bytes()
}
