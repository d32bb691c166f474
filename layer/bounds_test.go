package layer

// Tests that hostile input cannot make a layer spend unbounded memory or
// disk: each builds the smallest input that would, and checks that it is
// refused with an error naming the layer.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

// allocated is how many bytes f allocates (TotalAlloc, which counts what
// the garbage collector has freed too, so no timing is involved).
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// wantRefused checks that err is ErrCorrupt naming layer d.
func wantRefused(t *testing.T, d Descriptor, err error) {
	t.Helper()
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), d.Digest.String()) {
		t.Fatalf("got %v, want ErrCorrupt naming layer %s", err, d.Digest)
	}
}

// deepTar is a tar of count files, each at the bottom of its own chain of
// depth directories: ustar names of up to 256 bytes imply over a hundred
// directories each.
func deepTar(t testing.TB, count, depth int) []byte {
	var files []tarFile
	for i := range count {
		name := fmt.Sprintf("%06d/", i) + strings.Repeat("a/", depth) + "f"
		files = append(files, tarFile{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644}})
	}
	return buildTar(t, files)
}

// A tar that makes the index hold more than maxEntries names is refused;
// implied directories count.
func TestIndexEntriesBounded(t *testing.T) {
	const depth = 120
	ctx := testCtx(t)
	tarb := deepTar(t, maxEntries/(depth+2)+2, depth) // the bound is checked before each header
	d := Descriptor{Digest: sha(tarb), Size: int64(len(tarb)), MediaType: mtTar}
	_, err := Open(ctx, d, &memSource{b: tarb})
	wantRefused(t, d, err)
	tarb = deepTar(t, 10, depth)
	if _, err := Open(ctx, Descriptor{Digest: sha(tarb), MediaType: mtTar}, &memSource{b: tarb}); err != nil {
		t.Fatalf("a tar of 1,220 names: %v", err)
	}
}

// pipeBlob returns an opener of the blob that gen writes, streamed through
// a pipe so that it is never held, and the blob's digest.
func pipeBlob(gen func(io.Writer)) (func(context.Context) (io.ReadCloser, error), digest.Digest) {
	h := sha256.New()
	gen(h)
	open := func(context.Context) (io.ReadCloser, error) {
		pr, pw := io.Pipe()
		go func() {
			gen(pw)
			pw.Close()
		}()
		return pr, nil
	}
	return open, digest.NewDigest(digest.SHA256, h)
}

// PAX records bring at most maxIndexBytes into an index: 300 entries of a
// 1000 KiB xattr each (each within archive/tar's bound of 1 MiB a header)
// are refused.
func TestIndexBytesBounded(t *testing.T) {
	ctx := testCtx(t)
	value := strings.Repeat("v", 1000<<10)
	open, dgst := pipeBlob(func(w io.Writer) {
		tw := tar.NewWriter(w)
		for i := range 300 {
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprint(i), Mode: 0o644,
				PAXRecords: map[string]string{"SCHILY.xattr.user.big": value}})
		}
		tw.Close()
	})
	d := Descriptor{Digest: dgst, MediaType: mtTar, DiffID: dgst}
	op, err := Open(ctx, d, nil, WithStreams(open, newDiscardingStreams(1<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	_, err = op.ReadDir(ctx, "")
	wantRefused(t, d, err)
}

// A name or link target longer than PATH_MAX is refused, and implies no
// directories.
func TestLongNamesRefused(t *testing.T) {
	long := strings.Repeat("n/", maxNameLen/2) + "f"
	tarb := hostileTar(t,
		tar.Header{Typeflag: tar.TypeReg, Name: "ok", Mode: 0o644},
		tar.Header{Typeflag: tar.TypeReg, Name: long, Mode: 0o644},
		tar.Header{Typeflag: tar.TypeSymlink, Name: "s", Linkname: long},
	)
	for _, f := range formats[:3] {
		t.Run(f.name, func(t *testing.T) {
			ctx := testCtx(t)
			l := f.open(t, ctx, tarb)
			ents, err := l.ReadDir(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, e := range ents {
				names = append(names, clip(e.Name))
			}
			if len(names) != 1 || names[0] != "ok" {
				t.Errorf("root lists %q, want only ok", names)
			}
		})
	}
}

// countHandler counts log records.
type countHandler struct{ n *atomic.Int64 }

func (h countHandler) Enabled(context.Context, slog.Level) bool  { return true }
func (h countHandler) Handle(context.Context, slog.Record) error { h.n.Add(1); return nil }
func (h countHandler) WithAttrs([]slog.Attr) slog.Handler        { return h }
func (h countHandler) WithGroup(string) slog.Handler             { return h }

// A layer of many refused entries logs a bounded number of warnings.
func TestRefusalsLogBounded(t *testing.T) {
	var hdrs []tar.Header
	for i := range 1000 {
		hdrs = append(hdrs, tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("../%d", i)})
	}
	tarb := hostileTar(t, hdrs...)
	var n atomic.Int64
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(countHandler{&n}))
	if _, err := openTar(testCtx(t), Descriptor{Digest: sha(tarb)}, &memSource{b: tarb}, nil, false); err != nil {
		t.Fatal(err)
	}
	if n.Load() > maxRefusalsLogged+1 {
		t.Errorf("%d warnings for 1000 refused entries, want at most %d", n.Load(), maxRefusalsLogged+1)
	}
}

// linkTar is a tar of file f and n hard links to it, l0 to l<n-1>.
func linkTar(t testing.TB, n int) []byte {
	files := []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644}, data: []byte("x")}}
	for i := range n {
		files = append(files, tarFile{hdr: tar.Header{Typeflag: tar.TypeLink, Name: fmt.Sprint("l", i), Linkname: "f"}})
	}
	return buildTar(t, files)
}

// Indexing hard links costs memory in proportion to their number, not to
// its square.
func TestHardLinksLinear(t *testing.T) {
	const n = 5000
	ctx := testCtx(t)
	tarb := linkTar(t, n)
	var l *tarLayer
	var err error
	alloc := allocated(func() { l, err = openTar(ctx, Descriptor{Digest: sha(tarb)}, &memSource{b: tarb}, nil, false) })
	if err != nil {
		t.Fatal(err)
	}
	if alloc > 64<<20 {
		t.Errorf("indexing %d hard links allocated %d MiB", n, alloc>>20)
	}
	for _, name := range []string{"f", "l0", fmt.Sprint("l", n-1)} {
		if e, err := l.Lookup(ctx, name); err != nil || e.Nlink != n+1 {
			t.Errorf("%s: %+v, %v; want Nlink %d", name, e, err, n+1)
		}
	}
}

// An inode has at most maxLinks names; links beyond are refused.
func TestHardLinksBounded(t *testing.T) {
	ctx := testCtx(t)
	tarb := linkTar(t, maxLinks)
	l, err := openTar(ctx, Descriptor{Digest: sha(tarb)}, &memSource{b: tarb}, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	last := fmt.Sprint("l", maxLinks-1)
	if _, err := l.Lookup(ctx, last); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("link %s to an inode of %d names: %v, want refused", last, maxLinks, err)
	}
	if e, err := l.Lookup(ctx, "f"); err != nil || e.Nlink != maxLinks {
		t.Errorf("f: %+v, %v; want Nlink %d", e, err, maxLinks)
	}
}

// zerosBomb is a compressed tar of one file of size zeros (a multiple of
// 16 MiB), made of identical compressed members so that neither it nor the
// tar is ever held; and the tar's digest.
func zerosBomb(t testing.TB, kind string, size int64) ([]byte, digest.Digest) {
	const member = 16 << 20
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "zeros", Mode: 0o644, Size: size}); err != nil {
		t.Fatal(err)
	}
	end := make([]byte, 1024)
	zeros := make([]byte, member)
	blob := compress(t, kind, hdr.Bytes())
	z := compress(t, kind, zeros)
	h := sha256.New()
	h.Write(hdr.Bytes())
	for range size / member {
		blob = append(blob, z...)
		h.Write(zeros)
	}
	h.Write(end)
	return append(blob, compress(t, kind, end)...), digest.NewDigest(digest.SHA256, h)
}

// A gzip or zstd bomb (1 GiB of zeros from a blob of 1 MiB or less) is
// aborted once it passes the bound, and every reader gets the error.
func TestStreamBombAborted(t *testing.T) {
	for _, c := range []struct{ kind, mediaType string }{{"gzip", mtGzip}, {"zstd", mtZstd}} {
		t.Run(c.kind, func(t *testing.T) {
			ctx := testCtx(t)
			blob, diffID := zerosBomb(t, c.kind, 1<<30)
			d := Descriptor{Digest: sha(blob), Size: int64(len(blob)), MediaType: c.mediaType, DiffID: diffID}
			streams := newDiscardingStreams(1 << 20)
			op, err := Open(ctx, d, &memSource{b: blob}, WithStreams(opener(blob), streams))
			if err != nil {
				t.Fatal(err)
			}
			defer op.Close()
			e, err := op.Lookup(ctx, "zeros")
			if err != nil {
				t.Fatal(err)
			}
			_, err = op.ReadDir(ctx, "")
			st := streams.m[d.Digest]
			allowed := defaultExpansion.allowed(d.Size)
			if st.Done() || st.err == nil || st.Written() > allowed {
				t.Errorf("stream sealed %v, error %v, %d MiB written; want aborted within %d MiB", st.Done(), st.err, st.Written()>>20, allowed>>20)
			}
			t.Logf("%d byte blob, %d MiB streamed: %v", len(blob), st.Written()>>20, st.err)
			wantRefused(t, d, err)
			_, err = op.ReadAt(ctx, e, make([]byte, 4096), 512<<20)
			wantRefused(t, d, err)
			// Another opener of the aborted stream fails too.
			op2, err := Open(ctx, d, &memSource{b: blob}, WithStreams(opener(blob), streams))
			if err != nil {
				t.Fatal(err)
			}
			defer op2.Close()
			_, err = op2.ReadDir(ctx, "")
			wantRefused(t, d, err)
		})
	}
}

// WithMaxExpansion sets both bounds; a blob longer than its descriptor
// says is corrupt too.
func TestWithMaxExpansion(t *testing.T) {
	zeros := buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "z", Mode: 0o644}, data: make([]byte, 32<<20)}})
	random := buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "r", Mode: 0o644}, data: randBytes(5, 2<<20)}})
	cases := []struct {
		name    string
		tarb    []byte
		opts    []Option
		size    func(blob []byte) int64
		refused bool
	}{
		{"32 MiB of zeros by default", zeros, nil, nil, true},
		{"32 MiB of zeros at 10,000 times", zeros, []Option{WithMaxExpansion(10000, 0)}, nil, false},
		{"2 MiB at most 1 MiB", random, []Option{WithMaxExpansion(0, 1<<20)}, nil, true},
		{"2 MiB by default", random, nil, nil, false},
		{"blob longer than said", random, nil, func(b []byte) int64 { return int64(len(b)) - 1 }, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := testCtx(t)
			blob := compress(t, "gzip", c.tarb)
			d := Descriptor{Digest: sha(blob), Size: int64(len(blob)), MediaType: mtGzip, DiffID: sha(c.tarb)}
			if c.size != nil {
				d.Size = c.size(blob)
			}
			op, err := Open(ctx, d, nil, append(c.opts, WithStreams(opener(blob), newMemStreams()))...)
			if err != nil {
				t.Fatal(err)
			}
			defer op.Close()
			_, err = op.ReadDir(ctx, "")
			if c.refused {
				wantRefused(t, d, err)
			} else if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A descriptor whose size is not the Source's is refused before the
// Source is read, in every format, even when the index is kept from an
// earlier open.
func TestDescriptorSizeChecked(t *testing.T) {
	tarb := buildTar(t, richFiles())
	stargz, err := io.ReadAll(buildStargz(t, tarb))
	if err != nil {
		t.Fatal(err)
	}
	blobs := []struct {
		name, mediaType string
		blob            []byte
	}{
		{"tar", mtTar, tarb},
		{"estargz", mtGeneric, stargz},
		{"gzip", mtGzip, compress(t, "gzip", tarb)},
	}
	for _, b := range blobs {
		t.Run(b.name, func(t *testing.T) {
			ctx := testCtx(t)
			meta, streams := newMemMeta(), newMemStreams()
			d := Descriptor{Digest: sha(b.blob), Size: int64(len(b.blob)), MediaType: b.mediaType, DiffID: sha(tarb)}
			op, err := Open(ctx, d, &memSource{b: b.blob}, WithStreams(opener(b.blob), streams), WithMeta(meta))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := op.ReadDir(ctx, ""); err != nil { // the index is complete and kept
				t.Fatal(err)
			}
			op.Close()
			for _, size := range []int64{d.Size - 1, d.Size + 1, -1} {
				d := d
				d.Size = size
				src := &memSource{b: b.blob}
				_, err := Open(ctx, d, src, WithStreams(opener(b.blob), streams), WithMeta(meta))
				if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), d.Digest.String()) || src.reads.Load() != 0 {
					t.Errorf("size %d of a %d byte blob: %v after %d reads; want ErrCorrupt naming the layer, before any read",
						size, len(b.blob), err, src.reads.Load())
				}
			}
		})
	}
}

// A PAX header or GNU long name past archive/tar's bound of 1 MiB is
// refused, so a header walk allocates a bounded amount per header.
func TestHeaderSizeBounded(t *testing.T) {
	for _, typ := range []byte{tar.TypeXHeader, tar.TypeGNULongName} {
		t.Run(string(typ), func(t *testing.T) {
			record := []byte("path=" + strings.Repeat("a", 16<<20) + "\n")
			record = append([]byte(fmt.Sprintf("%d ", len(record)+8)), record...)
			tarb := buildTar(t, []tarFile{
				{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "special", Mode: 0o644}, data: record},
				{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644}, data: []byte("x")},
			})
			retype(tarb, typ)
			d := Descriptor{Digest: sha(tarb), MediaType: mtTar}
			var err error
			alloc := allocated(func() { _, err = Open(testCtx(t), d, &memSource{b: tarb}) })
			wantRefused(t, d, err)
			t.Logf("walking a header of %d MiB: %v; %d KiB allocated", len(record)>>20, err, alloc>>10)
			if alloc > 8<<20 { // a few times archive/tar's 1 MiB
				t.Errorf("walking a header of %d MiB allocated %d MiB", len(record)>>20, alloc>>20)
			}
		})
	}
}
