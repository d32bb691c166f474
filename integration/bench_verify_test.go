package integration

// What BenchmarkModelPull needs to measure what chunk verification costs
// a cold read: a model image that carries no chunk tables.

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/weightsnap/weightsnap/annotations"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/pack"
)

// withoutChunkTables returns img with chunks.Annotations removed from every
// layer: the same blobs, pinned by their digests alone, so that
// weightsnapd can check no range of them before it has read the whole
// blob.
func withoutChunkTables(img v1.Image) (v1.Image, error) {
	return withoutAnnotation(img, chunks.Annotations...)
}

// withoutAnnotation returns img with the annotation keys removed from
// every layer, in the manifest and in the config (package annotations).
func withoutAnnotation(img v1.Image, keys ...string) (v1.Image, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	rawCfg, err := img.RawConfigFile()
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
	inConfig := annotations.FromConfig(rawCfg, m.Layers)
	for d, ann := range inConfig {
		for _, key := range keys {
			delete(ann, key)
		}
		if len(ann) == 0 {
			delete(inConfig, d)
		}
	}
	if rawCfg, err = annotations.SetInConfig(rawCfg, inConfig); err != nil {
		return nil, err
	}
	return testutil.WithConfig(img, m, rawCfg)
}

// TestBenchWithoutChunkTables checks that the stripped image differs from
// pack's only in the chunk tables, and serves the same blobs.
func TestBenchWithoutChunkTables(t *testing.T) {
	m, err := writeBenchModel(t.Context(), t.TempDir(), []byte("tool"), 3<<20, 2, 9, "x")
	if err != nil {
		t.Fatal(err)
	}
	img, err := pack.Build(t.Context(), m.dir, pack.Options{Prefix: "/", LargeFileThreshold: 1 << 10})
	if err != nil {
		t.Fatal(err)
	}
	stripped, err := withoutChunkTables(img)
	if err != nil {
		t.Fatal(err)
	}
	decode := func(raw []byte, err error) map[string]any {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(raw, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	// The manifests differ in the config's descriptor only.
	want, got := decode(img.RawManifest()), decode(stripped.RawManifest())
	delete(want, "config")
	delete(got, "config")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("stripped manifest\n%v\nwant pack's\n%v", got, want)
	}
	// The configs in the chunk tables only.
	want, got = decode(img.RawConfigFile()), decode(stripped.RawConfigFile())
	layers, _ := want[annotations.ConfigKey].(map[string]any)
	if len(layers) < 2 {
		t.Fatalf("pack annotated %d layers in the config, want the small files' and a weights file's at least", len(layers))
	}
	for d, l := range layers {
		ann := l.(map[string]any)
		if _, ok := ann[chunks.Annotation]; !ok {
			t.Fatalf("pack's layer %s has no chunk table", d)
		}
		delete(ann, chunks.Annotation)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("stripped config\n%v\nwant pack's without chunk tables\n%v", got, want)
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
	rawCfg, err := stripped.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if h, _, _ := v1.SHA256(bytes.NewReader(rawCfg)); mf.Config.Digest != h {
		t.Errorf("manifest names config %s, the config is %s", mf.Config.Digest, h)
	}
	inConfig := annotations.FromConfig(rawCfg, mf.Layers)
	for _, l := range mf.Layers {
		if _, err := chunks.Find(annotations.Merge(l.Annotations, inConfig[l.Digest.String()]), l.Size); err == nil {
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
