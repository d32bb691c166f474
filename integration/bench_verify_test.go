package integration

// What BenchmarkModelPull needs to measure what chunk verification costs
// a cold read: a model image whose manifest carries no chunk tables.

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/pack"
)

// withoutChunkTables returns img with chunks.Annotations removed from every
// layer descriptor of its manifest: the same blobs, pinned by their
// digests alone, so that weightsnapd can check no range of them before it
// has read the whole blob.
func withoutChunkTables(img v1.Image) (v1.Image, error) {
	return withoutAnnotation(img, chunks.Annotations...)
}

// withoutAnnotation returns img with the annotation keys removed from
// every layer descriptor of its manifest.
func withoutAnnotation(img v1.Image, keys ...string) (v1.Image, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	m = m.DeepCopy() // its annotation maps too
	for i := range m.Layers {
		for _, key := range keys {
			delete(m.Layers[i].Annotations, key)
		}
		if len(m.Layers[i].Annotations) == 0 {
			m.Layers[i].Annotations = nil
		}
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return &manifestImage{Image: img, raw: raw, m: m}, nil
}

// manifestImage is an image with its manifest replaced by one naming the
// same config and layers; the blobs come from the embedded image.
type manifestImage struct {
	v1.Image
	raw []byte
	m   *v1.Manifest
}

func (i *manifestImage) RawManifest() ([]byte, error)    { return i.raw, nil }
func (i *manifestImage) Manifest() (*v1.Manifest, error) { return i.m.DeepCopy(), nil }
func (i *manifestImage) Size() (int64, error)            { return int64(len(i.raw)), nil }
func (i *manifestImage) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(i.raw))
	return h, err
}

// TestBenchWithoutChunkTables checks that the stripped image differs from
// pack's only in the chunk table annotations, and serves the same blobs.
func TestBenchWithoutChunkTables(t *testing.T) {
	m, err := writeBenchModel(t.Context(), t.TempDir(), []byte("tool"), 3<<20, 2, 9, "x")
	if err != nil {
		t.Fatal(err)
	}
	img, err := pack.Build(t.Context(), m.dir, pack.Options{Prefix: "/", LargeFileThreshold: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	stripped, err := withoutChunkTables(img)
	if err != nil {
		t.Fatal(err)
	}
	decode := func(img v1.Image) map[string]any {
		t.Helper()
		raw, err := img.RawManifest()
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(raw, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	want, got := decode(img), decode(stripped)
	layers, _ := want["layers"].([]any)
	if len(layers) < 2 {
		t.Fatalf("pack made %d layers, want the small files' and a weights file's at least", len(layers))
	}
	for i, l := range layers {
		desc := l.(map[string]any)
		ann := desc["annotations"].(map[string]any)
		if _, ok := ann[chunks.Annotation]; !ok {
			t.Fatalf("pack's layer %d has no chunk table", i)
		}
		delete(ann, chunks.Annotation)
		if len(ann) == 0 { // the small files' layer has no title
			delete(desc, "annotations")
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("stripped manifest\n%v\nwant pack's without chunk tables\n%v", got, want)
	}

	raw, err := stripped.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	d, err := stripped.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if h, _, _ := v1.SHA256(bytes.NewReader(raw)); d != h {
		t.Errorf("digest %s, want the raw manifest's %s", d, h)
	}
	if n, _ := stripped.Size(); n != int64(len(raw)) {
		t.Errorf("size %d, want %d", n, len(raw))
	}
	mf, err := stripped.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range mf.Layers {
		if _, err := chunks.Find(l.Annotations, l.Size); err == nil {
			t.Errorf("layer %s still has a chunk table", l.Digest)
		}
		if _, err := stripped.LayerByDigest(l.Digest); err != nil {
			t.Errorf("layer %s: %v", l.Digest, err)
		}
	}
}

// TestBenchChunkVerificationLine checks the line after the targets and
// that it is left out when a run has no path without chunk tables.
func TestBenchChunkVerificationLine(t *testing.T) {
	r := benchResult{Paths: []benchPath{
		{Key: "ws-cold", Name: "weightsnap CRI, cold", FirstMiB: 0.45, EndToEndMBps: 400},
		{Key: "ws-cold-notable", Name: "weightsnap CRI, cold, no chunk table", FirstMiB: 0.4, EndToEndMBps: 500},
	}}
	r.Verification = chunkVerification(r.Paths, "ws-cold", "ws-cold-notable")
	if v := r.Verification; v.Ratio != 0.8 || v.FirstMiBS != 0.45 || v.FirstMiBSWithout != 0.4 {
		t.Errorf("verification %+v", v)
	}
	var out strings.Builder
	writeTable(&out, r)
	const want = "chunk verification: cold read 400 vs 500 MB/s without (0.80×), time to first read 0.450 vs 0.400 s\n"
	if !strings.Contains(out.String(), want) {
		t.Errorf("table has no line %q:\n%s", want, out.String())
	}

	r.Paths = r.Paths[:1]
	r.Verification = chunkVerification(r.Paths, "ws-cold", "ws-cold-notable")
	out.Reset()
	writeTable(&out, r)
	if strings.Contains(out.String(), "chunk verification") {
		t.Errorf("a line on chunk verification without its path:\n%s", out.String())
	}
}
