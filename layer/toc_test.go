package layer

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
)

// A zstd:chunked layer's TOC is checked against its manifest checksum
// annotation, the digest of the TOC as stored (compressed), before the
// TOC is used: a layer it does not match is refused with ErrVerify.
func TestZstdChunkedManifestChecksum(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	truth, _ := tarTruth(t, tarb)
	blob, ann := buildZstdChunked(t, tarb)
	b, err := io.ReadAll(blob)
	if err != nil {
		t.Fatal(err)
	}
	sum := ann[zstdchunked.ManifestChecksumAnnotation]

	// What the annotation covers: the compressed TOC where the footer
	// puts it, not the TOC's JSON (estargz's TOC digest).
	dc := new(zstdchunked.Decompressor)
	_, tocOff, tocSize, err := dc.ParseFooter(b[len(b)-int(dc.FooterSize()):])
	if err != nil {
		t.Fatal(err)
	}
	stored := b[tocOff : tocOff+tocSize]
	if got := sha(stored).String(); got != sum {
		t.Fatalf("the compressed TOC is %s, the compressor's annotation %s", got, sum)
	}
	if blob.TOCDigest().String() == sum {
		t.Fatal("the TOC JSON's digest is the manifest checksum: the cases below prove nothing")
	}

	// Without WithStreams, a layer not opened by its TOC fails instead
	// of being streamed.
	open := func(t *testing.T, mediaType string, b []byte, ann map[string]string) (*Opened, Descriptor, error) {
		d := Descriptor{Digest: sha(b), Size: int64(len(b)), MediaType: mediaType, Annotations: ann}
		op, err := Open(ctx, d, &memSource{b: b})
		if err == nil {
			t.Cleanup(func() { op.Close() })
		}
		return op, d, err
	}
	withSum := func(s string) map[string]string {
		return map[string]string{zstdchunked.ManifestChecksumAnnotation: s}
	}
	refused := func(t *testing.T, d Descriptor, err error) {
		t.Helper()
		if !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), d.Digest.String()) {
			t.Fatalf("got %v, want ErrVerify naming layer %s", err, d.Digest)
		}
	}

	t.Run("right", func(t *testing.T) {
		op, _, err := open(t, mtZstd, b, ann)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := op.Layer.(*stargzLayer); !ok {
			t.Fatalf("opened as %T", op.Layer)
		}
		e, err := op.Lookup(ctx, "big.bin")
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readAll(t, ctx, op, e), truth["big.bin"].data) {
			t.Fatal("big.bin differs")
		}
	})

	t.Run("wrong", func(t *testing.T) {
		for _, s := range []string{
			sha([]byte("other")).String(),
			blob.TOCDigest().String(), // of the JSON
			"not a digest",
		} {
			_, d, err := open(t, mtZstd, b, withSum(s))
			refused(t, d, err)
		}
	})

	t.Run("altered TOC", func(t *testing.T) {
		// The TOC rewritten to make big.bin setuid, the rest of the blob
		// unchanged.
		zr, err := zstd.NewReader(bytes.NewReader(stored))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		var toc estargz.JTOC
		if err := json.NewDecoder(zr).Decode(&toc); err != nil {
			t.Fatal(err)
		}
		altered := 0
		for _, te := range toc.Entries {
			if te.Name == "big.bin" && te.Type == "reg" {
				te.Mode |= 0o4000
				altered++
			}
		}
		if altered != 1 {
			t.Fatalf("%d entries named big.bin", altered)
		}
		js, err := json.Marshal(&toc)
		if err != nil {
			t.Fatal(err)
		}
		forged := replaceTOC(t, "zstdchunked", b, int64(len(js)), func(w io.Writer) { w.Write(js) })

		// Unannotated, the forged blob opens and says what the forger
		// wants: what refuses it below is the checksum alone.
		op, _, err := open(t, mtGeneric, forged, nil)
		if err != nil {
			t.Fatalf("the forged blob without annotation: %v", err)
		}
		if e, err := op.Lookup(ctx, "big.bin"); err != nil || e.Mode&0o4000 == 0 {
			t.Fatalf("the forged blob without annotation: big.bin %+v, %v", e, err)
		}

		_, d, err := open(t, mtZstd, forged, ann)
		refused(t, d, err)
	})

	t.Run("not zstd:chunked", func(t *testing.T) {
		// On an eStargz (gzip) blob the annotation cannot be checked.
		eb, err := io.ReadAll(buildStargz(t, tarb))
		if err != nil {
			t.Fatal(err)
		}
		_, d, err := open(t, mtGzip, eb, withSum(sha(eb).String()))
		refused(t, d, err)
	})
}
