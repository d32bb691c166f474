package pack

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/weightsnap/weightsnap/annotations"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/internal/registryserver"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// uploadedBytes counts the bytes of blob uploads a registry receives.
type uploadedBytes struct{ n atomic.Int64 }

func (c *uploadedBytes) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/blobs/uploads") && (r.Method == http.MethodPatch || r.Method == http.MethodPut) {
			b, _ := io.ReadAll(r.Body)
			c.n.Add(int64(len(b)))
			r.Body = io.NopCloser(bytes.NewReader(b))
		}
		h.ServeHTTP(w, r)
	})
}

// countingRegistry starts a registry, stopped in t.Cleanup, that counts
// the blob bytes uploaded to it, and returns its host.
func countingRegistry(t *testing.T) (string, *uploadedBytes) {
	t.Helper()
	h, err := registryserver.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	up := &uploadedBytes{}
	srv := httptest.NewServer(up.wrap(h))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), up
}

// convertUploadingConfig pushes img to src, converts it to dst and
// returns its digest and image, failing t if the conversion uploaded any
// blob bytes but the new config's (counted by up, the registry's).
func convertUploadingConfig(t *testing.T, up *uploadedBytes, img v1.Image, src, dst string) (name.Digest, v1.Image) {
	t.Helper()
	push(t, img, src)
	before := up.n.Load()
	got, out := convertTo(t, src, dst)
	m, err := out.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if n := up.n.Load() - before; n != m.Config.Size {
		t.Errorf("convert uploaded %d blob bytes, want the config's %d", n, m.Config.Size)
	}
	return got, out
}

// convertTo converts src to dst and returns the result by digest and as
// the registry now serves it.
func convertTo(t *testing.T, src, dst string) (name.Digest, v1.Image) {
	t.Helper()
	got, err := Convert(context.Background(), src, dst, true)
	if err != nil {
		t.Fatal(err)
	}
	out, err := remote.Image(got)
	if err != nil {
		t.Fatal(err)
	}
	return got, out
}

// layerAnnotations returns the annotations of desc, a layer of img, as a
// node reads them: the descriptor's with those in the config.
func layerAnnotations(t *testing.T, img v1.Image, desc v1.Descriptor) map[string]string {
	t.Helper()
	raw, err := img.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return annotations.Merge(desc.Annotations, annotations.FromConfig(raw, []v1.Descriptor{desc})[desc.Digest.String()])
}

// checkManifestSmall checks that no layer descriptor of img's manifest
// carries a weightsnap annotation: they are all in the config.
func checkManifestSmall(t *testing.T, img v1.Image) {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	for _, desc := range m.Layers {
		for k := range desc.Annotations {
			if strings.HasPrefix(k, annotations.Prefix) {
				t.Errorf("layer %s: annotation %s in the manifest, want it in the config", desc.Digest, k)
			}
		}
	}
}

func TestConvertAddsTablesWithoutUploadingBlobs(t *testing.T) {
	host, up := countingRegistry(t)

	// gzip layers, as docker build makes them, one larger than a chunk.
	img, err := random.Image(9<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	got, out := convertUploadingConfig(t, up, img, host+"/built/model:v1", host+"/lazy/model:v1")
	in, _ := img.Manifest()
	m, _ := out.Manifest()
	if len(m.Layers) != len(in.Layers) {
		t.Fatalf("layers changed: %+v", m)
	}
	for i, desc := range m.Layers {
		if desc.Digest != in.Layers[i].Digest || !maps.Equal(desc.Annotations, in.Layers[i].Annotations) {
			t.Fatalf("layer %d: descriptor %+v, was %+v", i, desc, in.Layers[i])
		}
		checkTable(t, out, desc)
	}
	// The config is the source's with the tables added, nothing else.
	inCfg, _ := img.ConfigFile()
	outCfg, err := out.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(inCfg, outCfg) {
		t.Errorf("config changed beyond the tables:\n%+v\nwas\n%+v", outCfg, inCfg)
	}
	// A second convert keeps the tables and so the manifest.
	again, err := Convert(context.Background(), got.String(), host+"/lazy/model:v2", true)
	if err != nil {
		t.Fatal(err)
	}
	if again.DigestStr() != got.DigestStr() {
		t.Errorf("converting a converted image changed it: %s, was %s", again.DigestStr(), got.DigestStr())
	}
}

// checkTable checks that desc's table describes its blob's bytes.
func checkTable(t *testing.T, img v1.Image, desc v1.Descriptor) {
	t.Helper()
	tab, err := chunks.Find(layerAnnotations(t, img, desc), desc.Size)
	if err != nil {
		t.Fatalf("layer %s: %v", desc.Digest, err)
	}
	blob := blobOf(t, img, desc)
	for i := range tab.Len() {
		off, n := tab.Range(i)
		if err := tab.Check(i, blob[off:off+n]); err != nil {
			t.Fatalf("layer %s: %v", desc.Digest, err)
		}
	}
}

func TestConvertRefusesABlobThatIsNotItsDigest(t *testing.T) {
	h, err := registryserver.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(1<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	ls, _ := img.Layers()
	bad, _ := ls[0].Digest()
	// The registry serves a different body for the layer's blob.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+bad.String()) {
			w.Write(bytes.Repeat([]byte{'x'}, 1<<20))
			return
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	push(t, img, host+"/built/model:v1")
	if _, err := Convert(context.Background(), host+"/built/model:v1", host+"/lazy/model:v1", true); err == nil {
		t.Fatal("converted an image whose blob does not match its digest")
	}
	if _, err := remote.Head(mustRef(t, host+"/lazy/model:v1")); err == nil {
		t.Fatal("a manifest was pushed for the lying image")
	}
}

func mustRef(t *testing.T, s string) name.Reference {
	r, err := name.ParseReference(s, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// Every layer pack makes carries its chunk table and its tar headers, in
// the config.
func TestPackWritesChunkTables(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, modelSpec(), 0o644)
	img := build(t, dir, Options{LargeFileThreshold: 1 << 10})
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) < 2 {
		t.Fatalf("%d layers, want a layer of small files and one per large file", len(m.Layers))
	}
	for _, desc := range m.Layers {
		checkTable(t, img, desc)
		checkTarHeaders(t, img, desc)
	}
	checkManifestSmall(t, img)
	// Convert leaves a packed image as it is.
	out, err := withChunkTables(img)
	if err != nil {
		t.Fatal(err)
	}
	if digestOf(t, out) != digestOf(t, img) {
		t.Error("converting a packed image changed its manifest")
	}
}

// blobOf reads the blob of desc.
func blobOf(t *testing.T, img v1.Image, desc v1.Descriptor) []byte {
	t.Helper()
	l, err := img.LayerByDigest(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	blob, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return blob
}

// checkTarHeaders checks that desc's tar header annotation holds its
// blob's own bytes, the regions a walk of its headers reads.
func checkTarHeaders(t *testing.T, img v1.Image, desc v1.Descriptor) {
	t.Helper()
	regions, err := tarheaders.Parse(layerAnnotations(t, img, desc)[tarheaders.Annotation], desc.Size)
	if err != nil {
		t.Fatalf("layer %s: %v", desc.Digest, err)
	}
	blob := blobOf(t, img, desc)
	rec := tarheaders.NewRecorder()
	rec.Write(blob)
	want, err := rec.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(regions) != fmt.Sprint(want) {
		t.Fatalf("layer %s: annotated regions are not those of its tar", desc.Digest)
	}
	for _, r := range regions {
		if !bytes.Equal(r.Data, blob[r.Off:r.End()]) {
			t.Fatalf("layer %s: region [%d,+%d) is not the blob's", desc.Digest, r.Off, len(r.Data))
		}
	}
	if n := tarheaders.Size(regions); n >= desc.Size/2 && desc.Size > 1<<20 {
		t.Fatalf("layer %s: %d bytes of headers in a %d byte blob", desc.Digest, n, desc.Size)
	}
}

// A layer of more small files than the annotation may hold gets none; the
// node walks it.
func TestPackOmitsTooManyTarHeaders(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "many")
	var spec []fileSpec
	for i := range tarheaders.MaxBytes / 1024 {
		spec = append(spec, fileSpec{path: fmt.Sprintf("f%04d.txt", i), data: []byte("x")})
	}
	spec = append(spec, fileSpec{path: "w.bin", data: randomBytes(2<<10, 1)})
	writeModel(t, dir, spec, 0o644)
	img := build(t, dir, Options{LargeFileThreshold: 1 << 10})
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := layerAnnotations(t, img, m.Layers[0])[tarheaders.Annotation]; ok {
		t.Fatal("a layer of many small files got tar headers")
	}
	checkTable(t, img, m.Layers[0])
	checkTarHeaders(t, img, m.Layers[1])
}

// Convert adds the tar headers to uncompressed tar layers, also to those
// that have a chunk table already, and to no gzip layer.
func TestConvertAddsTarHeaders(t *testing.T) {
	host, up := countingRegistry(t)

	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, modelSpec(), 0o644)
	packed := build(t, dir, Options{LargeFileThreshold: 1 << 10})
	// As an older pack made it: chunk tables in the manifest, no tar
	// headers; and a gzip layer as docker makes it.
	old, err := packed.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	gz, err := random.Layer(3<<20, types.DockerLayer)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.Append(onDescriptors(t, packed, nil, tarheaders.Annotation), mutate.Addendum{Layer: gz})
	if err != nil {
		t.Fatal(err)
	}
	_, out := convertUploadingConfig(t, up, img, host+"/old/model:v1", host+"/lazy/model:v1")
	m, err := out.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	for i, desc := range m.Layers {
		checkTable(t, out, desc)
		if i == len(m.Layers)-1 {
			if _, ok := layerAnnotations(t, out, desc)[tarheaders.Annotation]; ok {
				t.Error("a gzip layer got tar headers")
			}
			continue
		}
		checkTarHeaders(t, out, desc)
		// The old table moves to the config as it was, beside the headers.
		if layerAnnotations(t, out, desc)[chunks.Annotation] != layerAnnotations(t, packed, old.Layers[i])[chunks.Annotation] {
			t.Errorf("layer %d: its chunk table changed", i)
		}
	}
	checkManifestSmall(t, out)
}

// An image whose tables an earlier version put on its layer descriptors,
// and that lacks nothing, gets them moved to its config; no blob is read.
func TestConvertMovesTablesToTheConfig(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, modelSpec(), 0o644)
	packed := build(t, dir, Options{LargeFileThreshold: 1 << 10})
	pm, err := packed.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	img := onDescriptors(t, packed, func(l v1.Layer) v1.Layer { return &unreadable{l} })
	out, err := withChunkTables(img)
	if err != nil {
		t.Fatal(err)
	}
	checkManifestSmall(t, out)
	om, err := out.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	for i, desc := range om.Layers {
		if got, want := layerAnnotations(t, out, desc), layerAnnotations(t, packed, pm.Layers[i]); !maps.Equal(got, want) {
			t.Errorf("layer %d: annotations %v, want %v", i, got, want)
		}
	}
	again, err := withChunkTables(out)
	if err != nil || digestOf(t, again) != digestOf(t, out) {
		t.Errorf("converting the moved image again changed it (%v)", err)
	}
}

// onDescriptors returns packed's layers with their annotations on their
// descriptors, as earlier versions of pack wrote them, less the keys
// drop; wrap, if not nil, wraps each layer.
func onDescriptors(t *testing.T, packed v1.Image, wrap func(v1.Layer) v1.Layer, drop ...string) v1.Image {
	t.Helper()
	m, err := packed.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	img := empty.Image
	for _, desc := range m.Layers {
		l, err := packed.LayerByDigest(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		if wrap != nil {
			l = wrap(l)
		}
		ann := maps.Clone(layerAnnotations(t, packed, desc))
		for _, k := range drop {
			delete(ann, k)
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: l, Annotations: ann}); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

// unreadable is a layer whose blob cannot be read: what converts it must
// not need to.
type unreadable struct{ v1.Layer }

func (unreadable) Compressed() (io.ReadCloser, error) {
	return nil, errors.New("the blob was read")
}

// A chunk table in the manifest that does not fit its blob is removed from
// the manifest, and a valid one written to the config: the manifest's
// would otherwise win over it. So is an invalid table of the other hash.
func TestConvertReplacesAnInvalidTable(t *testing.T) {
	host, up := countingRegistry(t)

	l, err := random.Layer(5<<20, types.DockerLayer)
	if err != nil {
		t.Fatal(err)
	}
	// A table of the blob with one byte more: it does not fit the blob.
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	blob, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	longer := append(blob, 0)
	tab, err := chunks.Compute(bytes.NewReader(longer), int64(len(longer)), chunks.DefaultChunkSize, chunks.BLAKE3)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: l, Annotations: map[string]string{
		tab.Key(): tab.Encode(), chunks.AnnotationSHA256: "not a table", "org.example.kept": "yes"}})
	if err != nil {
		t.Fatal(err)
	}
	_, out := convertUploadingConfig(t, up, img, host+"/bad/model:v1", host+"/lazy/model:v1")
	m, err := out.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	checkTable(t, out, m.Layers[0])
	checkManifestSmall(t, out)
	if m.Layers[0].Annotations["org.example.kept"] != "yes" {
		t.Errorf("annotations %v: another tool's annotation was dropped", m.Layers[0].Annotations)
	}
}

// An artifact whose config is not a JSON object cannot hold annotations:
// convert puts them on its layer descriptors, as earlier versions did.
func TestConvertAnnotatesAnArtifactWithoutJSONConfig(t *testing.T) {
	host, _ := countingRegistry(t)

	l, err := random.Layer(1<<20, types.OCIUncompressedLayer)
	if err != nil {
		t.Fatal(err)
	}
	base, err := mutate.Append(empty.Image, mutate.Addendum{Layer: l})
	if err != nil {
		t.Fatal(err)
	}
	m, err := base.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	m = m.DeepCopy()
	cfg := []byte("model weights, not JSON")
	m.Config.MediaType = "application/vnd.example.model.config.v1"
	m.Config.Digest, m.Config.Size, _ = v1.SHA256(bytes.NewReader(cfg))
	rawM, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	push(t, &convertedImage{Image: base, raw: rawM, m: m, rawCfg: cfg}, host+"/art/model:v1")
	_, out := convertTo(t, host+"/art/model:v1", host+"/art/model:lazy")
	om, err := out.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if om.Config.Digest != m.Config.Digest {
		t.Errorf("config %s, want the source's %s", om.Config.Digest, m.Config.Digest)
	}
	if _, err := chunks.Find(om.Layers[0].Annotations, om.Layers[0].Size); err != nil {
		t.Errorf("layer descriptor: %v, want its chunk table there", err)
	}
	checkTable(t, out, om.Layers[0])
}
