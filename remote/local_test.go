package remote

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
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

// TestResolveLocalContentIndexAndBareManifest: an index named by digest
// and its platform's manifest, held locally, resolve without the
// registry; so does a manifest whose body names no media type (local
// content has no Content-Type).
func TestResolveLocalContentIndexAndBareManifest(t *testing.T) {
	c := &getCounter{gets: map[string]int{}}
	reg := newTestRegistry(t, c.wrap)
	host := v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	img := randomImage(t, 1024, 1)
	idx := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &host}})
	tagged := reg.pushIndex(t, "multi/arch:latest", idx)
	rawIdx, err := idx.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	manifest, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	config, err := img.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	id := digest.FromBytes(rawIdx)
	ref := strings.TrimSuffix(tagged, ":latest") + "@" + id.String()
	want, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	local := &localStore{blobs: map[digest.Digest][]byte{id: rawIdx, digest.FromBytes(manifest): manifest, digest.FromBytes(config): config}}
	before := c.total()
	got, err := New(fastRetry).Resolve(t.Context(), ref, WithLocalContent(local.get))
	if err != nil {
		t.Fatal(err)
	}
	if n := c.total() - before; n != 0 {
		t.Fatalf("an index, its manifest and config held locally: the registry served %d GETs; want none", n)
	}
	assertSameImage(t, got, want)

	// The same manifest without its mediaType member, pushed as is.
	var m map[string]any
	if err := json.Unmarshal(manifest, &m); err != nil {
		t.Fatal(err)
	}
	delete(m, "mediaType")
	bare, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	bd := digest.FromBytes(bare)
	local.blobs[bd] = bare
	got, err = New(fastRetry).Resolve(t.Context(), strings.TrimSuffix(tagged, ":latest")+"@"+bd.String(), WithLocalContent(local.get))
	if err != nil {
		t.Fatalf("a manifest without mediaType from local content: %v", err)
	}
	if got.Digest != bd || len(got.Layers) != len(want.Layers) || got.Layers[0].Digest != want.Layers[0].Digest {
		t.Fatalf("resolved %s with %d layers; want %s with the image's", got.Digest, len(got.Layers), bd)
	}
}

// TestResolveLocalContentTooLargeOrHung: local content larger than asked
// for, or that does not answer, is passed over for the registry, and the
// resolve asks it nothing more after it failed once.
func TestResolveLocalContentTooLargeOrHung(t *testing.T) {
	reg := newTestRegistry(t, nil)
	ref, manifest, _, md, _ := pinnedImage(t, reg, randomImage(t, 4<<10, 1))
	want, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	oversized := func(_ context.Context, d digest.Digest, max int64) ([]byte, error) {
		return append(append([]byte(nil), manifest...), make([]byte, max)...), nil
	}
	got, err := New(fastRetry).Resolve(t.Context(), ref, WithLocalContent(oversized))
	if err != nil {
		t.Fatal(err)
	}
	assertSameImage(t, got, want)

	old := localBudget
	localBudget = 50 * time.Millisecond
	t.Cleanup(func() { localBudget = old })
	var asked []digest.Digest
	hung := func(ctx context.Context, d digest.Digest, _ int64) ([]byte, error) {
		asked = append(asked, d)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	got, err = New(fastRetry).Resolve(t.Context(), ref, WithLocalContent(hung))
	if err != nil {
		t.Fatal(err)
	}
	assertSameImage(t, got, want)
	if !reflect.DeepEqual(asked, []digest.Digest{md}) {
		t.Fatalf("a hung content store was asked for %v; want the manifest only", asked)
	}
}
