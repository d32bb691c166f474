package chunks

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
)

func randomBlob(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{1}).Read(b)
	return b
}

func TestComputeWriterAndParseAgree(t *testing.T) {
	const cs = minChunkSize
	for _, h := range []Hash{BLAKE3, SHA256} {
		for _, size := range []int{0, 1, cs - 1, cs, cs + 1, 5*cs + 7} {
			blob := randomBlob(size)
			a, err := Compute(bytes.NewReader(blob), int64(size), cs, h)
			if err != nil {
				t.Fatal(err)
			}
			w, err := NewWriter(cs, h)
			if err != nil {
				t.Fatal(err)
			}
			for p := blob; len(p) > 0; p = p[min(len(p), 1000):] { // odd pieces
				w.Write(p[:min(len(p), 1000)])
			}
			b := w.Table()
			if a.Encode() != b.Encode() {
				t.Fatalf("%s, size %d: Compute and Writer differ", h, size)
			}
			p, err := Find(map[string]string{a.Key(): a.Encode()}, int64(size))
			if err != nil {
				t.Fatalf("%s, size %d: %v", h, size, err)
			}
			if p.Hash != h || p.Len() != (size+cs-1)/cs {
				t.Fatalf("%s, size %d: %s table of %d chunks", h, size, p.Hash, p.Len())
			}
			for i := range p.Len() {
				off, n := p.Range(i)
				if err := p.Check(i, blob[off:off+n]); err != nil {
					t.Fatalf("%s, size %d chunk %d: %v", h, size, i, err)
				}
			}
		}
	}
}

// TestTablesOfBothHashes: the two algorithms give other digests, each is
// read only under its own annotation, and a layer with both is checked by
// the BLAKE3 one.
func TestTablesOfBothHashes(t *testing.T) {
	blob := randomBlob(3*minChunkSize + 1)
	size := int64(len(blob))
	b3, _ := Compute(bytes.NewReader(blob), size, minChunkSize, BLAKE3)
	s2, _ := Compute(bytes.NewReader(blob), size, minChunkSize, SHA256)
	if b3.Key() != Annotation || s2.Key() != AnnotationSHA256 {
		t.Fatalf("keys %s and %s", b3.Key(), s2.Key())
	}
	if b3.Digests[0] == s2.Digests[0] {
		t.Fatal("BLAKE3 and sha256 digests of a chunk are equal")
	}
	if _, err := Parse(AnnotationSHA256, b3.Encode(), size); !errors.Is(err, ErrInvalid) {
		t.Fatalf("BLAKE3 digests under the sha256 annotation: %v", err)
	}
	if _, err := Parse(Annotation, s2.Encode(), size); !errors.Is(err, ErrInvalid) {
		t.Fatalf("sha256 digests under the BLAKE3 annotation: %v", err)
	}
	// A table that claims the other algorithm's digests checks nothing.
	swapped := *s2
	swapped.Hash = BLAKE3
	if err := swapped.Check(0, blob[:minChunkSize]); !errors.Is(err, ErrMismatch) {
		t.Fatalf("sha256 digests checked as BLAKE3: %v", err)
	}
	both := map[string]string{Annotation: b3.Encode(), AnnotationSHA256: s2.Encode()}
	if got, err := Find(both, size); err != nil || got.Hash != BLAKE3 {
		t.Fatalf("both annotations: %v, %v", got, err)
	}
	both[Annotation] = "{"
	if got, err := Find(both, size); err != nil || got.Hash != SHA256 {
		t.Fatalf("a broken BLAKE3 annotation and a sha256 one: %v, %v", got, err)
	}
	delete(both, AnnotationSHA256)
	if _, err := Find(both, size); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), Annotation) {
		t.Fatalf("a broken annotation alone: %v", err)
	}
	if _, err := Find(nil, size); !errors.Is(err, ErrInvalid) {
		t.Fatalf("no annotation: %v", err)
	}
	if _, err := NewWriter(minChunkSize, "md5"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("an unknown hash: %v", err)
	}
}

func TestCheckRefusesWrongBytes(t *testing.T) {
	blob := randomBlob(3 * minChunkSize)
	tab, _ := Compute(bytes.NewReader(blob), int64(len(blob)), minChunkSize, BLAKE3)
	bad := bytes.Clone(blob[minChunkSize : 2*minChunkSize])
	bad[17] ^= 1
	if err := tab.Check(1, bad); !errors.Is(err, ErrMismatch) {
		t.Fatalf("a flipped bit: %v", err)
	}
	if err := tab.Check(1, blob[:minChunkSize]); !errors.Is(err, ErrMismatch) {
		t.Fatalf("another chunk's bytes: %v", err)
	}
	if err := tab.Check(2, blob[2*minChunkSize:len(blob)-1]); !errors.Is(err, ErrMismatch) {
		t.Fatalf("a short chunk: %v", err)
	}
	if err := tab.Check(3, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a chunk past the end: %v", err)
	}
}

func TestParseRefusesHostileTables(t *testing.T) {
	blob := randomBlob(2*minChunkSize + 5)
	good, _ := Compute(bytes.NewReader(blob), int64(len(blob)), minChunkSize, BLAKE3)
	size := int64(len(blob))
	short := *good
	short.Digests = good.Digests[:1]
	cases := map[string]struct {
		s    string
		size int64
	}{
		"other size":      {good.Encode(), size + 1},
		"not json":        {"{", size},
		"tiny chunks":     {`{"chunkSize":1,"size":1,"blake3":""}`, 1},
		"huge chunks":     {`{"chunkSize":1099511627776,"size":1,"blake3":""}`, 1},
		"too few digests": {short.Encode(), size},
		"bad base64":      {`{"chunkSize":65536,"size":1,"blake3":"!!"}`, 1},
		"no digests":      {`{"chunkSize":65536,"size":1}`, 1},
		"oversized":       {strings.Repeat(" ", MaxAnnotation+1), size},
	}
	for name, c := range cases {
		if _, err := Parse(Annotation, c.s, c.size); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// TestCheckTeeWritesWhatItHashed: CheckTee passes on every byte of the
// chunk, in order, and checks as Check does.
func TestCheckTeeWritesWhatItHashed(t *testing.T) {
	blob := randomBlob(3*teePiece + 5)
	for _, h := range []Hash{BLAKE3, SHA256} {
		tab, _ := Compute(bytes.NewReader(blob), int64(len(blob)), 2*teePiece, h)
		var got bytes.Buffer
		for i := range tab.Len() {
			off, n := tab.Range(i)
			if err := tab.CheckTee(i, blob[off:off+n], &got); err != nil {
				t.Fatalf("%s chunk %d: %v", h, i, err)
			}
		}
		if !bytes.Equal(got.Bytes(), blob) {
			t.Fatalf("%s: wrote %d bytes, not the blob's %d", h, got.Len(), len(blob))
		}
		bad := bytes.Clone(blob[:2*teePiece])
		bad[teePiece+3] ^= 1
		if err := tab.CheckTee(0, bad, io.Discard); !errors.Is(err, ErrMismatch) {
			t.Fatalf("%s: a flipped bit: %v", h, err)
		}
	}
}

// TestDigestsAreTheStandardOnes pins each Hash to its published test
// vector (the digest of no bytes), so that a table means the same to
// every node and tool.
func TestDigestsAreTheStandardOnes(t *testing.T) {
	for h, want := range map[Hash]string{
		BLAKE3: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
		SHA256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
	} {
		tab := &Table{Hash: h}
		if got := tab.sum(nil); hex.EncodeToString(got[:]) != want {
			t.Errorf("%s of nothing: %x, want %s", h, got, want)
		}
		var got [DigestSize]byte
		tab.NewHash().Sum(got[:0])
		if hex.EncodeToString(got[:]) != want {
			t.Errorf("%s hash of nothing: %x, want %s", h, got, want)
		}
	}
}

// BenchmarkFind is what decoding a 16 GiB blob's table costs a Prepare
// (4096 digests, 171 KiB of annotation).
func BenchmarkFind(b *testing.B) {
	const size = 16 << 30
	t := &Table{Hash: BLAKE3, ChunkSize: DefaultChunkSize, Size: size, Digests: make([][DigestSize]byte, size/DefaultChunkSize)}
	ann := map[string]string{t.Key(): t.Encode()}
	b.SetBytes(int64(len(ann[t.Key()])))
	for b.Loop() {
		if _, err := Find(ann, size); err != nil {
			b.Fatal(err)
		}
	}
}
