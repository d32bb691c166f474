package prefetch

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// hfModel lays out a typical Hugging Face model directory the way a tar
// layer does: a 512-byte header before each file, data padded to 512, and
// a 1024-byte trailer. It returns the files and the blob size.
func hfModel() ([]File, int64) {
	entries := []struct {
		name string
		size int64
	}{
		{"models/m/config.json", 700},
		{"models/m/model-00001-of-00002.safetensors", 3<<20 + 123},
		{"models/m/model-00002-of-00002.safetensors", 2 << 20},
		{"models/m/model.safetensors.index.json", 20 << 10},
		{"models/m/tokenizer.json", 2<<20 + 5},
	}
	var files []File
	var off int64
	for _, e := range entries {
		off += 512
		files = append(files, File{Name: e.name, Range: Range{Off: off, Len: e.size}})
		off += (e.size + 511) / 512 * 512
	}
	return files, off + 1024
}

func TestModelOrderHF(t *testing.T) {
	files, size := hfModel()
	cfg, m1, m2, idx, tok := files[0].Range, files[1].Range, files[2].Range, files[3].Range, files[4].Range
	const h = HeaderBytes
	want := []Range{
		cfg, idx, tok, // metadata, in path order
		{m1.Off, h}, {m2.Off, h}, // safetensors headers
		{m1.Off + h, m1.Len - h}, {m2.Off + h, m2.Len - h}, // tensors
	}
	// Then the tar headers, padding and trailer, in blob order; a file's
	// padding and the next header are one range.
	pos := int64(0)
	for _, f := range files {
		want = append(want, Range{pos, f.Range.Off - pos})
		pos = f.Range.End()
	}
	want = append(want, Range{pos, size - pos})

	got := ModelOrder(files, size)
	if !slices.Equal(got, want) {
		t.Fatalf("ModelOrder\n got %v\nwant %v", got, want)
	}
	checkCoverage(t, got, size)
}

func TestModelOrderSmallSafetensorsAndOddFiles(t *testing.T) {
	files := []File{
		{Name: "b/weights.bin", Range: Range{0, 100}},
		{Name: "a/tiny.safetensors", Range: Range{100, 50}},      // smaller than a header
		{Name: "a/big.txt", Range: Range{150, MetaMaxBytes + 1}}, // too big for metadata
		{Name: "a/vocab.txt", Range: Range{150 + MetaMaxBytes + 1, 10}},
	}
	size := int64(200 + MetaMaxBytes)
	got := ModelOrder(files, size)
	want := []Range{
		{150 + MetaMaxBytes + 1, 10}, // vocab.txt
		{100, 50 + MetaMaxBytes + 1}, // tiny.safetensors whole as its header, then a/big.txt
		{0, 100},                     // b/weights.bin
		{150 + MetaMaxBytes + 11, size - (150 + MetaMaxBytes + 11)},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("ModelOrder\n got %v\nwant %v", got, want)
	}
	checkCoverage(t, got, size)
}

// TestModelOrderCoverage checks the exactly-once cover on hostile indexes:
// overlapping files, files past the end, empty files.
func TestModelOrderCoverage(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	names := []string{"config.json", "x.safetensors", "tokenizer.model", "data.bin", "notes.txt"}
	for i := range 200 {
		size := 1 + r.Int64N(4<<20)
		var files []File
		for range r.IntN(12) {
			off := r.Int64N(size+100) - 50
			files = append(files, File{
				Name:  names[r.IntN(len(names))],
				Range: Range{Off: off, Len: r.Int64N(2 << 20)},
			})
		}
		got := ModelOrder(files, size)
		if !checkCoverage(t, got, size) {
			t.Fatalf("case %d: files %v", i, files)
		}
	}
}

// checkCoverage fails t unless rs cover [0, size) exactly once.
func checkCoverage(t *testing.T, rs []Range, size int64) bool {
	t.Helper()
	sorted := slices.Clone(rs)
	slices.SortFunc(sorted, func(a, b Range) int { return int(a.Off - b.Off) })
	var pos int64
	for _, r := range sorted {
		if r.Len <= 0 || r.Off != pos {
			t.Errorf("ranges %v do not cover [0,%d) exactly once: at %d found %v", rs, size, pos, r)
			return false
		}
		pos = r.End()
	}
	if pos != size {
		t.Errorf("ranges %v end at %d, want %d", rs, pos, size)
		return false
	}
	return true
}
