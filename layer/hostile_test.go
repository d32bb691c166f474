package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"slices"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// hostileTar writes headers verbatim (archive/tar's writer does not judge
// names), each regular file with content "x".
func hostileTar(t testing.TB, hdrs ...tar.Header) []byte {
	var files []tarFile
	for _, h := range hdrs {
		f := tarFile{hdr: h}
		if h.Typeflag == tar.TypeReg {
			f.data = []byte("x")
		}
		files = append(files, f)
	}
	return buildTar(t, files)
}

func TestHostileNamesRefused(t *testing.T) {
	reg := func(name string) tar.Header { return tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644} }
	link := func(name, target string) tar.Header {
		return tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target}
	}
	tarb := hostileTar(t,
		reg("ok"),
		reg("../x"),
		reg("a/../../y"),
		reg("/abs"),
		reg("./../z"),
		link("pw", "../../etc/passwd"),
		link("missing", "not/there"),
		link("later", "defined-later"),
		reg("defined-later"),
		tar.Header{Typeflag: tar.TypeSymlink, Name: "lnk", Linkname: "/etc"},
		reg("lnk/passwd"), // parent is a symlink
		reg("ok/child"),   // parent is a file
		tar.Header{Typeflag: tar.TypeDir, Name: "d/"},
		link("dirlink", "d"),
		reg(".wh.."),
		tar.Header{Typeflag: 'Z', Name: "weird"},
	)
	for _, f := range formats[:3] {
		t.Run(f.name, func(t *testing.T) {
			ctx := testCtx(t)
			l := f.open(t, ctx, tarb)
			for _, n := range []string{"x", "y", "z", "../x", "pw", "missing", "later", "lnk/passwd", "ok/child", "dirlink", "weird", "etc/passwd", ""} {
				if n == "" {
					continue
				}
				if e, err := l.Lookup(ctx, n); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%q: %+v %v, want refused", n, e, err)
				}
			}
			// A leading "/" is stripped, as tar and containerd do: the
			// entry lands inside the layer.
			for _, n := range []string{"ok", "abs", "defined-later", "lnk", "d"} {
				if _, err := l.Lookup(ctx, n); err != nil {
					t.Errorf("%q: %v", n, err)
				}
			}
			ents, err := l.ReadDir(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, e := range ents {
				names = append(names, e.Name)
			}
			if want := []string{"abs", "d", "defined-later", "lnk", "ok"}; !slices.Equal(names, want) {
				t.Errorf("root lists %q, want %q", names, want)
			}
		})
	}
}

func TestHostileStructureErrors(t *testing.T) {
	good := hostileTar(t, tar.Header{Typeflag: tar.TypeReg, Name: "a", Mode: 0o644}, tar.Header{Typeflag: tar.TypeReg, Name: "b", Mode: 0o644})
	// A header claiming 1<<62 bytes, followed by a little data.
	var huge bytes.Buffer
	tw := tar.NewWriter(&huge)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "huge", Size: 1 << 62, Format: tar.FormatPAX}); err != nil {
		t.Fatal(err)
	}
	huge.Write(make([]byte, 4096))
	// An old GNU sparse file: a GNU header retyped 'S' (archive/tar does
	// not write sparse files).
	sparse := buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "s", Mode: 0o644, Format: tar.FormatGNU}, data: []byte("x")}})
	retype(sparse, tar.TypeGNUSparse)
	cases := map[string][]byte{
		"truncated in data":        good[:512+100],
		"truncated at entry":       good[:1024],
		"truncated in header":      good[:1024+200],
		"size 1<<62":               huge.Bytes(),
		"garbage header":           bytes.Repeat([]byte{0x41}, 2048),
		"zero length":              {},
		"sparse":                   sparse,
		"header then one zero blk": append(bytes.Clone(good[:1024]), make([]byte, 100)...),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			ctx := testCtx(t)
			d := Descriptor{Digest: sha(b), MediaType: mtTar}
			_, err := openTar(ctx, d, &memSource{b: b}, newMemMeta(), false)
			want := ErrCorrupt
			if name == "sparse" {
				want = ErrUnsupported
			}
			if !errors.Is(err, want) {
				t.Errorf("openTar: %v, want %v", err, want)
			}
			// Streamed, the same bytes fail the index too (they may even
			// match their diff ID: the check is the tar's, not the digest's).
			l, err := openStream(ctx, Descriptor{Digest: sha(b), DiffID: sha(b)}, options{open: opener(b), streams: newMemStreams(), expansion: defaultExpansion})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			if _, err := l.ReadDir(ctx, ""); err == nil {
				t.Errorf("stream accepted it")
			}
		})
	}
	ctx := testCtx(t)
	if _, err := openTar(ctx, Descriptor{Digest: sha(good)}, &memSource{b: good}, nil, false); err != nil {
		t.Fatalf("the untruncated tar: %v", err)
	}
}

// FuzzIndex feeds arbitrary bytes to the tar indexer and reads every file
// it reports: nothing may panic, and reads stay within the blob.
func FuzzIndex(f *testing.F) {
	// Small seeds: the fuzzer minimizes interesting inputs, which takes
	// minutes for inputs of tens of KiB.
	f.Add(hostileTar(f,
		tar.Header{Typeflag: tar.TypeDir, Name: "d/"},
		tar.Header{Typeflag: tar.TypeReg, Name: "d/f", PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}},
		tar.Header{Typeflag: tar.TypeLink, Name: "h", Linkname: "d/f"},
		tar.Header{Typeflag: tar.TypeSymlink, Name: "s", Linkname: "/x"},
		tar.Header{Typeflag: tar.TypeReg, Name: "d/.wh..wh..opq"},
		tar.Header{Typeflag: tar.TypeReg, Name: "e/.wh.f"}))
	f.Add(hostileTar(f, tar.Header{Typeflag: tar.TypeReg, Name: "../x"}, tar.Header{Typeflag: tar.TypeLink, Name: "l", Linkname: "../x"}))
	f.Add([]byte{})
	// Refusals are logged; fuzz workers' output is not drained while they
	// run, so a flood of warnings would block them.
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.DiscardHandler))
	f.Fuzz(func(t *testing.T, b []byte) {
		ctx := context.Background()
		l, err := openTar(ctx, Descriptor{}, &memSource{b: b}, nil, false)
		if err != nil {
			return
		}
		var walk func(dir string, depth int)
		walk = func(dir string, depth int) {
			ents, err := l.ReadDir(ctx, dir)
			if err != nil {
				t.Fatalf("readdir %q of a complete index: %v", dir, err)
			}
			for _, e := range ents {
				if _, err := l.Lookup(ctx, e.Name); err != nil {
					t.Fatalf("listed %q but lookup: %v", e.Name, err)
				}
				switch e.Type {
				case TypeDir:
					if depth < 64 {
						walk(e.Name, depth+1)
					}
				case TypeReg:
					p := make([]byte, min(e.Size, 1<<16))
					if _, err := l.ReadAt(ctx, e, p, 0); err != nil && err.Error() != "EOF" {
						t.Fatalf("read %q: %v", e.Name, err)
					}
				}
			}
		}
		walk("", 0)
	})
}

func TestHostileTOC(t *testing.T) {
	dg := sha([]byte("x")).String()
	reg := func(name string, size, off, chunkSize int64, d string) *estargz.TOCEntry {
		return &estargz.TOCEntry{Name: name, Type: "reg", Size: size, Offset: off, ChunkSize: chunkSize, ChunkDigest: d}
	}
	cases := map[string]struct {
		entries []*estargz.TOCEntry
		want    error
	}{
		"no chunk digest":  {[]*estargz.TOCEntry{reg("f", 1, 10, 0, "")}, errUnverifiable},
		"bad digest":       {[]*estargz.TOCEntry{reg("f", 1, 10, 0, "sha256:zz")}, ErrCorrupt},
		"chunk past TOC":   {[]*estargz.TOCEntry{reg("f", 1, 5000, 0, dg)}, ErrCorrupt},
		"huge chunk":       {[]*estargz.TOCEntry{reg("f", 1<<40, 10, 0, dg)}, ErrCorrupt},
		"negative size":    {[]*estargz.TOCEntry{reg("f", -1, 10, 0, dg)}, ErrCorrupt},
		"gap in chunks":    {[]*estargz.TOCEntry{reg("f", 20, 10, 5, dg), {Type: "chunk", Offset: 20, ChunkOffset: 10, ChunkSize: 10, ChunkDigest: dg}}, ErrCorrupt},
		"escaping refused": {[]*estargz.TOCEntry{reg("../f", 1, 10, 0, dg), {Name: "l", Type: "hardlink", LinkName: "../../etc/passwd"}}, nil},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			x := newIndex("test")
			err := indexTOC(context.Background(), x, &estargz.JTOC{Version: 1, Entries: c.entries}, 1000)
			if c.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				if len(x.byName) != 1 {
					t.Fatalf("hostile entries indexed: %v", x.byName)
				}
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
}
