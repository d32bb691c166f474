package testutil

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"strconv"
	"sync"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// Format is a layer blob format.
type Format string

// Layer formats.
const (
	FormatTar     Format = "tar"
	FormatGzip    Format = "gzip"
	FormatZstd    Format = "zstd"
	FormatEStargz Format = "estargz"
)

// Formats lists every layer format, for tables of test cases.
var Formats = []Format{FormatTar, FormatGzip, FormatZstd, FormatEStargz}

// OCI layer media types.
const (
	MediaTypeTar  = "application/vnd.oci.image.layer.v1.tar"
	MediaTypeGzip = "application/vnd.oci.image.layer.v1.tar+gzip"
	MediaTypeZstd = "application/vnd.oci.image.layer.v1.tar+zstd"
)

// EStargzChunkSize is the chunk size Encode gives eStargz, small so that the
// fixtures' larger files span many chunks.
const EStargzChunkSize = 64 << 10

// LayerBlob is an encoded layer, as it is pushed to a registry.
type LayerBlob struct {
	Blob        []byte
	MediaType   string
	Annotations map[string]string
	// DiffID is the digest ("sha256:…") of the uncompressed tar stream.
	DiffID string
}

// Digest returns the blob's digest ("sha256:…").
func (l LayerBlob) Digest() string { return sha256Digest(l.Blob) }

type encodeKey struct {
	tar    [sha256.Size]byte
	format Format
}

// encodeCache makes repeated encodings of the same fixtures (every test of
// every package wants them) cost nothing after the first.
var encodeCache sync.Map // encodeKey → LayerBlob

// Encode converts an uncompressed tar layer into format f and returns the
// blob, its media type, its annotations (for eStargz the TOC digest and the
// uncompressed size, else the chunk table) and its diff ID. eStargz is gzip-compressed
// with chunks of EStargzChunkSize; its diff ID is that of its own tar stream,
// which adds the TOC entry to the original tar. The caller owns the results.
func Encode(t testing.TB, tarLayer []byte, f Format) (blob []byte, mediaType string, annotations map[string]string, diffID string) {
	t.Helper()
	key := encodeKey{sha256.Sum256(tarLayer), f}
	if v, ok := encodeCache.Load(key); ok {
		l := v.(LayerBlob)
		return bytes.Clone(l.Blob), l.MediaType, maps.Clone(l.Annotations), l.DiffID
	}
	l, err := encode(tarLayer, f)
	if err != nil {
		t.Fatalf("encode layer as %s: %v", f, err)
	}
	encodeCache.Store(key, l)
	return bytes.Clone(l.Blob), l.MediaType, maps.Clone(l.Annotations), l.DiffID
}

// EncodeLayers encodes each tar layer as f.
func EncodeLayers(t testing.TB, tarLayers [][]byte, f Format) []LayerBlob {
	t.Helper()
	out := make([]LayerBlob, len(tarLayers))
	for i, tl := range tarLayers {
		var l LayerBlob
		l.Blob, l.MediaType, l.Annotations, l.DiffID = Encode(t, tl, f)
		out[i] = l
	}
	return out
}

// TableChunkSize is the chunk size of the tables Encode gives, small so
// that the fixtures' larger files span several chunks.
const TableChunkSize = 1 << 20

// encode encodes tarLayer as f. Every format but eStargz (whose TOC
// carries chunk digests of its own) gets a chunk table, and an
// uncompressed tar with few enough headers its tar header annotation, as
// pack and convert give a layer: see WithoutTables for layers as other
// builders make them.
func encode(tarLayer []byte, f Format) (LayerBlob, error) {
	l, err := encodeBlob(tarLayer, f)
	if err != nil || f == FormatEStargz {
		return l, err
	}
	t, err := chunks.Compute(bytes.NewReader(l.Blob), int64(len(l.Blob)), TableChunkSize, chunks.BLAKE3)
	if err != nil {
		return LayerBlob{}, err
	}
	l.Annotations = map[string]string{t.Key(): t.Encode()}
	if f == FormatTar {
		rec := tarheaders.NewRecorder()
		rec.Write(l.Blob)
		if regions, err := rec.Finish(); err == nil {
			s, err := tarheaders.Encode(regions)
			if err != nil {
				return LayerBlob{}, err
			}
			l.Annotations[tarheaders.Annotation] = s
		}
	}
	return l, nil
}

// WithoutTables returns layers without their chunk tables, as docker or
// buildah would have built them.
func WithoutTables(layers []LayerBlob) []LayerBlob {
	out := make([]LayerBlob, len(layers))
	for i, l := range layers {
		l.Annotations = maps.Clone(l.Annotations)
		for _, k := range chunks.Annotations {
			delete(l.Annotations, k)
		}
		out[i] = l
	}
	return out
}

// WithSHA256Tables returns layers with chunk tables of sha256 digests, as
// earlier versions of pack wrote them, instead of their BLAKE3 ones.
func WithSHA256Tables(t testing.TB, layers []LayerBlob) []LayerBlob {
	t.Helper()
	out := WithoutTables(layers)
	for i, l := range out {
		if _, had := layers[i].Annotations[chunks.Annotation]; !had {
			continue
		}
		tab, err := chunks.Compute(bytes.NewReader(l.Blob), int64(len(l.Blob)), TableChunkSize, chunks.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		out[i].Annotations[tab.Key()] = tab.Encode()
	}
	return out
}

func encodeBlob(tarLayer []byte, f Format) (LayerBlob, error) {
	diffID := sha256Digest(tarLayer)
	switch f {
	case FormatTar:
		return LayerBlob{Blob: bytes.Clone(tarLayer), MediaType: MediaTypeTar, DiffID: diffID}, nil
	case FormatGzip:
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		if _, err := zw.Write(tarLayer); err != nil {
			return LayerBlob{}, err
		}
		if err := zw.Close(); err != nil {
			return LayerBlob{}, err
		}
		return LayerBlob{Blob: buf.Bytes(), MediaType: MediaTypeGzip, DiffID: diffID}, nil
	case FormatZstd:
		zw, err := zstd.NewWriter(nil)
		if err != nil {
			return LayerBlob{}, err
		}
		defer zw.Close()
		return LayerBlob{Blob: zw.EncodeAll(tarLayer, nil), MediaType: MediaTypeZstd, DiffID: diffID}, nil
	case FormatEStargz:
		return encodeEStargz(tarLayer)
	default:
		return LayerBlob{}, fmt.Errorf("unknown layer format %q", f)
	}
}

func encodeEStargz(tarLayer []byte) (LayerBlob, error) {
	b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarLayer), 0, int64(len(tarLayer))),
		estargz.WithChunkSize(EStargzChunkSize),
		estargz.WithCompressionLevel(gzip.DefaultCompression),
		// A fixed worker count fixes the sub-blob boundaries, so the blob
		// (and its digest) is the same on every machine.
		estargz.WithParallelism(2),
	)
	if err != nil {
		return LayerBlob{}, fmt.Errorf("build estargz: %w", err)
	}
	blob, err := io.ReadAll(b)
	if cerr := b.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return LayerBlob{}, fmt.Errorf("read estargz: %w", err)
	}
	size, err := b.UncompressedSize()
	if err != nil {
		return LayerBlob{}, fmt.Errorf("estargz uncompressed size: %w", err)
	}
	return LayerBlob{
		Blob:      blob,
		MediaType: MediaTypeGzip,
		Annotations: map[string]string{
			estargz.TOCJSONDigestAnnotation:         b.TOCDigest().String(),
			estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(size, 10),
		},
		DiffID: b.DiffID().String(),
	}, nil
}

func sha256Digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}
