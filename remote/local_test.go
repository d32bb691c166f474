package remote

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
)

// getCounter counts the registry's GETs of manifests and blobs by path.
type getCounter struct {
	mu   sync.Mutex
	gets map[string]int
}

func (c *getCounter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && (strings.Contains(r.URL.Path, "/manifests/") || strings.Contains(r.URL.Path, "/blobs/")) {
			c.mu.Lock()
			c.gets[r.URL.Path]++
			c.mu.Unlock()
		}
		h.ServeHTTP(w, r)
	})
}

func (c *getCounter) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.gets {
		n += v
	}
	return n
}

// localStore is LocalContent over a map, recording what it was asked for.
type localStore struct {
	mu    sync.Mutex
	blobs map[digest.Digest][]byte
	asked []digest.Digest
}

func (s *localStore) get(_ context.Context, d digest.Digest, max int64) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.asked = append(s.asked, d)
	b, ok := s.blobs[d]
	if !ok {
		return nil, errors.New("not found")
	}
	if int64(len(b)) > max {
		return nil, errors.New("too large")
	}
	return b, nil
}

// pinnedImage pushes img and returns its reference by digest, its
// manifest and config as the registry serves them.
func pinnedImage(t *testing.T, reg *testRegistry, img v1.Image) (ref string, manifest, config []byte, md, cd digest.Digest) {
	t.Helper()
	tagged := reg.pushImage(t, "models/local:v1", img)
	manifest, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	config, err = img.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	md, cd = digest.FromBytes(manifest), digest.FromBytes(config)
	return strings.TrimSuffix(tagged, ":v1") + "@" + md.String(), manifest, config, md, cd
}

// TestResolveWithLocalContent: a manifest named by digest and its config
// held locally are not asked of the registry, and the image resolves as
// from the registry.
func TestResolveWithLocalContent(t *testing.T) {
	c := &getCounter{gets: map[string]int{}}
	reg := newTestRegistry(t, c.wrap)
	ref, manifest, config, md, cd := pinnedImage(t, reg, randomImage(t, 4<<10, 2))
	cl := New(fastRetry)
	want, err := cl.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if n := c.total(); n != 2 {
		t.Fatalf("the registry served %d GETs to a resolve without local content (%v); want the manifest and the config", n, c.gets)
	}

	local := &localStore{blobs: map[digest.Digest][]byte{md: manifest, cd: config}}
	before := c.total()
	got, err := New(fastRetry).Resolve(t.Context(), ref, WithLocalContent(local.get))
	if err != nil {
		t.Fatal(err)
	}
	if n := c.total() - before; n != 0 {
		t.Fatalf("the registry served %d GETs with the manifest and config held locally (%v); want none", n, c.gets)
	}
	if !reflect.DeepEqual(local.asked, []digest.Digest{md, cd}) {
		t.Fatalf("local content asked for %v; want the manifest %s, then the config %s", local.asked, md, cd)
	}
	assertSameImage(t, got, want)
}

// TestResolveLocalContentMissingOrWrong: what local content lacks, or gives
// with the wrong digest, comes from the registry; a reference by tag is
// never looked up locally.
func TestResolveLocalContentMissingOrWrong(t *testing.T) {
	c := &getCounter{gets: map[string]int{}}
	reg := newTestRegistry(t, c.wrap)
	img := randomImage(t, 4<<10, 2)
	ref, manifest, config, md, cd := pinnedImage(t, reg, img)
	want, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	wrongConfig := append([]byte(nil), config...)
	wrongConfig[len(wrongConfig)/2] ^= 1
	for _, tc := range []struct {
		name  string
		blobs map[digest.Digest][]byte
		gets  int // of the registry
	}{
		{"nothing held", map[digest.Digest][]byte{}, 2},
		{"manifest only", map[digest.Digest][]byte{md: manifest}, 1},
		{"config altered", map[digest.Digest][]byte{md: manifest, cd: wrongConfig}, 1},
		{"manifest altered", map[digest.Digest][]byte{md: append(append([]byte(nil), manifest...), ' '), cd: config}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			local := &localStore{blobs: tc.blobs}
			before := c.total()
			got, err := New(fastRetry).Resolve(t.Context(), ref, WithLocalContent(local.get))
			if err != nil {
				t.Fatal(err)
			}
			if n := c.total() - before; n != tc.gets {
				t.Fatalf("the registry served %d GETs; want %d", n, tc.gets)
			}
			assertSameImage(t, got, want)
		})
	}

	local := &localStore{blobs: map[digest.Digest][]byte{md: manifest, cd: config}}
	tagged := strings.Split(ref, "@")[0] + ":v1"
	if _, err := New(fastRetry).Resolve(t.Context(), tagged, WithLocalContent(local.get)); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(local.asked, []digest.Digest{cd}) {
		t.Fatalf("resolving a tag asked local content for %v; want only the config %s (the tag is the registry's to resolve)", local.asked, cd)
	}
}

func assertSameImage(t *testing.T, got, want *Image) {
	t.Helper()
	if got.Digest != want.Digest || !reflect.DeepEqual(got.Manifest, want.Manifest) || !reflect.DeepEqual(got.Config, want.Config) {
		t.Fatalf("resolved %s %+v %+v; want %s %+v %+v", got.Digest, got.Manifest, got.Config, want.Digest, want.Manifest, want.Config)
	}
	if len(got.Layers) != len(want.Layers) {
		t.Fatalf("%d layers; want %d", len(got.Layers), len(want.Layers))
	}
	for i := range got.Layers {
		g, w := got.Layers[i], want.Layers[i]
		if g.Digest != w.Digest || g.Size != w.Size || g.MediaType != w.MediaType || g.DiffID != w.DiffID || !reflect.DeepEqual(g.Annotations, w.Annotations) {
			t.Fatalf("layer %d: %+v; want %+v", i, g, w)
		}
	}
}
