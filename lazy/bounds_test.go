package lazy

// A manifest's claims about a blob are checked before anything is allocated.

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	ggcrremote "github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/layer"
)

// A manifest that claims a layer size its blob does not have is refused
// before the cache allocates anything for it (a sparse file of a
// petabyte mounts on XFS or tmpfs).
func TestManifestSizeLieIsRefused(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	for name, size := range map[string]int64{"petabyte": 1 << 50, "one more": -1} {
		t.Run(name, func(t *testing.T) {
			lying := pushWithLayerSize(t, ref, g.addr()+"/liar:"+strings.ReplaceAll(name, " ", "-"), size)
			m, fake := newTestManager(t)
			err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), lying, ds[0])
			if !errors.Is(err, layer.ErrCorrupt) {
				t.Fatalf("Mount: %v, want layer.ErrCorrupt", err)
			}
			if len(fake.live()) != 0 || m.store.Usage() != 0 {
				t.Fatalf("a refused layer left %d mounts, %d cached bytes", len(fake.live()), m.store.Usage())
			}
		})
	}
}

// pushWithLayerSize pushes the image ref with its first layer's size in
// the manifest replaced (-1: one more than the real size) as dst.
func pushWithLayerSize(t *testing.T, ref, dst string, size int64) string {
	t.Helper()
	r, _ := name.ParseReference(ref, name.Insecure)
	desc, err := ggcrremote.Get(r)
	if err != nil {
		t.Fatal(err)
	}
	var mf map[string]any
	if err := json.Unmarshal(desc.Manifest, &mf); err != nil {
		t.Fatal(err)
	}
	l := mf["layers"].([]any)[0].(map[string]any)
	if size < 0 {
		size = int64(l["size"].(float64)) + 1
	}
	l["size"] = size
	raw, _ := json.Marshal(mf)
	d, _ := name.ParseReference(dst, name.Insecure)
	if err := ggcrremote.Put(d, rawManifest{raw, desc.MediaType}); err != nil {
		t.Fatal(err)
	}
	return dst
}

type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.b, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mt, nil }

// A layer larger than the cache can ever hold is not served lazily (it
// could never be cached whole, nor verified), and nothing is allocated
// for it: the caller downloads it its own way.
func TestLayerLargerThanTheCacheIsRefused(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManagerOn(t, t.TempDir(), []cache.Option{cache.WithMaxBytes(1 << 10)})
	err := m.Mount(t.Context(), filepath.Join(t.TempDir(), "mp"), ref, ds[0])
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Mount: %v, want ErrUnsupported", err)
	}
	if len(fake.live()) != 0 || m.store.Usage() != 0 {
		t.Fatalf("a refused layer left %d mounts, %d cached bytes", len(fake.live()), m.store.Usage())
	}
}
