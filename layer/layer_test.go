package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

const (
	mtTar     = "application/vnd.oci.image.layer.v1.tar"
	mtGzip    = "application/vnd.oci.image.layer.v1.tar+gzip"
	mtZstd    = "application/vnd.oci.image.layer.v1.tar+zstd"
	mtGeneric = "application/octet-stream"
)

func testCtx(t *testing.T) context.Context {
	// A deadline so that a bug makes the test fail instead of hanging; no
	// assertion depends on timing.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// richFiles covers every feature the index handles.
func richFiles() []tarFile {
	mt := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	hires := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	reg := func(name string, mode int64, uid, gid int, data string) tarFile {
		return tarFile{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: gid, ModTime: mt}, data: []byte(data)}
	}
	dir := func(name string, mode int64, uid, gid int) tarFile {
		return tarFile{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: gid, ModTime: mt}}
	}
	other := func(typ byte, name, link string, mode int64) tarFile {
		return tarFile{hdr: tar.Header{Typeflag: typ, Name: name, Linkname: link, Mode: mode, ModTime: mt}}
	}
	dev := func(typ byte, name string, major, minor int64) tarFile {
		return tarFile{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0o660, Gid: 6, Devmajor: major, Devminor: minor, ModTime: mt}}
	}
	xa := reg("xattr", 0o644, 0, 0, "x")
	xa.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.foo": "bar", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"}
	hr := reg("hires", 0o644, 0, 0, "t")
	hr.hdr.ModTime = hires
	hr.hdr.Format = tar.FormatPAX
	gnu := reg("gnu/"+strings.Repeat("g", 120), 0o644, 4, 4, "gnu long name")
	gnu.hdr.Format = tar.FormatGNU
	gnuLink := other(tar.TypeSymlink, "gnu/link", strings.Repeat("t", 130), 0o777)
	gnuLink.hdr.Format = tar.FormatGNU
	return []tarFile{
		dir("./", 0o755, 0, 0),
		gnu,
		gnuLink,
		dir("a/", 0o750, 1000, 1000),
		reg("a/file.txt", 0o644, 1000, 100, "hello world\n"),
		other(tar.TypeLink, "a/hl1", "a/file.txt", 0o644),
		other(tar.TypeLink, "./hl2", "./a/file.txt", 0o644),
		reg("long/"+strings.Repeat("n", 150), 0o600, 2, 3, "long name"),
		reg(strings.Repeat("deep/", 55)+"file", 0o644, 0, 0, "deep path"),
		other(tar.TypeSymlink, "rel", "a/file.txt", 0o777),
		other(tar.TypeSymlink, "abs", "/etc/passwd", 0o777),
		other(tar.TypeSymlink, "dangling", "../../nope", 0o777),
		dir("dev/", 0o755, 0, 0),
		dev(tar.TypeChar, "dev/null", 1, 3),
		dev(tar.TypeBlock, "dev/sda", 8, 0),
		other(tar.TypeFifo, "fifo", "", 0o600),
		reg("bin/su", 0o4755, 0, 0, "su"),
		dir("tmp/", 0o1777, 0, 0),
		reg("sgid", 0o2755, 5, 7, "g"),
		xa,
		reg("empty", 0o644, 0, 0, ""),
		reg("a/.wh.gone", 0o644, 0, 0, ""),
		dir("opq/", 0o755, 0, 0),
		reg("opq/.wh..wh..opq", 0o644, 0, 0, ""),
		reg("opq/keep", 0o644, 0, 0, "k"),
		reg("implied/deep/file", 0o644, 0, 0, "x"),
		reg("dup", 0o644, 0, 0, "first"),
		reg("dup", 0o640, 9, 9, "second version"),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "big.bin", Mode: 0o644, ModTime: mt}, data: randBytes(1, 300<<10)},
		hr,
	}
}

// format is one way to serve a tar.
type format struct {
	name      string
	secondsMT bool // the format keeps mtimes to the second only
	open      func(t *testing.T, ctx context.Context, tarb []byte) Layer
}

func compress(t testing.TB, kind string, b []byte) []byte {
	var buf bytes.Buffer
	var w io.WriteCloser
	switch kind {
	case "gzip":
		w = gzip.NewWriter(&buf)
	case "zstd":
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		w = zw
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func opener(b []byte) func(context.Context) (io.ReadCloser, error) {
	return func(context.Context) (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
}

func buildStargz(t testing.TB, tarb []byte, opts ...estargz.Option) *estargz.Blob {
	opts = append([]estargz.Option{estargz.WithChunkSize(64 << 10)}, opts...)
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarb), 0, int64(len(tarb))), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { blob.Close() })
	return blob
}

// buildZstdChunked builds a zstd:chunked blob of tarb and returns it with
// the annotations its compressor gives it: the manifest checksum (the
// digest of the compressed TOC as stored, not of its JSON) and position.
func buildZstdChunked(t testing.TB, tarb []byte, opts ...estargz.Option) (*estargz.Blob, map[string]string) {
	t.Helper()
	ann := map[string]string{}
	zc := zstdChunked{&zstdchunked.Compressor{CompressionLevel: zstd.SpeedFastest, Metadata: ann}, &zstdchunked.Decompressor{}}
	blob := buildStargz(t, tarb, append(opts, estargz.WithCompression(zc))...)
	if ann[zstdchunked.ManifestChecksumAnnotation] == "" {
		t.Fatalf("the compressor gave no manifest checksum: %v", ann)
	}
	return blob, ann
}

func openVia(t *testing.T, ctx context.Context, mediaType string, blob []byte, diffID digest.Digest, ann map[string]string) Layer {
	d := Descriptor{Digest: sha(blob), Size: int64(len(blob)), MediaType: mediaType, DiffID: diffID, Annotations: ann}
	op, err := Open(ctx, d, &memSource{b: blob}, WithStreams(opener(blob), newMemStreams()), WithMeta(newMemMeta()))
	if err != nil {
		t.Fatalf("open %s: %v", mediaType, err)
	}
	t.Cleanup(func() { op.Close() })
	_, streamed := op.Layer.(*streamLayer)
	_, tar := op.Layer.(*tarLayer)
	if op.Streamed != streamed || (op.Ranges != nil) != tar {
		t.Fatalf("open %s: %T says Streamed=%v, Ranges=%v", mediaType, op.Layer, op.Streamed, op.Ranges != nil)
	}
	return op.Layer
}

var formats = []format{
	{name: "tar", open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		l := openVia(t, ctx, mtTar, tarb, sha(tarb), nil)
		if _, ok := l.(*tarLayer); !ok {
			t.Fatalf("Open chose %T", l)
		}
		return l
	}},
	{name: "tar-generic", open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		return openVia(t, ctx, mtGeneric, tarb, sha(tarb), nil)
	}},
	{name: "gzip", open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		l := openVia(t, ctx, mtGzip, compress(t, "gzip", tarb), sha(tarb), nil)
		if _, ok := l.(*streamLayer); !ok {
			t.Fatalf("Open chose %T", l)
		}
		return l
	}},
	{name: "zstd", open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		return openVia(t, ctx, mtGeneric, compress(t, "zstd", tarb), sha(tarb), nil)
	}},
	{name: "estargz", secondsMT: true, open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		blob := buildStargz(t, tarb)
		b, err := io.ReadAll(blob)
		if err != nil {
			t.Fatal(err)
		}
		ann := map[string]string{estargz.TOCJSONDigestAnnotation: blob.TOCDigest().String()}
		l := openVia(t, ctx, mtGzip, b, blob.DiffID(), ann)
		if _, ok := l.(*stargzLayer); !ok {
			t.Fatalf("Open chose %T", l)
		}
		return l
	}},
	{name: "estargz-footer-only", secondsMT: true, open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		blob := buildStargz(t, tarb, estargz.WithMinChunkSize(1<<10))
		b, err := io.ReadAll(blob)
		if err != nil {
			t.Fatal(err)
		}
		l := openVia(t, ctx, mtGeneric, b, blob.DiffID(), nil)
		if _, ok := l.(*stargzLayer); !ok {
			t.Fatalf("Open chose %T", l)
		}
		return l
	}},
	{name: "zstdchunked", secondsMT: true, open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		blob, ann := buildZstdChunked(t, tarb)
		b, err := io.ReadAll(blob)
		if err != nil {
			t.Fatal(err)
		}
		l := openVia(t, ctx, mtZstd, b, blob.DiffID(), ann)
		if _, ok := l.(*stargzLayer); !ok {
			t.Fatalf("Open chose %T", l)
		}
		return l
	}},
	{name: "tar-claimed", open: func(t *testing.T, ctx context.Context, tarb []byte) Layer {
		// Indexed from the tar header annotation, confirmed against the blob.
		d := claimedDesc(tarb, annotate(t, tarb))
		op, err := Open(ctx, d, &memSource{b: tarb}, WithTarHeaders(), WithMeta(newMemMeta()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { op.Close() })
		if op.Confirm == nil {
			t.Fatal("the annotation was not used")
		}
		return op.Layer
	}},
}

// want is what archive/tar says an entry is.
type want struct {
	hdr   *tar.Header
	data  []byte
	group int // entries with the same group are hard links of each other
}

func tarTruth(t *testing.T, tarb []byte) (map[string]*want, map[string]bool) {
	t.Helper()
	entries := map[string]*want{}
	opaque := map[string]bool{}
	clean := func(n string) string { return strings.TrimPrefix(path.Clean("/"+n), "/") }
	tr := tar.NewReader(bytes.NewReader(tarb))
	for g := 0; ; g++ {
		h, err := tr.Next()
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
		name := clean(h.Name)
		base := path.Base(name)
		switch {
		case base == ".wh..wh..opq":
			opaque[path.Dir(name)] = true
			continue
		case strings.HasPrefix(base, ".wh."):
			name = path.Join(path.Dir(name), strings.TrimPrefix(base, ".wh."))
		}
		w := &want{hdr: h, data: data, group: g}
		if h.Typeflag == tar.TypeLink {
			tgt := entries[clean(h.Linkname)]
			w.data, w.group = tgt.data, tgt.group
		}
		entries[name] = w
	}
	return entries, opaque
}

func TestIndexMatchesTar(t *testing.T) {
	tarb := buildTar(t, richFiles())
	truth, opaque := tarTruth(t, tarb)
	groups := map[int]int{}
	for _, w := range truth {
		groups[w.group]++
	}
	for _, f := range formats {
		t.Run(f.name, func(t *testing.T) {
			ctx := testCtx(t)
			l := f.open(t, ctx, tarb)
			// The truth is the whole layer's: wait for a streamed layer's
			// index to be complete, since a name the tar holds twice or a
			// hard link seen later changes an entry already indexed.
			if _, err := l.ReadDir(ctx, ""); err != nil {
				t.Fatalf("readdir: %v", err)
			}
			inos := map[uint64]int{}
			for name, w := range truth {
				if name == "" {
					continue
				}
				e, err := l.Lookup(ctx, name)
				if err != nil {
					t.Errorf("lookup %q: %v", name, err)
					continue
				}
				checkEntry(t, l, ctx, e, name, w, f.secondsMT)
				if g, ok := inos[e.Ino]; ok && g != w.group {
					t.Errorf("%q: ino %d shared with another group", name, e.Ino)
				}
				inos[e.Ino] = w.group
				if (w.hdr.Typeflag == tar.TypeReg || w.hdr.Typeflag == tar.TypeLink) && !strings.HasPrefix(path.Base(w.hdr.Name), ".wh.") {
					if int(e.Nlink) != groups[w.group] {
						t.Errorf("%q: nlink %d, want %d", name, e.Nlink, groups[w.group])
					}
				}
			}
			hl, _ := l.Lookup(ctx, "hl2")
			tgt, _ := l.Lookup(ctx, "a/file.txt")
			if hl == nil || tgt == nil || hl.Ino != tgt.Ino || tgt.Nlink != 3 {
				t.Errorf("hard links: %+v %+v", hl, tgt)
			}
			root, err := l.Lookup(ctx, "")
			if err != nil || root.Ino != 1 || root.Type != TypeDir {
				t.Errorf("root: %+v, %v", root, err)
			}
			for d := range opaque {
				e, err := l.Lookup(ctx, d)
				if err != nil || !e.Opaque {
					t.Errorf("%q not opaque: %+v %v", d, e, err)
				}
			}
			if _, err := l.Lookup(ctx, "opq/.wh..wh..opq"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("opaque marker listed: %v", err)
			}
			if _, err := l.Lookup(ctx, "nonexistent"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("lookup of a missing name: %v", err)
			}
			for _, d := range []string{"implied", "implied/deep", "long", "deep/deep"} {
				e, err := l.Lookup(ctx, d)
				if err != nil || e.Type != TypeDir || e.Mode != 0o755 || e.UID != 0 {
					t.Errorf("implied dir %q: %+v %v", d, e, err)
				}
			}
			checkListing(t, ctx, l, truth)
		})
	}
}

func checkEntry(t *testing.T, l Layer, ctx context.Context, e *Entry, name string, w *want, secondsMT bool) {
	t.Helper()
	h := w.hdr
	if e.Name != name {
		t.Errorf("%q: name %q", name, e.Name)
	}
	wantType := map[byte]Type{tar.TypeReg: TypeReg, tar.TypeDir: TypeDir, tar.TypeSymlink: TypeSymlink,
		tar.TypeChar: TypeChar, tar.TypeBlock: TypeBlock, tar.TypeFifo: TypeFifo, tar.TypeLink: TypeReg}[h.Typeflag]
	if strings.HasPrefix(path.Base(h.Name), ".wh.") {
		if e.Type != TypeWhiteout || e.Devmajor != 0 || e.Devminor != 0 {
			t.Errorf("%q: whiteout %+v", name, e)
		}
		return
	}
	if e.Type != wantType {
		t.Errorf("%q: type %d, want %d", name, e.Type, wantType)
	}
	if h.Typeflag != tar.TypeLink {
		if e.Mode != uint32(h.Mode&0o7777) || e.UID != uint32(h.Uid) || e.GID != uint32(h.Gid) {
			t.Errorf("%q: mode %o %d:%d, want %o %d:%d", name, e.Mode, e.UID, e.GID, h.Mode, h.Uid, h.Gid)
		}
		wantMT := h.ModTime
		if secondsMT {
			wantMT = wantMT.Round(time.Second)
		}
		if !e.ModTime.Equal(wantMT) {
			t.Errorf("%q: mtime %v, want %v", name, e.ModTime, wantMT)
		}
	}
	if e.Type == TypeSymlink && e.Linkname != h.Linkname {
		t.Errorf("%q: link %q, want %q", name, e.Linkname, h.Linkname)
	}
	if (e.Type == TypeChar || e.Type == TypeBlock) && (int64(e.Devmajor) != h.Devmajor || int64(e.Devminor) != h.Devminor) {
		t.Errorf("%q: dev %d/%d", name, e.Devmajor, e.Devminor)
	}
	wantX := map[string]string{}
	for k, v := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			wantX[x] = v
		}
	}
	if len(wantX) != len(e.Xattrs) {
		t.Errorf("%q: xattrs %q, want %q", name, e.Xattrs, wantX)
	}
	for k, v := range wantX {
		if e.Xattrs[k] != v {
			t.Errorf("%q: xattr %q = %q, want %q", name, k, e.Xattrs[k], v)
		}
	}
	if e.Type == TypeReg {
		if e.Size != int64(len(w.data)) {
			t.Errorf("%q: size %d, want %d", name, e.Size, len(w.data))
		}
		if got := readAll(t, ctx, l, e); !bytes.Equal(got, w.data) {
			t.Errorf("%q: content differs (%d bytes, want %d)", name, len(got), len(w.data))
		}
		// A read in the middle with io.ReaderAt semantics.
		if e.Size > 3 {
			p := make([]byte, e.Size)
			n, err := l.ReadAt(ctx, e, p, 2)
			if n != int(e.Size-2) || err != io.EOF || !bytes.Equal(p[:n], w.data[2:]) {
				t.Errorf("%q: tail read n=%d err=%v", name, n, err)
			}
		}
	}
}

func checkListing(t *testing.T, ctx context.Context, l Layer, truth map[string]*want) {
	t.Helper()
	all := map[string]bool{"": true}
	for n := range truth {
		for d := n; d != "." && d != ""; d = path.Dir(d) {
			all[d] = true
		}
	}
	children := map[string][]string{}
	for n := range all {
		if n != "" {
			p := path.Dir(n)
			if p == "." {
				p = ""
			}
			children[p] = append(children[p], n)
		}
	}
	for d := range all {
		e, _ := l.Lookup(ctx, d)
		if e == nil || e.Type != TypeDir {
			continue
		}
		ents, err := l.ReadDir(ctx, d)
		if err != nil {
			t.Errorf("readdir %q: %v", d, err)
			continue
		}
		var got []string
		for _, e := range ents {
			got = append(got, e.Name)
		}
		w := children[d]
		slices.Sort(w)
		if !slices.Equal(got, w) {
			t.Errorf("readdir %q: %q, want %q", d, got, w)
		}
	}
	if _, err := l.ReadDir(ctx, "a/file.txt"); err == nil {
		t.Errorf("readdir of a file succeeded")
	}
}

func TestTarFilesAreContiguousRanges(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	contents := map[string]string{"a/config.json": "{}", "a/model.safetensors": strings.Repeat("w", 3000), "b": "bee"}
	for _, name := range []string{"a/config.json", "a/model.safetensors", "b"} {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(contents[name])), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(contents[name]))
	}
	// Hard links to b, named before and after it: a file is listed once,
	// under the same name every time (the fill order depends on it).
	for _, name := range []string{"0-link", "z-link"} {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: "b"}); err != nil {
			t.Fatal(err)
		}
	}
	tw.Close()
	blob := buf.Bytes()
	l, err := openTar(context.Background(), Descriptor{Digest: digest.FromBytes(blob), Size: int64(len(blob))}, &memSource{b: blob}, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := l.Size(), int64(2+3000+3); got != want {
		t.Errorf("Size() = %d, want %d (each hard-link group once)", got, want)
	}
	files := l.Files()
	for range 20 {
		if again := l.Files(); !slices.Equal(again, files) {
			t.Fatalf("Files() changed between calls: %v, then %v", files, again)
		}
	}
	contents["0-link"] = contents["b"]
	if files[2].Name != "0-link" {
		t.Errorf("hard-link group listed as %q, want its least name 0-link", files[2].Name)
	}
	if len(files) != 3 {
		t.Fatalf("Files() = %v, want 3 files", files)
	}
	for i, f := range files {
		if i > 0 && f.Off <= files[i-1].Off {
			t.Errorf("files not in blob order: %v", files)
		}
		if got := string(blob[f.Off : f.Off+f.Len]); got != contents[f.Name] {
			t.Errorf("%s: blob range holds %q, want %q", f.Name, got, contents[f.Name])
		}
		e, err := l.Lookup(context.Background(), f.Name)
		if err != nil {
			t.Fatal(err)
		}
		if r, ok := l.DataRange(e); !ok || r != f {
			t.Errorf("DataRange(%s) = %v, %v; want %v", f.Name, r, ok, f)
		}
	}
}
