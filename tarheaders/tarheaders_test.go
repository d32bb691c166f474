package tarheaders

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
)

type file struct {
	hdr  tar.Header
	data []byte
}

// writeTar writes files and returns the tar with the offset of each
// entry's first header block and the end of each entry's padded data.
func writeTar(t *testing.T, files []file) (blob []byte, starts, ends []int64) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		if err := tw.Flush(); err != nil {
			t.Fatal(err)
		}
		starts = append(starts, int64(buf.Len()))
		h := f.hdr
		h.Size = int64(len(f.data))
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(f.data); err != nil {
			t.Fatal(err)
		}
		if err := tw.Flush(); err != nil {
			t.Fatal(err)
		}
		ends = append(ends, int64(buf.Len()))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), starts, ends
}

func reg(name string, data []byte) file {
	return file{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644}, data: data}
}

func record1(t *testing.T, blob []byte) ([]Region, error) {
	t.Helper()
	r := NewRecorder()
	// In odd pieces, as a writer hands them over.
	for p := blob; len(p) > 0; {
		n := min(len(p), 777)
		r.Write(p[:n])
		p = p[n:]
	}
	return r.Finish()
}

// The regions are the blob's own bytes: every entry's header blocks, the
// last byte of its padded data, and the end of the archive; nothing of
// the files' data besides.
func TestRecordRegions(t *testing.T) {
	pax := reg("pax", []byte("x"))
	pax.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.a": "b"}
	gnu := reg("gnu/"+strings.Repeat("g", 200), bytes.Repeat([]byte{7}, 512)) // data ends on a block
	gnu.hdr.Format = tar.FormatGNU
	big := bytes.Repeat([]byte{0xab}, 3<<20)
	files := []file{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o755}},
		pax,
		gnu,
		reg("d/big", big),
		reg("empty", nil),
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "l", Linkname: "d/big"}},
	}
	blob, starts, ends := writeTar(t, files)
	regions, err := record1(t, blob)
	if err != nil {
		t.Fatal(err)
	}
	covered := func(off, n int64) bool {
		for _, r := range regions {
			if r.Off <= off && off+n <= r.End() {
				return true
			}
		}
		return false
	}
	for i, r := range regions {
		if !bytes.Equal(r.Data, blob[r.Off:r.End()]) {
			t.Fatalf("region %d [%d,+%d) is not the blob's bytes", i, r.Off, len(r.Data))
		}
		if i > 0 && r.Off <= regions[i-1].End() {
			t.Fatalf("regions %d and %d overlap or touch", i-1, i)
		}
	}
	for i, f := range files {
		dataStart := ends[i] - (int64(len(f.data))+511)&^511
		if !covered(starts[i], dataStart-starts[i]) {
			t.Errorf("header blocks of %q [%d,%d) not covered", f.hdr.Name, starts[i], dataStart)
		}
		if len(f.data) > 1 && covered(dataStart, 1) {
			t.Errorf("data of %q recorded", f.hdr.Name)
		}
	}
	if last := regions[len(regions)-1]; last.End() != int64(len(blob)) || !covered(ends[len(ends)-1], int64(len(blob))-ends[len(ends)-1]) {
		t.Errorf("the end of the archive is not covered: last region [%d,%d) of %d", last.Off, last.End(), len(blob))
	}
	if n := Size(regions); n > 16<<10 {
		t.Errorf("%d bytes of headers recorded for %d entries", n, len(files))
	}

	s, err := Encode(regions)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(s, int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(back) != fmt.Sprint(regions) {
		t.Fatal("regions do not round-trip")
	}
}

func TestRecordTooLarge(t *testing.T) {
	var files []file
	for i := range MaxBytes / 1024 {
		files = append(files, reg(fmt.Sprintf("f%04d", i), []byte("x")))
	}
	blob, _, _ := writeTar(t, files)
	if _, err := record1(t, blob); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("a tar of %d small files: %v, want ErrTooLarge", len(files), err)
	}
}

func TestRecordNotATar(t *testing.T) {
	if _, err := record1(t, bytes.Repeat([]byte("not a tar"), 200)); err == nil {
		t.Fatal("recorded regions of something that is not a tar")
	}
}

// encodeRaw encodes a hand-made region sequence, to write what Encode
// would not.
func encodeRaw(t *testing.T, raw []byte) string {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(raw)
	zw.Close()
	return base64.StdEncoding.EncodeToString(buf.Bytes())
}

func region(off, n uint64, data []byte) []byte {
	b := binary.AppendUvarint(nil, off)
	b = binary.AppendUvarint(b, n)
	return append(b, data...)
}

func TestParseRefusesHostile(t *testing.T) {
	blk := bytes.Repeat([]byte{1}, 512)
	ok := encodeRaw(t, append(region(0, 512, blk), region(1024, 512, blk)...))
	if _, err := Parse(ok, 2048); err != nil {
		t.Fatalf("a good annotation: %v", err)
	}
	var many []byte
	for i := range maxRegions + 1 {
		many = append(many, region(uint64(i*2), 1, []byte{0})...)
	}
	cases := map[string]string{
		"not base64":         "%%%",
		"not gzip":           base64.StdEncoding.EncodeToString([]byte("plain")),
		"overlapping":        encodeRaw(t, append(region(0, 512, blk), region(511, 512, blk)...)),
		"out of order":       encodeRaw(t, append(region(1024, 512, blk), region(0, 512, blk)...)),
		"past the end":       encodeRaw(t, region(1800, 512, blk)),
		"offset overflows":   encodeRaw(t, region(1<<63, 512, blk)),
		"empty region":       encodeRaw(t, region(0, 0, nil)),
		"length past data":   encodeRaw(t, region(0, 513, blk)),
		"truncated varint":   encodeRaw(t, []byte{0x80}),
		"too many regions":   encodeRaw(t, many),
		"decompression bomb": encodeRaw(t, append(region(0, 1<<30, nil), make([]byte, 8<<20)...)),
		"too long":           strings.Repeat("A", MaxAnnotation+4),
	}
	for name, s := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := Parse(s, 2048); !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse: %v, want ErrInvalid", err)
			}
		})
	}
	if _, err := Parse(ok, 1500); !errors.Is(err, ErrInvalid) {
		t.Fatal("regions past the end of a smaller blob accepted")
	}
}
