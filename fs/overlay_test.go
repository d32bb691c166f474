package fs

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
)

// overlayLayers returns three layers, top-most first, that exercise what
// overlayfs does with a layer's whiteouts, opaque dirs and type changes.
func overlayLayers() []*fakeLayer {
	bottom := newFakeLayer()
	bottom.dir("a")
	bottom.file("a/kept", []byte("bottom kept"))
	bottom.file("a/deleted", []byte("bottom deleted"))
	bottom.dir("d")
	bottom.file("d/x", []byte("x"))
	bottom.file("d/y", []byte("y"))
	bottom.file("replaced", []byte("was a file"))
	bottom.file("shadowed", []byte("bottom version"))
	bottom.file("only-bottom", []byte("bottom only"))

	middle := newFakeLayer()
	middle.dir("a")
	middle.add(&layer.Entry{Name: "a/deleted", Type: layer.TypeWhiteout}, nil)
	middle.add(&layer.Entry{Name: "d", Type: layer.TypeDir, Mode: 0o755, Opaque: true}, nil)
	middle.file("d/z", []byte("z"))
	middle.file("shadowed", []byte("middle version"))

	top := newFakeLayer()
	top.dir("replaced")
	top.file("replaced/inner", []byte("now a dir"))
	top.file("shadowed", []byte("top version"))
	top.add(&layer.Entry{Name: "only-bottom-gone", Type: layer.TypeWhiteout}, nil)
	return []*fakeLayer{top, middle, bottom}
}

// mountOverlayOf mounts each layer with FUSE under dirs named by
// lowerName, and their overlay on a fresh target, all unmounted when the
// test ends (overlay first).
func mountOverlayOf(t *testing.T, layers []*fakeLayer, lowerName func(i int) string, mount func([]string, string) error) string {
	t.Helper()
	base := t.TempDir()
	var lowers []string
	for i, l := range layers {
		dir := filepath.Join(base, lowerName(i))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		m, err := Serve(t.Context(), &layer.Opened{Layer: l}, dir, WithName("test:"+lowerName(i)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := m.Unmount(); err != nil {
				t.Errorf("unmount lower %s: %v", dir, err)
			}
		})
		lowers = append(lowers, dir)
	}
	target := filepath.Join(base, "merged")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount(lowers, target); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	t.Cleanup(func() {
		if err := UnmountOverlay(target); err != nil {
			t.Errorf("UnmountOverlay: %v", err)
		}
	})
	return target
}

func checkMerged(t *testing.T, merged string) {
	t.Helper()
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(merged, name))
		if err != nil {
			t.Errorf("read %s: %v", name, err)
		}
		return string(b)
	}
	names := func(dir string) []string {
		ents, err := os.ReadDir(filepath.Join(merged, dir))
		if err != nil {
			t.Fatalf("readdir %s: %v", dir, err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}

	if got := read("a/kept"); got != "bottom kept" {
		t.Errorf("a/kept = %q", got)
	}
	if _, err := os.Lstat(filepath.Join(merged, "a/deleted")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("whited-out a/deleted: %v, want not exist", err)
	}
	if got := names("a"); !slices.Equal(got, []string{"kept"}) {
		t.Errorf("a = %q, want [kept]", got)
	}
	if got := names("d"); !slices.Equal(got, []string{"z"}) {
		t.Errorf("opaque d = %q, want [z]", got)
	}
	if _, err := os.Lstat(filepath.Join(merged, "d/x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("d/x under an opaque dir: %v, want not exist", err)
	}
	fi, err := os.Lstat(filepath.Join(merged, "replaced"))
	if err != nil || !fi.IsDir() {
		t.Errorf("replaced: %v, %v; want a directory", fi, err)
	}
	if got := read("replaced/inner"); got != "now a dir" {
		t.Errorf("replaced/inner = %q", got)
	}
	if got := read("shadowed"); got != "top version" {
		t.Errorf("shadowed = %q", got)
	}
	if got := read("only-bottom"); got != "bottom only" {
		t.Errorf("only-bottom = %q", got)
	}
	if got := names(""); !slices.Equal(got, []string{"a", "d", "only-bottom", "replaced", "shadowed"}) {
		t.Errorf("root = %q", got)
	}
	if err := os.WriteFile(filepath.Join(merged, "new"), nil, 0o644); err == nil {
		t.Error("wrote into a read-only overlay")
	}
}

func TestOverlay(t *testing.T) {
	testutil.RequireFUSE(t)
	// Lower directory names with the characters the classic option
	// string must escape.
	merged := mountOverlayOf(t, overlayLayers(), func(i int) string {
		return []string{"top:1", "mid,2", `bot\3`}[i]
	}, MountOverlay)
	checkMerged(t, merged)
}

// TestOverlayLowerdirPlus takes the path for lower lists too long for
// mount(2)'s option page.
func TestOverlayLowerdirPlus(t *testing.T) {
	testutil.RequireFUSE(t)
	long := func(i int) string { return strings.Repeat("l", 200) + string(rune('a'+i)) }
	var mounted bool
	merged := mountOverlayOf(t, overlayLayers(), long, func(lowers []string, target string) error {
		err := mountOverlayFsconfig(lowers, target)
		mounted = err == nil
		return err
	})
	if !mounted {
		t.Fatal("fsconfig mount did not run")
	}
	checkMerged(t, merged)
}

func TestLowerdirOption(t *testing.T) {
	got := lowerdirOption([]string{"/a:b", "/c,d", `/e\f`, "/g"})
	want := `lowerdir=/a\:b:/c\,d:/e\\f:/g`
	if got != want {
		t.Errorf("lowerdirOption = %q, want %q", got, want)
	}
}

func TestMountOverlayLongList(t *testing.T) {
	testutil.RequireFUSE(t)
	// Enough lowers with long names that lowerdir= exceeds a page, so
	// MountOverlay itself must switch to lowerdir+.
	var layers []*fakeLayer
	for i := range 24 {
		l := newFakeLayer()
		l.file("f"+string(rune('a'+i)), []byte{byte(i)})
		layers = append(layers, l)
	}
	name := func(i int) string { return strings.Repeat("n", 180) + string(rune('a'+i)) }
	merged := mountOverlayOf(t, layers, name, func(lowers []string, target string) error {
		if len(lowerdirOption(lowers)) <= maxMountData {
			t.Fatalf("option of %d bytes fits a page; the test needs a longer one", len(lowerdirOption(lowers)))
		}
		return MountOverlay(lowers, target)
	})
	ents, err := os.ReadDir(merged)
	if err != nil || len(ents) != len(layers) {
		t.Fatalf("merged root: %d entries, %v; want %d", len(ents), err, len(layers))
	}
}

// TestMountOverlaySingleLower checks the read-only bind used for a
// single lower, which overlayfs itself refuses without an upper.
func TestMountOverlaySingleLower(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("model.bin", []byte("weights"))
	merged := mountOverlayOf(t, []*fakeLayer{l}, func(int) string { return "only" }, MountOverlay)
	if b, err := os.ReadFile(filepath.Join(merged, "model.bin")); err != nil || string(b) != "weights" {
		t.Errorf("read through single-lower mount = %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(merged, "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write into single-lower mount: %v, want EROFS", err)
	}
}
