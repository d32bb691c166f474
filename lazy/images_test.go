package lazy

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/remote"
)

// An image named by digest is parsed, and each of its layers described
// (the chunk table decoded), once per process: what a Prepare costs does
// not grow with the image's tables. Neither the record on disk nor the
// registry is asked again.
func TestKnownImageIsDescribedOnce(t *testing.T) {
	g := newGatedRegistry(t)
	tagged, ds := pushModel(t, g, 2)
	m, _ := newTestManager(t)
	img, err := m.reg.Resolve(t.Context(), tagged)
	if err != nil {
		t.Fatal(err)
	}
	ref := pinnedRef(img)
	first, err := m.describe(t.Context(), ref, ds[1])
	if err != nil {
		t.Fatal(err)
	}
	if first.v != byChunks || first.table == nil {
		t.Fatalf("layer verified %s, table %v; want by its chunk table", first.v, first.table)
	}
	// A record that would no longer parse, and no registry.
	pinned, err := name.NewDigest(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.store.PutMeta(imageRecordName(digest.Digest(pinned.DigestStr())), []byte("{")); err != nil {
		t.Fatal(err)
	}
	g.srv.Close()
	again, err := m.describe(t.Context(), ref, ds[1])
	if err != nil {
		t.Fatalf("describe again: %v", err)
	}
	if again.table != first.table || again.key() != first.key() {
		t.Error("the layer was described anew")
	}
	if _, err := m.describe(t.Context(), ref, ds[0]); err != nil {
		t.Errorf("describe of its other layer: %v", err)
	}
	if _, err := m.describe(t.Context(), ref, digest.FromString("not in it")); err == nil {
		t.Error("describe of a layer the image does not have")
	}
}

// One manifest pushed to two repositories is two images: each is kept
// under its own pinned reference, and its layers are fetched from its own
// repository, whichever was described first.
func TestKnownImagePerRepository(t *testing.T) {
	g := newGatedRegistry(t)
	tarb := tarOf(t, "models/f", "weights")
	layers := testutil.EncodeLayers(t, [][]byte{tarb}, testutil.FormatTar)
	refA := testutil.PushImage(t, g.addr(), "team-a/model:v1", layers)
	refB := testutil.PushImage(t, g.addr(), "team-b/model:v1", layers)
	d := digest.Digest(layers[0].Digest())
	m, _ := newTestManager(t)
	var pinned []string
	for _, ref := range []string{refA, refB} {
		img, err := m.reg.Resolve(t.Context(), ref)
		if err != nil {
			t.Fatal(err)
		}
		pinned = append(pinned, pinnedRef(img))
	}
	if a, b := pinned[0][strings.Index(pinned[0], "@"):], pinned[1][strings.Index(pinned[1], "@"):]; a != b {
		t.Fatalf("the two pushes made different manifests: %s, %s", a, b)
	}
	for i, repo := range []string{"team-a/model", "team-b/model"} {
		dl, err := m.describe(t.Context(), pinned[i], d)
		if err != nil {
			t.Fatal(err)
		}
		if dl.image != pinned[i] || !strings.HasSuffix(dl.repo, "/"+repo) {
			t.Errorf("layer of %s described as of %s, fetched from %s", pinned[i], dl.image, dl.repo)
		}
	}
}

// The images kept parsed are bounded by their records' size, the oldest
// let go first; one is always kept, and a second of one reference gives
// way to the first.
func TestKnownImagesBounded(t *testing.T) {
	var c knownImages
	image := func(i, size int) *knownImage {
		r, err := name.NewDigest(fmt.Sprintf("registry.example/m%d@%s", i, digest.FromString(fmt.Sprint(i))))
		if err != nil {
			t.Fatal(err)
		}
		return newKnownImage(r, imageRecord{}, size)
	}
	big := image(0, maxKnownBytes+1)
	if c.add(big) != big || c.get(big.pinned) != big {
		t.Fatal("an image larger than the bound is not kept")
	}
	third := maxKnownBytes / 3
	var kept []*knownImage
	for i := 1; i <= 3; i++ {
		kept = append(kept, c.add(image(i, third)))
	}
	if c.get(big.pinned) != nil {
		t.Error("the oldest image was not let go")
	}
	for _, ki := range kept {
		if c.get(ki.pinned) != ki {
			t.Errorf("%s let go, within the bound", ki.pinned)
		}
	}
	if again := c.add(image(1, third)); again != kept[0] {
		t.Error("a second image of one reference replaced the first")
	}
	c.add(image(4, third))
	if c.get(kept[0].pinned) != nil || c.get(kept[1].pinned) == nil {
		t.Error("not the oldest let go")
	}
	if c.bytes > maxKnownBytes || !strings.HasPrefix(c.order[0], "registry.example/m2@") {
		t.Errorf("%d bytes kept, order %v", c.bytes, c.order)
	}
}

// BenchmarkDescribe is what each Prepare of a layer costs the Manager
// before the layer is opened: describe it from its image's record and
// take its key. Its image's record is on disk, with the chunk table of
// a layer of 2 or 16 GiB.
func BenchmarkDescribe(b *testing.B) {
	for _, gib := range []int64{2, 16} {
		b.Run(fmt.Sprintf("%dGiB", gib), func(b *testing.B) {
			store, err := cache.Open(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { store.Close() })
			m := New(store, remote.New(), WithBackgroundFill(false))
			b.Cleanup(func() { m.Close() })
			size := gib << 30
			tb := &chunks.Table{Hash: chunks.BLAKE3, ChunkSize: chunks.DefaultChunkSize, Size: size}
			for i := range size / tb.ChunkSize {
				tb.Digests = append(tb.Digests, sha256.Sum256([]byte(fmt.Sprint(i))))
			}
			d := digest.FromString("weights")
			rec := imageRecord{Version: recordVersion, Layers: []layerRecord{{
				Digest: d, MediaType: "application/vnd.oci.image.layer.v1.tar", Size: size, DiffID: d,
				Annotations: map[string]string{tb.Key(): tb.Encode()},
			}}}
			raw, err := json.Marshal(rec)
			if err != nil {
				b.Fatal(err)
			}
			manifest := digest.FromString("manifest")
			if err := store.PutMeta(imageRecordName(manifest), raw); err != nil {
				b.Fatal(err)
			}
			ref := "registry.example/model@" + manifest.String()
			for b.Loop() {
				dl, err := m.describe(b.Context(), ref, d)
				if err != nil {
					b.Fatal(err)
				}
				if dl.key().digest != d {
					b.Fatal("wrong key")
				}
			}
		})
	}
}
