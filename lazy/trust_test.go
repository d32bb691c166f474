package lazy

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
)

// pushPlain pushes a one-file tar layer without a chunk table, as docker
// or buildah build layers, to repo and returns the reference, the layer
// digest and the file's content.
func pushPlain(t *testing.T, g *gatedRegistry, repoTag string) (string, digest.Digest, []byte) {
	content := bytes.Repeat([]byte("honest weights "), 50_000)
	tarb := tarOf(t, "models/w", string(content))
	layers := testutil.WithoutTables(testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar))
	return testutil.PushImage(t, g.addr(), repoTag, layers), digest.Digest(layers[0].Digest()), content
}

// readAll reads the file name of the layer a fake mount serves.
func readAll(t *testing.T, f *fakeMount, name string) ([]byte, error) {
	t.Helper()
	e, err := f.l.Lookup(t.Context(), name)
	if err != nil {
		return nil, err
	}
	p := make([]byte, e.Size)
	n, err := f.l.ReadAt(t.Context(), e, p, 0)
	if err != nil && n != len(p) {
		return p[:n], err
	}
	return p, nil
}

// By default a layer nothing but its blob digest covers is not served
// lazily: containerd downloads and verifies it.
func TestUnverifiedLayerIsRefusedByDefault(t *testing.T) {
	g := newGatedRegistry(t)
	ref, d, _ := pushPlain(t, g, "plain:v1")
	m, fake := newTestManager(t)
	err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, d)
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Mount: %v, want ErrUnsupported", err)
	}
	if len(fake.live()) != 0 {
		t.Fatal("a refused layer was mounted")
	}
}

// With UnverifiedFetch the layer is fetched whole and verified before it
// is mounted: a registry that serves wrong bytes gets no mount.
func TestUnverifiedFetchVerifiesBeforeMounting(t *testing.T) {
	g := newGatedRegistry(t)
	ref, d, content := pushPlain(t, g, "plain:v1")
	m, fake := newTestManager(t, WithUnverifiedLayers(UnverifiedFetch))
	if err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, d); err != nil {
		t.Fatal(err)
	}
	if got, err := readAll(t, fake.live()[0], "models/w"); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read: %v", err)
	}

	bad := newGatedRegistry(t)
	bad.corrupt = true
	ref2, d2, _ := pushPlain(t, bad, "plain:v1")
	m2, fake2 := newTestManager(t, WithUnverifiedLayers(UnverifiedFetch))
	if err := m2.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref2, d2); !errors.Is(err, cache.ErrDigestMismatch) {
		t.Fatalf("Mount from a lying registry: %v, want ErrDigestMismatch", err)
	}
	if len(fake2.live()) != 0 {
		t.Fatal("a layer that did not verify was mounted")
	}
}

// Served lazily before it verified, a layer's bytes stay with the
// repository they came from: another repository's pods never read them.
// When the blob does not verify, every read of the layer fails and the
// kernel is told to drop what it cached.
func TestUnverifiedLazyKeepsBytesApartAndFailsOnMismatch(t *testing.T) {
	honest := newGatedRegistry(t)
	liar := newGatedRegistry(t)
	liar.corrupt = true
	refH, d, content := pushPlain(t, honest, "model:v1")
	refL, dl, _ := pushPlain(t, liar, "model:v1")
	if d != dl {
		t.Fatal("the two registries hold different blobs")
	}
	mismatches := promtest.ToFloat64(metrics.UnverifiedLayerMismatches)
	m, fake := newTestManager(t, WithUnverifiedLayers(UnverifiedLazy))
	dir := t.TempDir()
	if err := m.Mount(t.Context(), filepath.Join(dir, "liar"), refL, d); err != nil {
		t.Fatal(err)
	}
	liarMount := fake.live()[0]
	if got, _ := readAll(t, liarMount, "models/w"); bytes.Equal(got, content) {
		t.Fatal("the lying registry served the right bytes: the test proves nothing")
	}
	if err := m.Mount(t.Context(), filepath.Join(dir, "honest"), refH, d); err != nil {
		t.Fatal(err)
	}
	if got, err := readAll(t, fake.live()[1], "models/w"); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("the honest image read %q..., %v: another repository's unverified bytes", got[:min(16, len(got))], err)
	}
	// Background fill reads and checks the whole blob of the liar's layer.
	sl := liarMount.l.Layer.(guardedLayer).sl
	m.fill(t.Context(), sl)
	if _, err := readAll(t, liarMount, "models/w"); !errors.Is(err, layer.ErrVerify) {
		t.Fatalf("read after the mismatch: %v, want ErrVerify", err)
	}
	if liarMount.invalidations.Load() == 0 {
		t.Fatal("the kernel was not told to drop the failed layer's pages")
	}
	if got := promtest.ToFloat64(metrics.UnverifiedLayerMismatches) - mismatches; got != 1 {
		t.Fatalf("mismatches counted %v, want 1", got)
	}
}

// A layer with a chunk table is served with every range checked: a
// registry that corrupts a byte gives a read error, never a wrong byte.
func TestChunkTableCatchesACorruptRange(t *testing.T) {
	g := newGatedRegistry(t)
	content := bytes.Repeat([]byte("checked weights "), 200_000)
	tarb := tarOf(t, "models/w", string(content))
	layers := testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar)
	ref := testutil.PushImage(t, g.addr(), "model:v1", layers)
	g.corrupt = true
	m, fake := newTestManager(t)
	if err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, digest.Digest(layers[0].Digest())); err != nil {
		// The index is read through the table too: a corrupt header
		// is as good a failure as a corrupt file.
		if !errors.Is(err, cache.ErrDigestMismatch) {
			t.Fatalf("Mount: %v", err)
		}
		return
	}
	got, err := readAll(t, fake.live()[0], "models/w")
	if err == nil || !errors.Is(err, cache.ErrDigestMismatch) {
		t.Fatalf("read through a corrupting registry: %v, want ErrDigestMismatch", err)
	}
	if bytes.Contains(got, []byte("X")) {
		t.Fatal("a corrupt byte was served")
	}
}

// A manifest that promises a TOC the blob does not have gets no lazy
// mount: without the TOC's chunk digests the blob would be streamed and
// checked only at its end.
func TestPromisedTOCThatIsNotThereIsRefused(t *testing.T) {
	g := newGatedRegistry(t)
	tarb := tarOf(t, "models/w", "weights")
	layers := testutil.WithoutTables(testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatGzip))
	layers[0].Annotations = map[string]string{estargz.TOCJSONDigestAnnotation: digest.FromString("a TOC").String()}
	ref := testutil.PushImage(t, g.addr(), "liar:v1", layers)
	m, fake := newTestManager(t, WithUnverifiedLayers(UnverifiedLazy))
	err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, digest.Digest(layers[0].Digest()))
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Mount: %v, want ErrUnsupported", err)
	}
	if len(fake.live()) != 0 {
		t.Fatal("mounted")
	}
}
