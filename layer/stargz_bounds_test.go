package layer

// Bounds of eStargz and zstd:chunked layers: the TOC and the chunks.

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// tocFormats are the two ways a TOC is stored at the end of a blob.
var tocFormats = []string{"estargz", "zstdchunked"}

// withTOC returns an eStargz (or zstd:chunked) blob whose TOC is n bytes
// of JSON written by writeJSON, the rest of the blob being a real one.
func withTOC(t testing.TB, format string, n int64, writeJSON func(io.Writer)) []byte {
	t.Helper()
	tarb := buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644}, data: []byte("x")}})
	var opts []estargz.Option
	if format == "zstdchunked" {
		opts = append(opts, estargz.WithCompression(zstdChunked{&zstdchunked.Compressor{CompressionLevel: zstd.SpeedFastest}, &zstdchunked.Decompressor{}}))
	}
	blob, err := io.ReadAll(buildStargz(t, tarb, opts...))
	if err != nil {
		t.Fatal(err)
	}
	return replaceTOC(t, format, blob, n, writeJSON)
}

// replaceTOC returns blob, an eStargz (or zstd:chunked) blob, with its TOC
// replaced by n bytes of JSON written by writeJSON.
func replaceTOC(t testing.TB, format string, blob []byte, n int64, writeJSON func(io.Writer)) []byte {
	t.Helper()
	var dc estargz.Decompressor = new(estargz.GzipDecompressor)
	if format == "zstdchunked" {
		dc = new(zstdchunked.Decompressor)
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

// A TOC that decompresses to 256 MiB (of whitespace inside the JSON, which
// compresses to almost nothing) is refused without holding it.
func TestTOCBombRefused(t *testing.T) {
	for _, format := range tocFormats {
		t.Run(format, func(t *testing.T) {
			n, write := paddedTOC(256 << 20)
			blob := withTOC(t, format, n, write)
			t.Logf("%d byte blob, TOC of %d bytes", len(blob), n)
			var d Descriptor
			var err error
			alloc := allocated(func() { d, err = openGeneric(testCtx(t), blob) })
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
	var got []byte
	alloc := allocated(func() { got = readAll(t, ctx, l, e) })
	if !bytes.Equal(got, data) {
		t.Fatal("content differs")
	}
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
