package imagebuild

import (
	"archive/tar"
	"bytes"
	"io"
	"log"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

var spec = Spec{Binary: []byte("\x7fELF not really a binary"), CACerts: []byte("-----BEGIN CERTIFICATE-----\n"), Arch: "arm64"}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestBuildIsDeterministic(t *testing.T) {
	a, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	if da, db := mustDigest(t, a), mustDigest(t, b); da != db {
		t.Fatalf("two builds of the same input: %s and %s", da, db)
	}
	other := spec
	other.Binary = append(bytes.Clone(spec.Binary), '!')
	c, err := Build(other)
	if err != nil {
		t.Fatal(err)
	}
	if mustDigest(t, a) == mustDigest(t, c) {
		t.Fatal("a different binary gave the same digest")
	}
}

func TestBuildContents(t *testing.T) {
	img, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "arm64" {
		t.Errorf("platform %s/%s, want linux/arm64", cf.OS, cf.Architecture)
	}
	if got := cf.Config.Entrypoint; len(got) != 1 || got[0] != BinaryPath {
		t.Errorf("entrypoint %q, want [%s]", got, BinaryPath)
	}
	if !cf.Created.IsZero() && cf.Created.Unix() != 0 {
		t.Errorf("config created %v, want the epoch", cf.Created)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != "application/vnd.oci.image.manifest.v1+json" || len(m.Layers) != 1 {
		t.Fatalf("manifest %s with %d layers, want one OCI layer", m.MediaType, len(m.Layers))
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.ModTime.Unix() != 0 {
			t.Errorf("%s: mtime %v, want the epoch", h.Name, h.ModTime)
		}
		if h.Name == strings.TrimPrefix(BinaryPath, "/") && h.Mode&0o111 != 0o111 {
			t.Errorf("%s: mode %o, want executable", h.Name, h.Mode)
		}
		b, _ := io.ReadAll(tr)
		files["/"+h.Name] = b
	}
	if !bytes.Equal(files[BinaryPath], spec.Binary) {
		t.Errorf("%s holds %q, want the binary", BinaryPath, files[BinaryPath])
	}
	if !bytes.Equal(files[CACertsPath], spec.CACerts) {
		t.Errorf("%s holds %q, want the CA bundle", CACertsPath, files[CACertsPath])
	}
}

func TestLayoutAndPush(t *testing.T) {
	img, err := Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	want := mustDigest(t, img)

	dir := filepath.Join(t.TempDir(), "image")
	for range 2 { // a second write replaces the first
		if err := WriteLayout(dir, img, "weightsnapd:test"); err != nil {
			t.Fatal(err)
		}
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != want ||
		im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "weightsnapd:test" {
		t.Fatalf("layout index %+v, want the one image %s named weightsnapd:test", im.Manifests, want)
	}

	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	ref, err := Push(t.Context(), host+"/weightsnap/weightsnapd:test", img, false)
	if err != nil {
		t.Fatal(err)
	}
	if ref.DigestStr() != want.String() {
		t.Fatalf("pushed %s, want digest %s", ref, want)
	}
	got, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	if d := mustDigest(t, got); d != want {
		t.Fatalf("registry serves %s, want %s", d, want)
	}
	if _, err := name.ParseReference(ref.String()); err != nil {
		t.Fatal(err)
	}
}
