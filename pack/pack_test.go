package pack

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// testThreshold makes files of 512 KiB and more large in tests.
const testThreshold = 512 << 10

// fileSpec is one path of a test model directory.
type fileSpec struct {
	path string // slash-separated, relative to the model dir
	data []byte
	mode os.FileMode // for files; 0 means 0644
	link string      // symlink target if set
	dir  bool
}

func randomBytes(n int, seed byte) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{seed}).Read(b)
	return b
}

// modelSpec is a model directory with every kind of entry Build handles:
// nested dirs, an empty dir, an empty file, an executable, a symlink, and
// large files at, above and (just) below the threshold.
func modelSpec() []fileSpec {
	return []fileSpec{
		{path: "config.json", data: []byte(`{"hidden_size": 64}`)},
		{path: "tokenizer.json", data: randomBytes(10<<10, 1)},
		{path: "empty", data: nil},
		{path: "run.sh", data: []byte("#!/bin/sh\necho hi\n"), mode: 0o700},
		{path: "emptydir", dir: true},
		{path: "sub/dir/readme.txt", data: []byte("hello\n")},
		{path: "sub/almost.bin", data: randomBytes(testThreshold-1, 2)},
		{path: "sub/adapter.bin", data: randomBytes(testThreshold, 3)},
		{path: "model-00002.safetensors", data: randomBytes(1<<20, 4)},
		{path: "model-00001.safetensors", data: randomBytes(3<<19, 5)},
		{path: "latest", link: "model-00001.safetensors"},
	}
}

// writeModel creates the spec under dir. fileMode overrides the mode of
// non-executable files, so copies can differ in permissions.
func writeModel(t *testing.T, dir string, spec []fileSpec, fileMode os.FileMode) {
	t.Helper()
	for _, f := range spec {
		p := filepath.Join(dir, filepath.FromSlash(f.path))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		switch {
		case f.dir:
			if err := os.MkdirAll(p, 0o700); err != nil {
				t.Fatal(err)
			}
		case f.link != "":
			if err := os.Symlink(f.link, p); err != nil {
				t.Fatal(err)
			}
		default:
			mode := fileMode
			if f.mode != 0 {
				mode = f.mode
			}
			if err := os.WriteFile(p, f.data, mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(p, mode); err != nil { // WriteFile applies the umask
				t.Fatal(err)
			}
		}
	}
}

func build(t *testing.T, dir string, opt Options) v1.Image {
	t.Helper()
	if opt.LargeFileThreshold == 0 {
		opt.LargeFileThreshold = testThreshold
	}
	img, err := Build(context.Background(), dir, opt)
	if err != nil {
		t.Fatalf("Build(%s): %v", dir, err)
	}
	return img
}

func digestOf(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestBuildIsDeterministic(t *testing.T) {
	spec := modelSpec()
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, spec, 0o644)

	first := digestOf(t, build(t, dir, Options{}))
	if second := digestOf(t, build(t, dir, Options{})); second != first {
		t.Fatalf("two builds of one dir: %s then %s", first, second)
	}

	// A copy elsewhere with other permissions and times: same image.
	cp := filepath.Join(t.TempDir(), "elsewhere", "tiny-llama")
	writeModel(t, cp, spec, 0o600)
	old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	filepath.WalkDir(cp, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type()&fs.ModeSymlink == 0 {
			os.Chtimes(p, old, old)
		}
		return err
	})
	if got := digestOf(t, build(t, cp, Options{})); got != first {
		t.Fatalf("copied dir built to %s, original to %s", got, first)
	}

	// A symlink to the dir packs the dir, under the link's name.
	link := filepath.Join(t.TempDir(), "tiny-llama")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	if got := digestOf(t, build(t, link, Options{})); got != first {
		t.Fatalf("dir reached through a symlink built to %s, want %s", got, first)
	}

	// Content matters: one changed byte in a large file changes the image.
	p := filepath.Join(cp, "model-00002.safetensors")
	b, _ := os.ReadFile(p)
	b[len(b)/2] ^= 1
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if got := digestOf(t, build(t, cp, Options{})); got == first {
		t.Fatal("changing a weight file did not change the image digest")
	}

	// KeepMtime makes times part of the image.
	if got := digestOf(t, build(t, dir, Options{KeepMtime: true})); got == first {
		t.Fatal("KeepMtime did not change the image digest")
	}
}

// tarEntry is what a test reads back from a layer.
type tarEntry struct {
	typ  byte
	mode int64
	link string
	data []byte
}

func readLayer(t *testing.T, l v1.Layer) (names []string, entries map[string]tarEntry) {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	entries = map[string]tarEntry{}
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 || !hdr.ModTime.Equal(time.Unix(0, 0)) {
			t.Errorf("%s: uid %d gid %d mtime %v, want 0 0 epoch", hdr.Name, hdr.Uid, hdr.Gid, hdr.ModTime)
		}
		names = append(names, hdr.Name)
		entries[hdr.Name] = tarEntry{typ: hdr.Typeflag, mode: hdr.Mode, link: hdr.Linkname, data: data}
	}
	// The tar must be fully consumed for the stream's own check to run.
	if _, err := io.Copy(io.Discard, rc); err != nil {
		t.Fatalf("layer stream: %v", err)
	}
	return names, entries
}

func TestLayout(t *testing.T) {
	spec := modelSpec()
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, spec, 0o644)
	img := build(t, dir, Options{})
	const prefix = "models/tiny-llama"

	man, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if man.MediaType != types.OCIManifestSchema1 || man.Config.MediaType != types.OCIConfigJSON {
		t.Fatalf("manifest media type %q, config %q", man.MediaType, man.Config.MediaType)
	}
	wantLarge := []string{ // path order
		"model-00001.safetensors", "model-00002.safetensors", "sub/adapter.bin",
	}
	if len(man.Layers) != 1+len(wantLarge) {
		t.Fatalf("%d layers, want %d", len(man.Layers), 1+len(wantLarge))
	}
	for i, d := range man.Layers {
		if d.MediaType != types.OCIUncompressedLayer {
			t.Errorf("layer %d media type %q", i, d.MediaType)
		}
		wantTitle := ""
		if i > 0 {
			wantTitle = path.Join(prefix, wantLarge[i-1])
		}
		if got := d.Annotations[AnnotationTitle]; got != wantTitle {
			t.Errorf("layer %d title %q, want %q", i, got, wantTitle)
		}
	}

	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s", cfg.OS, cfg.Architecture)
	}
	if !cfg.Created.Equal(time.Unix(0, 0)) {
		t.Errorf("created %v", cfg.Created)
	}
	if cfg.RootFS.Type != "layers" || len(cfg.RootFS.DiffIDs) != len(man.Layers) {
		t.Fatalf("rootfs %+v", cfg.RootFS)
	}
	if len(cfg.History) != len(man.Layers) {
		t.Errorf("%d history entries for %d layers", len(cfg.History), len(man.Layers))
	}
	raw, _ := img.RawConfigFile()
	if h := sha256.Sum256(raw); "sha256:"+hex.EncodeToString(h[:]) != man.Config.Digest.String() {
		t.Error("config digest in the manifest does not match the config")
	}

	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		// Digest, DiffID, Size and the bytes of the stream agree.
		d, _ := l.Digest()
		diff, _ := l.DiffID()
		size, _ := l.Size()
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		n, err := io.Copy(h, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("layer %d stream: %v", i, err)
		}
		got := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
		if got != d || d != diff || d != man.Layers[i].Digest || diff != cfg.RootFS.DiffIDs[i] {
			t.Errorf("layer %d: stream %s, digest %s, diffid %s, manifest %s, config %s",
				i, got, d, diff, man.Layers[i].Digest, cfg.RootFS.DiffIDs[i])
		}
		if n != size || size != man.Layers[i].Size {
			t.Errorf("layer %d: stream %d bytes, Size %d, manifest %d", i, n, size, man.Layers[i].Size)
		}
	}

	// First layer: every directory and every small entry, sorted.
	names, entries := readLayer(t, layers[0])
	if !sort.StringsAreSorted(names) {
		t.Errorf("first layer not sorted: %q", names)
	}
	want := map[string]tarEntry{
		"models/":             {typ: tar.TypeDir, mode: 0o755},
		prefix + "/":          {typ: tar.TypeDir, mode: 0o755},
		prefix + "/sub/":      {typ: tar.TypeDir, mode: 0o755},
		prefix + "/sub/dir/":  {typ: tar.TypeDir, mode: 0o755},
		prefix + "/emptydir/": {typ: tar.TypeDir, mode: 0o755},
	}
	isLarge := map[string]bool{}
	for _, p := range wantLarge {
		isLarge[p] = true
	}
	for _, f := range spec {
		switch {
		case f.dir || isLarge[f.path]:
		case f.link != "":
			want[prefix+"/"+f.path] = tarEntry{typ: tar.TypeSymlink, mode: 0o777, link: f.link}
		default:
			mode := int64(0o644)
			if f.mode&0o111 != 0 {
				mode = 0o755
			}
			want[prefix+"/"+f.path] = tarEntry{typ: tar.TypeReg, mode: mode, data: f.data}
		}
	}
	compareEntries(t, "layer 0", entries, want)

	// Then one layer per large file, holding just that file.
	for i, p := range wantLarge {
		var data []byte
		for _, f := range spec {
			if f.path == p {
				data = f.data
			}
		}
		_, entries := readLayer(t, layers[i+1])
		compareEntries(t, p, entries, map[string]tarEntry{
			prefix + "/" + p: {typ: tar.TypeReg, mode: 0o644, data: data},
		})
	}
}

func compareEntries(t *testing.T, what string, got, want map[string]tarEntry) {
	t.Helper()
	for n, w := range want {
		g, ok := got[n]
		if !ok {
			t.Errorf("%s: missing %s", what, n)
			continue
		}
		if g.typ != w.typ || g.mode != w.mode || g.link != w.link || !bytes.Equal(g.data, w.data) {
			t.Errorf("%s: %s is type %c mode %o link %q, %d bytes; want type %c mode %o link %q, %d bytes",
				what, n, g.typ, g.mode, g.link, len(g.data), w.typ, w.mode, w.link, len(w.data))
		}
	}
	for n := range got {
		if _, ok := want[n]; !ok {
			t.Errorf("%s: unexpected entry %s", what, n)
		}
	}
}

func TestPrefix(t *testing.T) {
	for _, tc := range []struct{ opt, want string }{
		{"", "models/m"},
		{"/", ""},
		{".", ""},
		{"/opt/weights/", "opt/weights"},
		{"a/../../b", "b"},
	} {
		if got := imagePrefix(tc.opt, "/x/m"); got != tc.want {
			t.Errorf("imagePrefix(%q) = %q, want %q", tc.opt, got, tc.want)
		}
	}

	dir := t.TempDir()
	writeModel(t, dir, []fileSpec{{path: "a/b.txt", data: []byte("b")}}, 0o644)
	layers, err := build(t, dir, Options{Prefix: "/"}).Layers()
	if err != nil {
		t.Fatal(err)
	}
	names, _ := readLayer(t, layers[0])
	if strings.Join(names, " ") != "a/ a/b.txt" {
		t.Fatalf("root prefix layer entries %q", names)
	}
}

func TestBuildErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := Build(ctx, filepath.Join(t.TempDir(), "missing"), Options{}); err == nil {
		t.Error("Build of a missing dir succeeded")
	}
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, nil, 0o644)
	if _, err := Build(ctx, file, Options{}); err == nil {
		t.Error("Build of a file succeeded")
	}

	dir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(ctx, dir, Options{}); err == nil || !strings.Contains(err.Error(), "unsupported file type") {
		t.Errorf("Build with a fifo: %v", err)
	}

	dir = t.TempDir()
	writeModel(t, dir, modelSpec(), 0o644)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Build(cctx, dir, Options{LargeFileThreshold: testThreshold}); !errors.Is(err, context.Canceled) {
		t.Errorf("Build with a cancelled context: %v", err)
	}
}

func TestChangedFileFailsStream(t *testing.T) {
	dir := t.TempDir()
	writeModel(t, dir, modelSpec(), 0o644)
	img := build(t, dir, Options{})
	layers, _ := img.Layers()

	// Same size, other bytes: only the digest check can notice.
	p := filepath.Join(dir, "model-00001.safetensors")
	b, _ := os.ReadFile(p)
	b[0] ^= 0xff
	os.WriteFile(p, b, 0o644)
	rc, err := layers[1].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.Copy(io.Discard, rc); !errors.Is(err, errChanged) {
		t.Fatalf("stream of a changed file: %v, want errChanged", err)
	}

	// Shrunk: the tar can't even be written.
	os.WriteFile(p, b[:10], 0o644)
	rc2, _ := layers[1].Compressed()
	defer rc2.Close()
	if _, err := io.Copy(io.Discard, rc2); err == nil || !strings.Contains(err.Error(), "shrank") {
		t.Fatalf("stream of a shrunk file: %v", err)
	}
}

func (c *uploadCounter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/blobs/uploads") && r.Method != http.MethodGet && r.Method != http.MethodHead {
			c.mu.Lock()
			c.n++
			c.mu.Unlock()
		}
		h.ServeHTTP(w, r)
	})
}

func (c *uploadCounter) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func TestHashLayersFirstError(t *testing.T) {
	dir := t.TempDir()
	var layers []*layer
	for i := range 8 {
		p := filepath.Join(dir, strconv.Itoa(i))
		if i != 5 { // layer 5's file is missing
			if err := os.WriteFile(p, randomBytes(64<<10, byte(i)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		layers = append(layers, &layer{entries: []entry{{name: strconv.Itoa(i), typ: tar.TypeReg, mode: 0o644, size: 64 << 10, src: p, mtime: epoch}}})
	}
	err := hashLayers(context.Background(), layers)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), filepath.Join(dir, "5")) {
		t.Fatalf("hashLayers with a missing file: %v", err)
	}
	if err := hashLayers(context.Background(), append(layers[:5:5], layers[6:]...)); err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if i != 5 && l.size != 512+64<<10+1024 { // header, data, end of archive
			t.Errorf("layer %d: size %d", i, l.size)
		}
	}
}
