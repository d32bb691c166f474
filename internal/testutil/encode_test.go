package testutil

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"

	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/tarheaders"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// decompress returns the tar stream of an encoded layer.
func decompress(t *testing.T, blob []byte, f Format) []byte {
	t.Helper()
	switch f {
	case FormatTar:
		return blob
	case FormatGzip, FormatEStargz:
		zr, err := gzip.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatal(err)
		}
		out, err := io.ReadAll(zr)
		if err != nil {
			t.Fatalf("gunzip: %v", err)
		}
		return out
	case FormatZstd:
		zr, err := zstd.NewReader(nil)
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		out, err := zr.DecodeAll(blob, nil)
		if err != nil {
			t.Fatalf("zstd: %v", err)
		}
		return out
	}
	t.Fatalf("unknown format %q", f)
	return nil
}

func TestEncodeRoundTrip(t *testing.T) {
	layers := FixtureLayers()
	wantMediaType := map[Format]string{
		FormatTar: MediaTypeTar, FormatGzip: MediaTypeGzip, FormatZstd: MediaTypeZstd, FormatEStargz: MediaTypeGzip,
	}
	for _, f := range Formats {
		t.Run(string(f), func(t *testing.T) {
			for i, l := range layers {
				blob, mt, ann, diffID := Encode(t, l, f)
				if mt != wantMediaType[f] {
					t.Errorf("layer %d: media type %q, want %q", i, mt, wantMediaType[f])
				}
				plain := decompress(t, blob, f)
				if got := sha256Digest(plain); got != diffID {
					t.Errorf("layer %d: diff ID %s, but the decompressed stream is %s", i, diffID, got)
				}
				if f != FormatEStargz {
					if !bytes.Equal(plain, l) {
						t.Errorf("layer %d: decompressed %d bytes differ from the %d-byte tar", i, len(plain), len(l))
					}
					tab, err := chunks.Find(ann, int64(len(blob)))
					want := 1 // a chunk table; an uncompressed tar has its tar headers too
					if f == FormatTar {
						if _, herr := tarheaders.Parse(ann[tarheaders.Annotation], int64(len(blob))); herr != nil {
							t.Fatalf("layer %d: tar headers: %v", i, herr)
						}
						want = 2
					}
					if err != nil || len(ann) != want {
						t.Fatalf("layer %d: annotations %v: want only a chunk table and, for a tar, its tar headers (%v)", i, ann, err)
					}
					for c := range tab.Len() {
						off, n := tab.Range(c)
						if err := tab.Check(c, blob[off:off+n]); err != nil {
							t.Fatalf("layer %d: %v", i, err)
						}
					}
					continue
				}
				checkEStargz(t, l, blob, plain, ann)
			}
		})
	}
}

// checkEStargz opens an eStargz blob as a lazy reader would and checks it
// against the tar it was built from.
func checkEStargz(t *testing.T, orig, blob, plain []byte, ann map[string]string) {
	t.Helper()
	r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))))
	if err != nil {
		t.Fatalf("estargz.Open: %v", err)
	}
	if got := ann[estargz.TOCJSONDigestAnnotation]; got != r.TOCDigest().String() {
		t.Errorf("TOC digest annotation %q, TOC is %s", got, r.TOCDigest())
	}
	if got := ann[estargz.StoreUncompressedSizeAnnotation]; got != strconv.Itoa(len(plain)) {
		t.Errorf("uncompressed size annotation %q, stream is %d bytes", got, len(plain))
	}
	if _, err := r.VerifyTOC(r.TOCDigest()); err != nil {
		t.Errorf("VerifyTOC: %v", err)
	}

	tr := tar.NewReader(bytes.NewReader(orig))
	files := 0
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimPrefix(h.Name, "./")
		e, ok := r.Lookup(strings.TrimSuffix(name, "/"))
		if !ok {
			t.Errorf("%s: not in the TOC", h.Name)
			continue
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		files++
		want, _ := io.ReadAll(tr)
		sr, err := r.OpenFile(name)
		if err != nil {
			t.Errorf("%s: open: %v", name, err)
			continue
		}
		got := make([]byte, len(want))
		if n, err := sr.ReadAt(got, 0); n != len(want) || (err != nil && !errors.Is(err, io.EOF)) {
			t.Errorf("%s: read %d of %d bytes: %v", name, n, len(want), err)
		} else if !bytes.Equal(got, want) {
			t.Errorf("%s: content differs", name)
		}
		if e.Size != int64(len(want)) {
			t.Errorf("%s: TOC size %d, want %d", name, e.Size, len(want))
		}
		if name == FixtureRandomFile {
			chunks := map[int64]bool{}
			for off := int64(0); off < e.Size; off += EStargzChunkSize {
				c, ok := r.ChunkEntryForOffset(name, off)
				if !ok {
					t.Fatalf("%s: no chunk at %d", name, off)
				}
				chunks[c.Offset] = true
			}
			if len(chunks) < 4 {
				t.Errorf("%s: %d chunks, want several", name, len(chunks))
			}
		}
	}
	if files == 0 {
		t.Error("no regular files checked")
	}

	// The eStargz tar stream is the original plus its own metadata entries.
	var orig2 bytes.Buffer
	tw := tar.NewWriter(&orig2)
	tr = tar.NewReader(bytes.NewReader(plain))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch strings.TrimPrefix(h.Name, "./") {
		case estargz.TOCTarName, estargz.PrefetchLandmark, estargz.NoPrefetchLandmark:
			continue
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	CompareTrees(t, ExtractTree([][]byte{orig}), ExtractTree([][]byte{orig2.Bytes()}))
}

func TestEncodeLayers(t *testing.T) {
	layers := FixtureLayers()[1:]
	blobs := EncodeLayers(t, layers, FormatZstd)
	if len(blobs) != len(layers) {
		t.Fatalf("got %d blobs for %d layers", len(blobs), len(layers))
	}
	for i, b := range blobs {
		if b.DiffID != sha256Digest(layers[i]) || b.MediaType != MediaTypeZstd || b.Digest() != sha256Digest(b.Blob) {
			t.Errorf("layer %d: %+v", i, b)
		}
	}
}
