package testutil

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// pullAndCheck pulls ref with go-containerregistry and checks the image is
// exactly what was pushed.
func pullAndCheck(t *testing.T, ref, manifestDigest string, layers []LayerBlob) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	if d, err := img.Digest(); err != nil || d.String() != manifestDigest {
		t.Errorf("manifest digest %v (err %v), pushed %s", d, err, manifestDigest)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	if len(m.Layers) != len(layers) || len(cfg.RootFS.DiffIDs) != len(layers) {
		t.Fatalf("%d manifest layers, %d diff IDs; pushed %d layers", len(m.Layers), len(cfg.RootFS.DiffIDs), len(layers))
	}
	if cfg.OS != "linux" || cfg.Architecture == "" {
		t.Errorf("config platform %s/%s", cfg.OS, cfg.Architecture)
	}
	for i, l := range layers {
		desc := m.Layers[i]
		if string(desc.MediaType) != l.MediaType || desc.Digest.String() != l.Digest() || desc.Size != int64(len(l.Blob)) {
			t.Errorf("layer %d: descriptor %+v, pushed %s %s", i, desc, l.MediaType, l.Digest())
		}
		if len(desc.Annotations) != len(l.Annotations) {
			t.Errorf("layer %d: annotations %v, pushed %v", i, desc.Annotations, l.Annotations)
		}
		for k, v := range l.Annotations {
			if desc.Annotations[k] != v {
				t.Errorf("layer %d: annotation %s=%q, pushed %q", i, k, desc.Annotations[k], v)
			}
		}
		if cfg.RootFS.DiffIDs[i].String() != l.DiffID {
			t.Errorf("layer %d: diff ID %s, pushed %s", i, cfg.RootFS.DiffIDs[i], l.DiffID)
		}
		layer, err := img.LayerByDigest(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		if got := readCompressed(t, layer); !bytes.Equal(got, l.Blob) {
			t.Errorf("layer %d: pulled %d bytes differ from the %d pushed", i, len(got), len(l.Blob))
		}
	}
}

func readCompressed(t *testing.T, l v1.Layer) []byte {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read layer: %v", err)
	}
	return b
}

func TestRegistryPushPull(t *testing.T) {
	reg := StartRegistry(t)
	for _, f := range Formats {
		t.Run(string(f), func(t *testing.T) {
			layers := EncodeLayers(t, FixtureLayers(), f)
			ref, digest := PushImageWithDigest(t, reg.Addr, "fixture/"+string(f)+":v1", layers)
			if want := reg.Addr + "/fixture/" + string(f) + ":v1"; ref != want {
				t.Errorf("ref %q, want %q", ref, want)
			}
			pullAndCheck(t, ref, digest, layers)
		})
	}
}

// TestRegistryThroughProxy pushes and pulls through a Proxy, which must pass
// uploads through (their Location headers name the proxy) and count exactly
// the blob bytes a pull reads.
func TestRegistryThroughProxy(t *testing.T) {
	reg := StartRegistry(t)
	p := StartProxy(t, reg.URL(), Faults{})
	layers := EncodeLayers(t, FixtureLayers(), FormatGzip)
	ref, digest := PushImageWithDigest(t, p.Addr, "proxied:v1", layers)
	p.Reset()
	pullAndCheck(t, ref, digest, layers)
	var sum int64
	for i, l := range layers {
		if got := p.BlobBytes(l.Digest()); got != int64(len(l.Blob)) {
			t.Errorf("layer %d: proxy counted %d bytes, blob is %d", i, got, len(l.Blob))
		}
		sum += int64(len(l.Blob))
	}
	// The rest is the config blob.
	if got := p.TotalBlobBytes(); got <= sum {
		t.Errorf("TotalBlobBytes %d, want the %d layer bytes plus the config", got, sum)
	}
}

func TestRegistryPullThroughAndStop(t *testing.T) {
	upstream := StartRegistry(t)
	layers := EncodeLayers(t, FixtureLayers()[1:], FormatTar)
	_, digest := PushImageWithDigest(t, upstream.Addr, "mirrored:v1", layers)

	mirror := StartRegistry(t, WithPullThrough(upstream.URL()))
	if mirror.Addr == upstream.Addr || mirror.Dir == upstream.Dir {
		t.Fatal("the two registries share an address or a storage dir")
	}
	pullAndCheck(t, mirror.Addr+"/mirrored:v1", digest, layers)

	upstream.Stop()
	upstream.Stop() // idempotent
	client := &http.Client{Timeout: 5 * time.Second}
	if resp, err := client.Get(upstream.URL() + "/v2/"); err == nil {
		resp.Body.Close()
		t.Errorf("stopped registry still answers: %s", resp.Status)
	}
	resp, err := client.Get(mirror.URL() + "/v2/")
	if err != nil {
		t.Fatalf("mirror after upstream stop: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("mirror /v2/: %s", resp.Status)
	}
}

// TestRegistryDeleteImageAndCollect deletes one of two images sharing a
// layer and collects garbage: the data of the blobs only it named leaves
// the disk, the shared layer and the other image stay whole.
func TestRegistryDeleteImageAndCollect(t *testing.T) {
	reg := StartRegistry(t)
	layers := EncodeLayers(t, FixtureLayers(), FormatTar)
	keepRef, keepDigest := PushImageWithDigest(t, reg.Addr, "keep:v1", layers[:2])
	PushImage(t, reg.Addr, "gone:v1", layers[1:])
	data := func(d string) string {
		alg, hex, _ := strings.Cut(d, ":")
		return filepath.Join(reg.Dir, "docker", "registry", "v2", "blobs", alg, hex[:2], hex, "data")
	}
	blobs, err := reg.DeleteImage(t.Context(), "gone", "v1")
	if err != nil {
		t.Fatal(err)
	}
	if len(blobs) != 3 || blobs[1] != layers[1].Digest() || blobs[2] != layers[2].Digest() {
		t.Fatalf("DeleteImage named blobs %v, want the config and layers %s, %s", blobs, layers[1].Digest(), layers[2].Digest())
	}
	if _, err := os.Stat(data(layers[2].Digest())); err != nil {
		t.Fatalf("the deleted image's own layer left the disk before garbage collection: %v", err)
	}
	if err := reg.GarbageCollect(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{blobs[0], layers[2].Digest()} {
		if _, err := os.Stat(data(d)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("blob %s only the deleted image named: data still on disk after garbage collection (%v)", d, err)
		}
	}
	for _, l := range layers[:2] {
		if _, err := os.Stat(data(l.Digest())); err != nil {
			t.Errorf("blob %s the kept image names: %v", l.Digest(), err)
		}
	}
	resp, err := http.Get(reg.URL() + "/v2/gone/manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET the deleted image's tag: %s, want 404", resp.Status)
	}
	pullAndCheck(t, keepRef, keepDigest, layers[:2])
}
