package remote

import (
	"encoding/json"
	"errors"
	"maps"
	"runtime"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/weightsnap/weightsnap/annotations"
	"github.com/weightsnap/weightsnap/internal/testutil"
)

// newWithRawConfig is img with its config replaced by raw.
func newWithRawConfig(t *testing.T, img v1.Image, raw []byte) v1.Image {
	t.Helper()
	out, err := testutil.WithConfig(img, nil, raw)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Resolve gives each layer the weightsnap annotations its config holds
// for it, under those of its descriptor, and nothing else from the config.
func TestResolveReadsLayerAnnotationsFromTheConfig(t *testing.T) {
	l0, _ := random.Layer(1024, types.OCIUncompressedLayer)
	l1, _ := random.Layer(1024, types.OCIUncompressedLayer)
	l2, _ := random.Layer(1024, types.OCIUncompressedLayer)
	img, err := mutate.Append(empty.Image,
		mutate.Addendum{Layer: l0, Annotations: map[string]string{"dev.weightsnap.a": "manifest", "org.example.t": "x"}},
		mutate.Addendum{Layer: l1},
		mutate.Addendum{Layer: l2})
	if err != nil {
		t.Fatal(err)
	}
	d0, _ := l0.Digest()
	d1, _ := l1.Digest()
	raw, err := img.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	raw, err = annotations.SetInConfig(raw, map[string]map[string]string{
		d0.String(): {"dev.weightsnap.a": "config", "dev.weightsnap.b": "b"},
		d1.String(): {"dev.weightsnap.c": "c", "org.example.t": "not a weightsnap key"},
	})
	if err != nil {
		t.Fatal(err)
	}
	reg := newTestRegistry(t, nil)
	ref := reg.pushImage(t, "models/cfg:v1", newWithRawConfig(t, img, raw))

	got, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	want := []map[string]string{
		{"dev.weightsnap.a": "manifest", "dev.weightsnap.b": "b", "org.example.t": "x"},
		{"dev.weightsnap.c": "c"},
		nil,
	}
	for i, l := range got.Layers {
		if !maps.Equal(l.Annotations, want[i]) {
			t.Errorf("layer %d: annotations %v, want %v", i, l.Annotations, want[i])
		}
	}
	if got.Config == nil || len(got.Config.RootFS.DiffIDs) != 3 {
		t.Errorf("config %+v: the image config did not parse", got.Config)
	}
}

// A manifest that names one blob many times gets that blob's config entry
// for every use, so the bytes taken from the config are bounded over all
// uses: a small image cannot make the node hold gigabytes of annotations.
func TestResolveBoundsAnnotationsFromTheConfig(t *testing.T) {
	l, _ := random.Layer(512, types.OCIUncompressedLayer)
	d, _ := l.Digest()
	image := func(uses int) v1.Image {
		adds := make([]mutate.Addendum, uses)
		for i := range adds {
			adds[i] = mutate.Addendum{Layer: l}
		}
		img, err := mutate.Append(empty.Image, adds...)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := img.RawConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		raw, err = annotations.SetInConfig(raw, map[string]map[string]string{
			d.String(): {"dev.weightsnap.x": strings.Repeat("a", 10<<10)},
		})
		if err != nil {
			t.Fatal(err)
		}
		return newWithRawConfig(t, img, raw)
	}
	reg := newTestRegistry(t, nil)
	c := New(fastRetry)
	few := reg.pushImage(t, "models/few:v1", image(100))
	if got, err := c.Resolve(t.Context(), few); err != nil || len(got.Layers) != 100 || got.Layers[99].Annotations["dev.weightsnap.x"] == "" {
		t.Fatalf("100 uses of 10 KiB: %v, want each layer annotated", err)
	}
	many := reg.pushImage(t, "models/many:v1", image(maxConfigAnnotations/(10<<10)+1))
	if _, err := c.Resolve(t.Context(), many); !errors.Is(err, ErrBadResponse) {
		t.Fatalf("over %d bytes of annotations in all: %v, want ErrBadResponse", maxConfigAnnotations, err)
	}
}

// An artifact's config that is not an image config may still hold layer
// annotations.
func TestResolveReadsAnArtifactConfigsAnnotations(t *testing.T) {
	l, _ := random.Layer(1024, types.OCIUncompressedLayer)
	d, _ := l.Digest()
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: l})
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.ConfigMediaType(img, "application/vnd.example.model.config.v1+json")
	raw, err := annotations.SetInConfig([]byte(`{"rootfs":"not an image config's"}`), map[string]map[string]string{
		d.String(): {"dev.weightsnap.k": "v"},
	})
	if err != nil {
		t.Fatal(err)
	}
	ref := newTestRegistry(t, nil).pushImage(t, "models/artifact:v1", newWithRawConfig(t, img, raw))
	got, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if got.Config != nil || got.Layers[0].Annotations["dev.weightsnap.k"] != "v" {
		t.Errorf("config %+v, annotations %v: want no image config and the layer's annotation", got.Config, got.Layers[0].Annotations)
	}
}

// What Resolve allocates for a config does not grow with what it does not
// use: a config of millions of empty history entries, well under
// maxConfigSize, is read without decoding them.
func TestResolveSkipsWhatItDoesNotUseOfTheConfig(t *testing.T) {
	l, _ := random.Layer(512, types.OCIUncompressedLayer)
	img, err := mutate.Append(empty.Image, mutate.Addendum{Layer: l})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	rootfs, err := json.Marshal(cfg.RootFS)
	if err != nil {
		t.Fatal(err)
	}
	const entries = 2 << 20
	raw := []byte(`{"architecture":"amd64","os":"linux","rootfs":` + string(rootfs) +
		`,"history":[` + strings.Repeat(`{},`, entries-1) + `{}]}`)
	ref := newTestRegistry(t, nil).pushImage(t, "models/history:v1", newWithRawConfig(t, img, raw))
	c := New(fastRetry)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	got, err := c.Resolve(t.Context(), ref)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Layers) != 1 || got.Layers[0].DiffID == "" {
		t.Fatalf("layers %+v: want the one layer with its diff ID from the config", got.Layers)
	}
	// The config's bytes are held a few times over (fetched, decoded
	// twice), the history never: decoded, it would be hundreds of MiB.
	n := after.TotalAlloc - before.TotalAlloc
	t.Logf("resolving a %d-byte config allocated %d bytes", len(raw), n)
	if n > 16*uint64(len(raw)) {
		t.Errorf("resolving a %d-byte config allocated %d bytes, more than 16 times its size", len(raw), n)
	}
}
