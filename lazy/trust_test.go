package lazy

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// pushPlain pushes a one-file tar layer without a chunk table, as docker
// or buildah build layers, to repo and returns the reference, the layer
// digest and the file's content.
func pushPlain(t *testing.T, g *gatedRegistry, repoTag string) (string, digest.Digest, []byte) {
	// Several cache chunks: indexing it at Mount reads the first and the
	// last, so the blob is not whole, and not hashed, until a read of
	// the file. (Fetched whole by the index, a lying registry's blob may
	// fail its hash before Mount returns, failing the Mount.)
	content := bytes.Repeat([]byte("honest weights "), 250_000)
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
	sl := liarMount.l.Layer.(guardedLayer).sl
	if got, size := sl.blob.CachedBytes(), sl.blob.Size(); got >= size {
		t.Fatalf("indexing fetched the whole blob (%d of %d bytes): it may fail its hash before a read", got, size)
	}
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
	for _, h := range []chunks.Hash{chunks.BLAKE3, chunks.SHA256} {
		t.Run(string(h), func(t *testing.T) { testChunkTableCatchesACorruptRange(t, h) })
	}
}

// testChunkTableCatchesACorruptRange: with a table of h digests, the
// honest registry's bytes are served and a corrupting one's are not.
func testChunkTableCatchesACorruptRange(t *testing.T, h chunks.Hash) {
	g := newGatedRegistry(t)
	content := bytes.Repeat([]byte("checked weights "), 200_000)
	tarb := tarOf(t, "models/w", string(content))
	layers := testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar)
	if h == chunks.SHA256 {
		layers = testutil.WithSHA256Tables(t, layers)
	}
	if tab, err := chunks.Find(layers[0].Annotations, int64(len(layers[0].Blob))); err != nil || tab.Hash != h {
		t.Fatalf("the layer's table: %v, %v; want one of %s digests", tab, err, h)
	}
	ref := testutil.PushImage(t, g.addr(), "model:v1", layers)
	m, fake := newTestManager(t)
	if err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, digest.Digest(layers[0].Digest())); err != nil {
		t.Fatalf("Mount from the honest registry: %v", err)
	}
	if got, err := readAll(t, fake.live()[0], "models/w"); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read from the honest registry: %d bytes, %v", len(got), err)
	}

	// Another image of the same file, in a layer of another digest, so
	// that nothing of the first is in the cache.
	tarb = tarOf(t, "models/w2", string(content))
	layers = testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar)
	if h == chunks.SHA256 {
		layers = testutil.WithSHA256Tables(t, layers)
	}
	ref = testutil.PushImage(t, g.addr(), "model:v2", layers)
	g.corrupt = true
	if err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, digest.Digest(layers[0].Digest())); err != nil {
		// The index is read through the table too: a corrupt header
		// is as good a failure as a corrupt file.
		if !errors.Is(err, cache.ErrDigestMismatch) {
			t.Fatalf("Mount: %v", err)
		}
		return
	}
	got, err := readAll(t, fake.live()[1], "models/w2")
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

// pushClaimed pushes a one-layer image of tarb with its chunk table and
// the tar header annotation of claim (tarb's own, or a lie).
func pushClaimed(t *testing.T, g *gatedRegistry, tarb, claim []byte) (string, digest.Digest) {
	t.Helper()
	layers := testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar)
	lie := testutil.EncodeLayers(t, [][]byte{claim}, testutil.FormatTar)
	layers[0].Annotations[tarheaders.Annotation] = lie[0].Annotations[tarheaders.Annotation]
	if layers[0].Annotations[tarheaders.Annotation] == "" {
		t.Fatal("no tar header annotation")
	}
	return testutil.PushImage(t, g.addr(), "model:v1", layers), digest.Digest(layers[0].Digest())
}

// A layer whose manifest gives its tar headers is mounted without a byte
// of its blob: Mount returns while every blob GET is held. Its content is
// served once the headers are confirmed against the blob.
func TestTarHeadersMountReadsNoBlob(t *testing.T) {
	g := newGatedRegistry(t)
	content := bytes.Repeat([]byte("claimed weights "), 400_000) // 6.4 MB: a segment
	tarb := tarOf(t, "models/w", string(content))
	ref, d := pushClaimed(t, g, tarb, tarb)
	m, fake := newTestManager(t)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	// The image's config is read first (a blob too), as PullImage does;
	// the image is then named by its digest, as containerd names it.
	dl, err := m.describe(ctx, ref, d)
	if err != nil {
		t.Fatal(err)
	}
	release := g.hold()
	defer release()
	mp := filepath.Join(t.TempDir(), "mp")
	if err := m.Mount(ctx, mp, dl.image, d); err != nil {
		t.Fatalf("Mount with the blob held: %v", err)
	}
	f := fake.live()[0]
	sl := f.l.Layer.(guardedLayer).sl
	if f.l.Confirm == nil {
		t.Fatal("the layer was not indexed from its annotation")
	}
	e, err := f.l.Lookup(ctx, "models/w")
	if err != nil || e.Size != int64(len(content)) {
		t.Fatalf("lookup before confirmation: %+v, %v", e, err)
	}
	if _, ok := sl.passthroughFile(e); ok {
		t.Fatal("passthrough before the headers were confirmed")
	}
	release()
	waitReady(t, m, mp)
	if got, err := readAll(t, f, "models/w"); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read after confirmation: %v", err)
	}
}

// A manifest whose tar header annotation lies (the names of two files of
// the same size swapped, so each claims the other's bytes) gets no byte
// of either file: every read fails, the kernel is told to drop the
// layer's names, and the mismatch is counted.
func TestTarHeadersLieFailsTheLayer(t *testing.T) {
	g := newGatedRegistry(t)
	a, b := strings.Repeat("A", 5000), strings.Repeat("B", 5000)
	tarb := tarOfFiles(t, "x", a, "y", b)
	lie := tarOfFiles(t, "y", a, "x", b)
	ref, d := pushClaimed(t, g, tarb, lie)
	mismatches := promtest.ToFloat64(metrics.TarHeaderMismatches)
	m, fake := newTestManager(t)
	mp := filepath.Join(t.TempDir(), "mp")
	if err := m.Mount(t.Context(), mp, ref, d); err != nil {
		t.Fatal(err)
	}
	f := fake.live()[0]
	if f.l.Confirm == nil {
		t.Fatal("the layer was not indexed from its annotation")
	}
	for _, name := range []string{"x", "y"} {
		got, err := readAll(t, f, name)
		if !errors.Is(err, layer.ErrVerify) {
			t.Fatalf("read of %s: %v, want ErrVerify", name, err)
		}
		if bytes.Contains(got, []byte("A")) || bytes.Contains(got, []byte("B")) {
			t.Fatalf("read of %s served bytes", name)
		}
	}
	sl := f.l.Layer.(guardedLayer).sl
	<-sl.prepared
	if _, err := f.l.Lookup(t.Context(), "x"); !errors.Is(err, layer.ErrVerify) {
		t.Fatalf("lookup after the mismatch: %v, want ErrVerify", err)
	}
	if f.invalidations.Load() == 0 {
		t.Fatal("the kernel was not told to drop the failed layer's names")
	}
	if got := promtest.ToFloat64(metrics.TarHeaderMismatches) - mismatches; got != 1 {
		t.Fatalf("mismatches counted %v, want 1", got)
	}
}

// tarOfFiles is an uncompressed tar of files given as name, content, ...
func tarOfFiles(t *testing.T, nameContent ...string) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := 0; i < len(nameContent); i += 2 {
		name, content := nameContent[i], nameContent[i+1]
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(content))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// A claimed layer nobody reads is checked when its background fill starts
// (at the latest fillDelay after its mount): a lie is then found, logged
// and counted, and its names fail, without a read to start the check.
func TestTarHeadersLieFoundByFillWithoutReads(t *testing.T) {
	g := newGatedRegistry(t)
	a, b := strings.Repeat("A", 5000), strings.Repeat("B", 5000)
	ref, d := pushClaimed(t, g, tarOfFiles(t, "x", a, "y", b), tarOfFiles(t, "y", a, "x", b))
	mismatches := promtest.ToFloat64(metrics.TarHeaderMismatches)
	m, fake := newTestManager(t, WithBackgroundFill(true))
	if err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, d); err != nil {
		t.Fatal(err)
	}
	f := fake.live()[0]
	if f.l.Confirm == nil {
		t.Fatal("the layer was not indexed from its annotation")
	}
	select {
	case <-f.l.Layer.(guardedLayer).sl.prepared:
	case <-time.After(fillDelay + 10*time.Second):
		t.Fatal("the claim was not checked after the fill's delay")
	}
	if _, err := f.l.Lookup(t.Context(), "x"); !errors.Is(err, layer.ErrVerify) {
		t.Fatalf("lookup after the fill found the lie: %v, want ErrVerify", err)
	}
	if f.invalidations.Load() == 0 {
		t.Fatal("the kernel was not told to drop the failed layer's names")
	}
	if got := promtest.ToFloat64(metrics.TarHeaderMismatches) - mismatches; got != 1 {
		t.Fatalf("mismatches counted %v, want 1", got)
	}
}
