package chunks

import (
	"bytes"
	"errors"
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
	for _, size := range []int{0, 1, cs - 1, cs, cs + 1, 5*cs + 7} {
		blob := randomBlob(size)
		a, err := Compute(bytes.NewReader(blob), int64(size), cs)
		if err != nil {
			t.Fatal(err)
		}
		w := NewWriter(cs)
		for p := blob; len(p) > 0; p = p[min(len(p), 1000):] { // odd pieces
			w.Write(p[:min(len(p), 1000)])
		}
		b := w.Table()
		if a.Encode() != b.Encode() {
			t.Fatalf("size %d: Compute and Writer differ", size)
		}
		p, err := Parse(a.Encode(), int64(size))
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if p.Len() != (size+cs-1)/cs {
			t.Fatalf("size %d: %d chunks", size, p.Len())
		}
		for i := range p.Len() {
			off, n := p.Range(i)
			if err := p.Check(i, blob[off:off+n]); err != nil {
				t.Fatalf("size %d chunk %d: %v", size, i, err)
			}
		}
	}
}

func TestCheckRefusesWrongBytes(t *testing.T) {
	blob := randomBlob(3 * minChunkSize)
	tab, _ := Compute(bytes.NewReader(blob), int64(len(blob)), minChunkSize)
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
	good, _ := Compute(bytes.NewReader(blob), int64(len(blob)), minChunkSize)
	size := int64(len(blob))
	short := *good
	short.Digests = good.Digests[:1]
	cases := map[string]struct {
		s    string
		size int64
	}{
		"other size":      {good.Encode(), size + 1},
		"not json":        {"{", size},
		"tiny chunks":     {`{"chunkSize":1,"size":1,"sha256":""}`, 1},
		"huge chunks":     {`{"chunkSize":1099511627776,"size":1,"sha256":""}`, 1},
		"too few digests": {short.Encode(), size},
		"bad base64":      {`{"chunkSize":65536,"size":1,"sha256":"!!"}`, 1},
		"oversized":       {strings.Repeat(" ", MaxAnnotation+1), size},
	}
	for name, c := range cases {
		if _, err := Parse(c.s, c.size); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}
