package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/weightsnap/weightsnap/chunks"
)

// randomTar is a tar of one file of n random bytes (incompressible, so the
// blob spans several table chunks).
func randomTar(t *testing.T, n int) []byte {
	data := make([]byte, n)
	rand.NewChaCha8([32]byte{7}).Read(data)
	return buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "weights", Mode: 0o644}, data: data}})
}

// With a chunk table, a streamed layer decompresses only checked chunks:
// a blob whose third chunk is corrupt serves what came before it and
// fails every read of what comes after, and its stream is not sealed.
func TestStreamWithTableChecksEveryChunk(t *testing.T) {
	ctx := testCtx(t)
	tarb := randomTar(t, 600<<10)
	blob := compress(t, "gzip", tarb)
	table, err := chunks.Compute(bytes.NewReader(blob), int64(len(blob)), 64<<10, chunks.BLAKE3)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(blob)
	bad[2*64<<10+100] ^= 0xff
	d := Descriptor{Digest: sha(blob), Size: int64(len(blob)), MediaType: mtGzip, DiffID: sha(tarb)}
	streams := newMemStreams()
	op, err := Open(ctx, d, nil, WithStreams(opener(bad), streams), WithTable(table))
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if _, err := op.ReadDir(ctx, ""); !errors.Is(err, ErrVerify) {
		t.Fatalf("readdir of a corrupt stream: %v, want ErrVerify", err)
	}
	st := streams.m[d.Digest]
	if st.Done() {
		t.Fatal("a stream with a corrupt chunk was sealed")
	}
	// Everything written came from the two good chunks: no byte of the
	// corrupt one was decompressed.
	if limit := int64(len(tarb)); st.Written() >= limit {
		t.Fatalf("%d of %d bytes written", st.Written(), limit)
	}
}

// Without a table, a blob that is not its digest fails at the end, even
// when it decompresses to the right DiffID's bytes... or to anything.
func TestStreamChecksTheBlobDigest(t *testing.T) {
	ctx := testCtx(t)
	tarb := randomTar(t, 100<<10)
	blob := compress(t, "gzip", tarb)
	other := compress(t, "zstd", tarb) // same content, another blob
	d := Descriptor{Digest: sha(blob), Size: int64(len(other)), MediaType: mtGzip, DiffID: sha(tarb)}
	op, err := Open(ctx, d, nil, WithStreams(opener(other), newMemStreams()))
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if _, err := op.ReadDir(ctx, ""); !errors.Is(err, ErrVerify) {
		t.Fatalf("readdir of another blob: %v, want ErrVerify", err)
	}
}

// An image that claims another layer's DiffID for a blob of its own gets
// a stream of its own blob, which fails at Seal; it never sees the other
// layer's files.
func TestStreamClaimingAnotherDiffIDGetsItsOwnBlob(t *testing.T) {
	ctx := testCtx(t)
	honestTar := randomTar(t, 100<<10)
	honest := compress(t, "gzip", honestTar)
	streams := newMemStreams()
	dh := Descriptor{Digest: sha(honest), Size: int64(len(honest)), MediaType: mtGzip, DiffID: sha(honestTar)}
	h, err := Open(ctx, dh, nil, WithStreams(opener(honest), streams))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.ReadDir(ctx, ""); err != nil {
		t.Fatal(err)
	}
	lieTar := buildTar(t, []tarFile{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "mine", Mode: 0o644}, data: []byte("x")}})
	lie := compress(t, "gzip", lieTar)
	dl := Descriptor{Digest: sha(lie), Size: int64(len(lie)), MediaType: mtGzip, DiffID: dh.DiffID}
	opened := 0
	open := func(ctx context.Context) (io.ReadCloser, error) { opened++; return opener(lie)(ctx) }
	l, err := Open(ctx, dl, nil, WithStreams(open, streams))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := l.Lookup(ctx, "weights"); err == nil {
		t.Fatal("the liar's layer shows the honest layer's file")
	}
	if opened != 1 {
		t.Fatalf("the liar's blob was opened %d times, want its own stream", opened)
	}
}

// A tar index is kept only for a Source that was verified: an index built
// from unverified bytes, kept under the blob's digest, would be what every
// later mount of that digest shows.
func TestTarIndexKeptOnlyForAVerifiedSource(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	d := Descriptor{Digest: sha(tarb), Size: int64(len(tarb)), MediaType: mtTar}
	meta := newMemMeta()
	op, err := Open(ctx, d, &memSource{b: tarb}, WithMeta(meta))
	if err != nil {
		t.Fatal(err)
	}
	op.Close()
	if len(meta.m) != 0 {
		t.Fatalf("an unverified source's index was kept: %v", meta.m)
	}
	op, err = Open(ctx, d, &memSource{b: tarb}, WithMeta(meta), WithVerifiedSource())
	if err != nil {
		t.Fatal(err)
	}
	op.Close()
	if len(meta.m) != 1 {
		t.Fatalf("a verified source's index was not kept: %d records", len(meta.m))
	}
}
