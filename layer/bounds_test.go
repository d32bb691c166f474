package layer

// Tests that hostile input cannot make a layer spend unbounded memory or
// disk: each builds the smallest input that would, and checks that it is
// refused with an error naming the layer.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"reflect"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

// tocFormats are the two ways a TOC is stored at the end of a blob.
var tocFormats = []string{"estargz", "zstdchunked"}

// withTOC returns an eStargz (or zstd:chunked) blob whose TOC is n bytes
// of JSON written by writeJSON, the rest of the blob being a real one.
func withTOC(t testing.TB, format string, n int64, writeJSON func(io.Writer)) []byte {
	t.Helper()
	tarb := buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644}, data: []byte("x")}})
	var opts []estargz.Option
	var dc estargz.Decompressor = new(estargz.GzipDecompressor)
	if format == "zstdchunked" {
		opts = append(opts, estargz.WithCompression(zstdChunked{&zstdchunked.Compressor{CompressionLevel: zstd.SpeedFastest}, &zstdchunked.Decompressor{}}))
		dc = new(zstdchunked.Decompressor)
	}
	blob, err := io.ReadAll(buildStargz(t, tarb, opts...))
	if err != nil {
		t.Fatal(err)
	}
	footer := bytes.Clone(blob[len(blob)-int(dc.FooterSize()):])
	_, tocOff, _, err := dc.ParseFooter(footer)
	if err != nil {
		t.Fatal(err)
	}
	var toc bytes.Buffer
	if format == "zstdchunked" {
		zw, err := zstd.NewWriter(&toc, zstd.WithEncoderLevel(zstd.SpeedFastest))
		if err != nil {
			t.Fatal(err)
		}
		writeJSON(zw)
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		// The TOC and the footer are zstd skippable frames; the footer
		// gives the TOC's compressed and decompressed sizes.
		binary.LittleEndian.PutUint64(footer[8:], uint64(toc.Len()))
		binary.LittleEndian.PutUint64(footer[16:], uint64(n))
		out := bytes.Clone(blob[:tocOff-8])
		out = binary.LittleEndian.AppendUint32(append(out, blob[tocOff-8:tocOff-4]...), uint32(toc.Len()))
		out = append(out, toc.Bytes()...)
		out = append(out, blob[len(blob)-len(footer)-8:len(blob)-len(footer)]...)
		return append(out, footer...)
	}
	gz, _ := gzip.NewWriterLevel(&toc, gzip.BestSpeed)
	tw := tar.NewWriter(gz)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Size: n}); err != nil {
		t.Fatal(err)
	}
	writeJSON(tw)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	out := append(bytes.Clone(blob[:tocOff]), toc.Bytes()...)
	return append(out, footer...) // the footer holds only the TOC's offset
}

// paddedTOC writes a valid, empty TOC holding pad bytes of whitespace.
func paddedTOC(pad int64) (int64, func(io.Writer)) {
	head, tail := `{"version":1,"entries":[`, `]}`
	return int64(len(head)) + pad + int64(len(tail)), func(w io.Writer) {
		io.WriteString(w, head)
		spaces := bytes.Repeat([]byte{' '}, 1<<20)
		for left := pad; left > 0; left -= int64(len(spaces)) {
			w.Write(spaces[:min(left, int64(len(spaces)))])
		}
		io.WriteString(w, tail)
	}
}

func openGeneric(ctx context.Context, blob []byte) (Descriptor, error) {
	d := Descriptor{Digest: sha(blob), Size: int64(len(blob)), MediaType: mtGeneric}
	_, err := Open(ctx, d, &memSource{b: blob}, WithStreams(opener(blob), newMemStreams()))
	return d, err
}

// wantRefused checks that err is ErrCorrupt naming layer d.
func wantRefused(t *testing.T, d Descriptor, err error) {
	t.Helper()
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), d.Digest.String()) {
		t.Fatalf("got %v, want ErrCorrupt naming layer %s", err, d.Digest)
	}
}

// A TOC that decompresses to 256 MiB (of whitespace inside the JSON, which
// compresses to almost nothing) is refused without holding it.
func TestTOCBombRefused(t *testing.T) {
	for _, format := range tocFormats {
		t.Run(format, func(t *testing.T) {
			n, write := paddedTOC(256 << 20)
			blob := withTOC(t, format, n, write)
			t.Logf("%d byte blob, TOC of %d bytes", len(blob), n)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			d, err := openGeneric(testCtx(t), blob)
			runtime.ReadMemStats(&after)
			alloc := after.TotalAlloc - before.TotalAlloc
			t.Logf("%v; allocated %d KiB", err, alloc>>10)
			if alloc > 2*maxTOCJSON {
				t.Errorf("allocated %d MiB reading the TOC, want at most %d MiB", alloc>>20, 2*maxTOCJSON>>20)
			}
			wantRefused(t, d, err)
		})
	}
	// The same padding within the bound is only whitespace.
	n, write := paddedTOC(1 << 20)
	if _, err := openGeneric(testCtx(t), withTOC(t, "estargz", n, write)); err != nil {
		t.Fatalf("a padded TOC within bounds: %v", err)
	}
}

// A TOC of more entries than the bound is refused, even when each entry
// is tiny.
func TestTOCEntriesBounded(t *testing.T) {
	entries := func(count int) (int64, func(io.Writer)) {
		head, tail := `{"version":1,"entries":[null`, `]}`
		return int64(len(head) + 5*(count-1) + len(tail)), func(w io.Writer) {
			io.WriteString(w, head)
			io.WriteString(w, strings.Repeat(",null", count-1))
			io.WriteString(w, tail)
		}
	}
	n, write := entries(maxTOCEntries + 1)
	d, err := openGeneric(testCtx(t), withTOC(t, "estargz", n, write))
	wantRefused(t, d, err)
	n, write = entries(1000)
	if _, err := openGeneric(testCtx(t), withTOC(t, "estargz", n, write)); err != nil {
		t.Fatalf("a TOC of 1000 entries: %v", err)
	}
}

// Squeezing whitespace changes nothing that JSON means.
func TestSpaceSqueezer(t *testing.T) {
	for _, in := range []string{
		`{"name" :  "a  b\" \\  c\t" ,` + "\n\t\t" + `"n": [1, 2 ,3] }`,
		`"\\" `,
		`[1   2]`, // stays invalid
		"  \t\n",
	} {
		out, err := io.ReadAll(&spaceSqueezer{r: iotest.OneByteReader(strings.NewReader(in))})
		if err != nil {
			t.Fatal(err)
		}
		var a, b any
		errA, errB := json.Unmarshal([]byte(in), &a), json.Unmarshal(out, &b)
		if (errA == nil) != (errB == nil) || !reflect.DeepEqual(a, b) {
			t.Errorf("%q squeezed to %q: %v (%v), want %v (%v)", in, out, b, errB, a, errA)
		}
	}
	out, _ := io.ReadAll(&spaceSqueezer{r: strings.NewReader("[" + strings.Repeat(" \n\t", 1000) + "]")})
	if string(out) != "[ ]" {
		t.Errorf("padding squeezed to %q", out)
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
	if _, err := openTar(testCtx(t), Descriptor{Digest: sha(tarb)}, &memSource{b: tarb}, nil); err != nil {
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
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l, err := openTar(ctx, Descriptor{Digest: sha(tarb)}, &memSource{b: tarb}, nil)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 64<<20 {
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
	l, err := openTar(ctx, Descriptor{Digest: sha(tarb)}, &memSource{b: tarb}, nil)
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
			st := streams.m[diffID]
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

// paddedSource is a blob of head followed by zeros up to size, held
// without the zeros; it counts what is read.
type paddedSource struct {
	head      []byte
	size      int64
	bytesRead atomic.Int64
}

func (s *paddedSource) Size() int64             { return s.size }
func (s *paddedSource) Invalidate(off, n int64) {}

func (s *paddedSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off >= s.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), s.size-off))
	clear(p[:n])
	if off < int64(len(s.head)) {
		copy(p[:n], s.head[off:])
	}
	s.bytesRead.Add(int64(n))
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// chunkedLayer is an eStargz layer of files f0, f1, … holding data[i],
// each one gzip chunk; gap bytes of zeros lie between the last chunk and
// the TOC, so the last chunk's compressed stream runs to the TOC.
func chunkedLayer(t testing.TB, data [][]byte, gap int64) (*stargzLayer, *paddedSource) {
	head := make([]byte, 512)
	var entries []*estargz.TOCEntry
	for i, b := range data {
		entries = append(entries, &estargz.TOCEntry{Name: fmt.Sprint("f", i), Type: "reg", Mode: 0o644,
			Size: int64(len(b)), Offset: int64(len(head)), ChunkDigest: sha(b).String()})
		head = append(head, compress(t, "gzip", b)...)
	}
	tocOff := int64(len(head)) + gap
	x := newIndex("test")
	if err := indexTOC(context.Background(), x, &estargz.JTOC{Version: 1, Entries: entries}, tocOff); err != nil {
		t.Fatal(err)
	}
	x.finish(nil)
	src := &paddedSource{head: head, size: tocOff + 1000}
	return &stargzLayer{idx: x, src: src}, src
}

// A chunk is read without holding its whole compressed stream, which may
// run far past it.
func TestChunkReadBounded(t *testing.T) {
	ctx := testCtx(t)
	data := randBytes(9, 1<<20)
	l, src := chunkedLayer(t, [][]byte{data}, 200<<20)
	e, err := l.Lookup(ctx, "f0")
	if err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	got := readAll(t, ctx, l, e)
	runtime.ReadMemStats(&after)
	if !bytes.Equal(got, data) {
		t.Fatal("content differs")
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("reading a 1 MiB chunk of a 200 MiB stream: %d KiB read, %d KiB allocated", src.bytesRead.Load()>>10, alloc>>10)
	if alloc > 16<<20 || src.bytesRead.Load() > 2<<20 {
		t.Errorf("reading a 1 MiB chunk read %d KiB of the blob and allocated %d KiB", src.bytesRead.Load()>>10, alloc>>10)
	}
}

// The chunks a layer keeps for sequential readers are bounded in bytes.
func TestRecentChunksBounded(t *testing.T) {
	ctx := testCtx(t)
	var data [][]byte
	for i := range 5 {
		data = append(data, bytes.Repeat([]byte{byte(i)}, 8<<20))
	}
	l, _ := chunkedLayer(t, data, 0)
	for i := range data {
		e, err := l.Lookup(ctx, fmt.Sprint("f", i))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.ReadAt(ctx, e, make([]byte, 1), 0); err != nil {
			t.Fatal(err)
		}
	}
	held := 0
	for _, r := range l.recent {
		held += len(r.data)
	}
	if held > recentBytes {
		t.Errorf("%d chunks of %d MiB in all kept, want at most %d MiB", len(l.recent), held>>20, recentBytes>>20)
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
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			d := Descriptor{Digest: sha(tarb), MediaType: mtTar}
			_, err := Open(testCtx(t), d, &memSource{b: tarb})
			runtime.ReadMemStats(&after)
			wantRefused(t, d, err)
			alloc := after.TotalAlloc - before.TotalAlloc
			t.Logf("walking a header of %d MiB: %v; %d KiB allocated", len(record)>>20, err, alloc>>10)
			if alloc > 8<<20 { // a few times archive/tar's 1 MiB
				t.Errorf("walking a header of %d MiB allocated %d MiB", len(record)>>20, alloc>>20)
			}
		})
	}
}
