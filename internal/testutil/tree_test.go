package testutil

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
)

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// TestFixtureCoversTarFeatures guards the fixture itself: if a refactoring
// drops a feature, every test built on the fixture silently tests less.
func TestFixtureCoversTarFeatures(t *testing.T) {
	layers := FixtureLayers()
	if len(layers) != 3 {
		t.Fatalf("got %d layers, want 3", len(layers))
	}
	features := map[string]bool{}
	for i, l := range layers {
		tr := tar.NewReader(bytes.NewReader(l))
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("layer %d: %v", i, err)
			}
			has := func(f string, ok bool) {
				if ok {
					features[fmt.Sprintf("layer%d %s", i+1, f)] = true
				}
			}
			base := h.Name[strings.LastIndex(strings.TrimSuffix(h.Name, "/"), "/")+1:]
			has("name>100", len(h.Name) > 100)
			has("path>255", len(h.Name) > 255)
			has("linkname>100", len(h.Linkname) > 100)
			has("hardlink", h.Typeflag == tar.TypeLink)
			has("relative symlink", h.Typeflag == tar.TypeSymlink && !strings.HasPrefix(h.Linkname, "/"))
			has("absolute symlink", h.Typeflag == tar.TypeSymlink && strings.HasPrefix(h.Linkname, "/"))
			has("char", h.Typeflag == tar.TypeChar)
			has("block", h.Typeflag == tar.TypeBlock)
			has("fifo", h.Typeflag == tar.TypeFifo)
			has("setuid", h.Mode&0o4000 != 0)
			has("setgid", h.Mode&0o2000 != 0)
			has("sticky", h.Mode&0o1000 != 0)
			has("big uid", h.Uid > 0o7777777)
			has("user xattr", h.PAXRecords["SCHILY.xattr.user.comment"] != "" || h.PAXRecords["SCHILY.xattr.user.checksum"] != "")
			has("empty file", h.Typeflag == tar.TypeReg && h.Size == 0 && !strings.HasPrefix(base, ".wh."))
			has("4MiB+ file", h.Size > 4<<20)
			has("whiteout", strings.HasPrefix(base, ".wh.") && base != ".wh..wh..opq")
			has("opaque", base == ".wh..wh..opq")
			has("./ prefix", strings.HasPrefix(h.Name, "./"))
			if h.ModTime.Nanosecond() == 0 {
				t.Errorf("layer %d %s: mtime %v has no sub-second part", i+1, h.Name, h.ModTime)
			}
		}
	}
	for _, f := range []string{
		"layer1 name>100", "layer1 path>255", "layer1 linkname>100", "layer1 hardlink",
		"layer1 relative symlink", "layer1 absolute symlink", "layer1 char", "layer1 block",
		"layer1 fifo", "layer1 setuid", "layer1 setgid", "layer1 sticky", "layer1 big uid",
		"layer1 user xattr", "layer1 empty file", "layer1 4MiB+ file",
		"layer2 whiteout", "layer2 opaque", "layer3 whiteout", "layer3 ./ prefix",
	} {
		if !features[f] {
			t.Errorf("fixture lacks %s", f)
		}
	}
}

func TestFixtureLayersAreCopies(t *testing.T) {
	a := FixtureLayers()
	a[0][0] ^= 0xff
	if b := FixtureLayers(); b[0][0] == a[0][0] {
		t.Fatal("modifying a returned layer changed the next call's result")
	}
}

func TestExtractTreeFixture(t *testing.T) {
	layers := FixtureLayers()
	tree := ExtractTree(layers)

	for _, p := range []string{
		"wh/dir1", "wh/dir1/x", "wh/dir1/sub", "wh/dir1/sub/y", // whited-out dir and subtree
		"wh/new-in-2",                            // added in 2, whited out in 3
		"opq/old1", "opq/olddir", "opq/olddir/x", // lower children of the opaque dir
		"opq/new1",               // whited out above the opaque layer
		"links/b2",               // one name of a hard-link group
		"replace/me/inner",       // dir replaced by a file again
		"replace/dir2file/child", // dir replaced by a file
	} {
		if _, ok := tree[p]; ok {
			t.Errorf("%s present, want absent", p)
		}
	}
	for p := range tree {
		if strings.Contains(p, ".wh.") || strings.HasPrefix(p, ".") || strings.Contains(p, "//") {
			t.Errorf("unexpected path %q in tree", p)
		}
		if tree[p].Implied {
			t.Errorf("%s is Implied; the fixture gives every dir an entry", p)
		}
	}

	wantFiles := map[string]string{
		"wh/keep":          "survives\n",
		"wh/file1":         "re-created in layer 3\n",
		"opq/keep-name":    "new content\n",
		"opq/newdir/z":     "z\n",
		"opq/future":       "from the future\n",
		"replace/me":       "a file again in layer 3\n",
		"replace/dir2file": "a file where layer 1 had a directory\n",
		"etc/hostname":     "weightsnap layer 2\n",
		"etc/empty":        "",
	}
	for p, content := range wantFiles {
		n := tree[p]
		if n == nil || n.Type != tar.TypeReg {
			t.Errorf("%s: want a regular file, got %+v", p, n)
			continue
		}
		if n.SHA256 != sha(content) || n.Size != int64(len(content)) {
			t.Errorf("%s: content is not %q", p, content)
		}
	}

	if n := tree["opq"]; n == nil || n.Mode != 0o750 || n.Xattrs["user.opaque"] != "yes" {
		t.Errorf("opq: want the opaque layer's attributes (0750, user.opaque), got %+v", n)
	}
	if n := tree["opq/keep-name"]; n.UID != 1000 || n.Mode != 0o600 {
		t.Errorf("opq/keep-name: want layer 2's owner and mode, got %+v", n)
	}
	if n := tree["opq/future"]; n.ModTime.Year() != 2040 || n.ModTime.Nanosecond() != 987_654_321 {
		t.Errorf("opq/future: mtime %v", n.ModTime)
	}

	groupA := []string{"links/original", "links/hard-a2", "links/sub/" + strings.Repeat("hard-a3-", 14)}
	groupB := []string{"links/b1", "links/b3"}
	for _, g := range [][]string{groupA, groupB} {
		id := tree[g[0]].LinkGroup
		if id == 0 {
			t.Errorf("%s: not in a link group", g[0])
		}
		for _, p := range g[1:] {
			if n := tree[p]; n == nil || n.LinkGroup != id {
				t.Errorf("%s: want link group of %s (%d), got %+v", p, g[0], id, n)
			}
		}
	}
	if tree[groupA[0]].LinkGroup == tree[groupB[0]].LinkGroup {
		t.Error("link groups A and B share a number")
	}
	if n := tree[groupA[1]]; n.UID != 1001 || n.Xattrs["user.who"] != "hard link group A" || n.SHA256 != sha("hard-link group A\n") {
		t.Errorf("hard link %s does not carry its inode's attributes: %+v", groupA[1], n)
	}

	checks := []struct {
		path string
		ok   func(*Node) bool
	}{
		{"dev/char-1-3", func(n *Node) bool { return n.Type == tar.TypeChar && n.Devmajor == 1 && n.Devminor == 3 }},
		{"dev/block-7-0", func(n *Node) bool { return n.Type == tar.TypeBlock && n.Devmajor == 7 && n.GID == 6 }},
		{"dev/fifo", func(n *Node) bool { return n.Type == tar.TypeFifo && n.Mode == 0o620 }},
		{"bin/setuid", func(n *Node) bool { return n.Mode == 0o4755 }},
		{"bin/setgid-dir", func(n *Node) bool { return n.Type == tar.TypeDir && n.Mode == 0o2775 }},
		{"tmp", func(n *Node) bool { return n.Mode == 0o1777 }},
		{"data/big-owner", func(n *Node) bool { return n.UID == bigID && n.GID == bigID }},
		{"links/absolute", func(n *Node) bool { return n.Type == tar.TypeSymlink && n.Linkname == "/etc/hostname" }},
		{"links/long-target", func(n *Node) bool { return n.Linkname == fixtureLongTarget }},
		{FixtureRandomFile, func(n *Node) bool {
			return n.Size == FixtureRandomSize && n.Xattrs["user.checksum"] == "chacha8" && n.ModTime.Nanosecond() != 0
		}},
		{fixtureDeepFile, func(n *Node) bool { return n.Type == tar.TypeReg }},
		{fixtureLongName, func(n *Node) bool { return n.Type == tar.TypeReg }},
	}
	for _, c := range checks {
		if n := tree[c.path]; n == nil || !c.ok(n) {
			t.Errorf("%s: unexpected node %+v", c.path, n)
		}
	}

	// The intermediate state, before layer 3.
	two := ExtractTree(layers[:2])
	if n := two["replace/me"]; n == nil || n.Type != tar.TypeDir || two["replace/me/inner"] == nil {
		t.Errorf("after layer 2, replace/me should be a directory with inner, got %+v", n)
	}
	for _, p := range []string{"wh/new-in-2", "opq/new1"} {
		if two[p] == nil {
			t.Errorf("after layer 2, %s should exist", p)
		}
	}
	for _, p := range []string{"wh/file1", "links/b2", "opq/old1"} {
		if two[p] != nil {
			t.Errorf("after layer 2, %s should be absent", p)
		}
	}
}

// mkTar builds a tar from headers; regular files get body "content of NAME".
func mkTar(t *testing.T, hdrs ...*tar.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range hdrs {
		var body []byte
		if h.Typeflag == tar.TypeReg {
			body = []byte("content of " + h.Name)
			h.Size = int64(len(body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func reg(name string) *tar.Header { return &tar.Header{Typeflag: tar.TypeReg, Name: name} }
func dir(name string) *tar.Header { return &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o700} }

func TestExtractTreeSemantics(t *testing.T) {
	lower := mkTar(t, dir("d/"), reg("d/a"), dir("d/sub/"), reg("d/sub/b"), reg("f"),
		&tar.Header{Typeflag: tar.TypeLink, Name: "f2", Linkname: "f"})

	t.Run("dir over dir keeps children", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, &tar.Header{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o711})})
		if tree["d"].Mode != 0o711 || tree["d/a"] == nil || tree["d/sub/b"] == nil {
			t.Errorf("got d=%+v a=%v sub/b=%v", tree["d"], tree["d/a"], tree["d/sub/b"])
		}
	})
	t.Run("file over dir removes subtree", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, reg("d"))})
		if tree["d"].Type != tar.TypeReg || tree["d/a"] != nil || tree["d/sub"] != nil || tree["d/sub/b"] != nil {
			t.Errorf("subtree of d survived: %v", slicesOf(tree))
		}
	})
	t.Run("opaque marker before new content at root", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, reg(".wh..wh..opq"), reg("new"))})
		if len(tree) != 1 || tree["new"] == nil {
			t.Errorf("want only new, got %v", slicesOf(tree))
		}
	})
	t.Run("whiteout of one hard link leaves a plain file", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, reg(".wh.f2"))})
		if tree["f2"] != nil || tree["f"] == nil || tree["f"].LinkGroup != 0 {
			t.Errorf("got f=%+v f2=%+v", tree["f"], tree["f2"])
		}
	})
	t.Run("overwriting a hard link breaks the group", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, reg("f"))})
		if tree["f"].LinkGroup != 0 || tree["f2"].LinkGroup != 0 || tree["f2"].SHA256 != sha("content of f") {
			t.Errorf("got f=%+v f2=%+v", tree["f"], tree["f2"])
		}
	})
	t.Run("missing and unlisted parents are implied", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, reg("d/new"), reg("x/y/z"))})
		for _, p := range []string{"d", "x", "x/y"} {
			if n := tree[p]; n == nil || n.Type != tar.TypeDir || !n.Implied {
				t.Errorf("%s: want an implied dir, got %+v", p, n)
			}
		}
		if tree["d/a"] == nil {
			t.Error("implying d must not drop its children")
		}
	})
	t.Run("non-dir parent replaced by implied dir", func(t *testing.T) {
		tree := ExtractTree([][]byte{lower, mkTar(t, reg("f/inside"))})
		if n := tree["f"]; n == nil || n.Type != tar.TypeDir || tree["f/inside"] == nil {
			t.Errorf("got f=%+v", n)
		}
	})
}

func slicesOf(tree Tree) []string {
	var ps []string
	for p := range maps.Keys(tree) {
		ps = append(ps, p)
	}
	return ps
}

// recorder is a testing.TB that records failures and skips instead of
// acting on them, to test helpers whose job is to fail or skip.
type recorder struct {
	testing.TB
	errors, fatals, skips []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}
func (r *recorder) Fatalf(format string, args ...any) {
	r.fatals = append(r.fatals, fmt.Sprintf(format, args...))
}
func (r *recorder) Skipf(format string, args ...any) {
	r.skips = append(r.skips, fmt.Sprintf(format, args...))
}

func cloneTree(tree Tree) Tree {
	out := Tree{}
	for p, n := range tree {
		cp := *n
		cp.Xattrs = maps.Clone(n.Xattrs)
		out[p] = &cp
	}
	return out
}

func TestCompareTrees(t *testing.T) {
	want := ExtractTree(FixtureLayers())

	t.Run("identical", func(t *testing.T) {
		r := &recorder{TB: t}
		CompareTrees(r, want, cloneTree(want))
		if len(r.errors) != 0 {
			t.Errorf("identical trees reported: %v", r.errors)
		}
	})

	t.Run("differences", func(t *testing.T) {
		got := cloneTree(want)
		delete(got, "etc/empty")
		got["extra-file"] = &Node{Type: tar.TypeReg}
		got["bin/setuid"].Mode = 0o755
		got[FixtureRandomFile].ModTime = got[FixtureRandomFile].ModTime.Add(time.Nanosecond)
		got["data"].Xattrs["user.comment"] = "changed"
		got["wh/keep"].SHA256 = sha("other")
		got["links/relative"].Linkname = "elsewhere"
		got["dev/char-1-3"].Devminor = 5
		got["links/hard-a2"].LinkGroup = 999 // split from its group
		got["data/big-owner"].UID = 0
		got["replace/me"] = &Node{Type: tar.TypeDir}
		got["links/absolute"].Mode = 0o755 // symlink modes are not compared

		r := &recorder{TB: t}
		CompareTrees(r, want, got)
		if len(r.errors) != 1 {
			t.Fatalf("want one error report, got %d: %v", len(r.errors), r.errors)
		}
		msg := r.errors[0]
		for _, frag := range []string{
			"missing etc/empty", "extra extra-file", "bin/setuid: mode",
			FixtureRandomFile + ": mtime", "data: user xattrs", "wh/keep: content sha256",
			"links/relative: symlink target", "dev/char-1-3: device", "links/hard-a2: hard-link group",
			"links/original: hard-link group", "data/big-owner: owner", "replace/me: type: want file, got dir",
		} {
			if !strings.Contains(msg, frag) {
				t.Errorf("report lacks %q:\n%s", frag, msg)
			}
		}
		if strings.Contains(msg, "links/absolute") {
			t.Errorf("symlink mode reported:\n%s", msg)
		}
	})

	t.Run("second mtimes", func(t *testing.T) {
		got := cloneTree(want)
		for _, n := range got {
			n.ModTime = n.ModTime.Round(time.Second)
		}
		r := &recorder{TB: t}
		CompareTrees(r, want, got)
		if len(r.errors) != 1 {
			t.Errorf("rounded mtimes not reported without WithSecondModTimes")
		}
		r = &recorder{TB: t}
		CompareTrees(r, want, got, WithSecondModTimes())
		if len(r.errors) != 0 {
			t.Errorf("rounded mtimes reported with WithSecondModTimes: %v", r.errors)
		}
		got["etc"].ModTime = got["etc"].ModTime.Add(2 * time.Second)
		r = &recorder{TB: t}
		CompareTrees(r, want, got, WithSecondModTimes())
		if len(r.errors) != 1 || !strings.Contains(r.errors[0], "etc: mtime") {
			t.Errorf("2 s mtime difference not reported: %v", r.errors)
		}
	})

	t.Run("implied dirs relaxed", func(t *testing.T) {
		w := ExtractTree([][]byte{mkTar(t, reg("x/y"))})
		got := cloneTree(w)
		got["x"].Mode, got["x"].UID, got["x"].ModTime = 0o700, 7, time.Now()
		r := &recorder{TB: t}
		CompareTrees(r, w, got)
		if len(r.errors) != 0 {
			t.Errorf("implied dir attributes compared: %v", r.errors)
		}
	})
}

// TestScanTreeMatchesContainerdApply extracts the fixture with containerd's
// own applier and checks that ScanTree of the result matches ExtractTree: it
// validates the reference semantics against a real extractor, and ScanTree
// against a real directory.
func TestScanTreeMatchesContainerdApply(t *testing.T) {
	RequireRoot(t) // mknod, chown
	root := t.TempDir()
	for i, l := range FixtureLayers() {
		if _, err := archive.Apply(t.Context(), root, bytes.NewReader(l)); err != nil {
			t.Fatalf("apply layer %d: %v", i+1, err)
		}
	}
	CompareTrees(t, ExtractTree(FixtureLayers()), ScanTree(t, root))
}

func TestRequireSkipsOrFailsOnCI(t *testing.T) {
	const absent = "weightsnap-testutil-no-such-binary"
	t.Setenv("CI", "")
	r := &recorder{TB: t}
	RequireBinary(r, absent)
	if len(r.skips) != 1 || len(r.fatals) != 0 || !strings.Contains(r.skips[0], absent) {
		t.Errorf("without CI: skips %v, fatals %v", r.skips, r.fatals)
	}
	t.Setenv("CI", "true")
	r = &recorder{TB: t}
	RequireBinary(r, absent)
	if len(r.fatals) != 1 || len(r.skips) != 0 || !strings.Contains(r.fatals[0], "CI=true") {
		t.Errorf("with CI=true: skips %v, fatals %v", r.skips, r.fatals)
	}
	if p := RequireBinary(t, "sh"); !strings.HasSuffix(p, "/sh") {
		t.Errorf("RequireBinary(sh) = %q", p)
	}
}
