package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/pack"
	"github.com/weightsnap/weightsnap/remote"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// warmLayers returns the layer digests of ref.
func warmLayers(t testing.TB, ref string) []digest.Digest {
	t.Helper()
	var ds []digest.Digest
	for _, l := range lazyResolve(t, ref).Layers {
		ds = append(ds, l.Digest)
	}
	return ds
}

// openIs reports whether the Manager has exactly the layers ds open.
func openIs(m *lazy.Manager, ds []digest.Digest) bool {
	open := m.OpenLayers()
	slices.Sort(open)
	want := slices.Clone(ds)
	slices.Sort(want)
	return slices.Equal(open, want)
}

// TestLazyWarm: Warm opens an image's layers before any mount asks for
// them, from their manifest (no blob byte read); the mounts then use
// the opened layers and read right, and the layers are closed once the
// hold has passed and nothing mounts them, or once their mounts are gone.
// Close lets go of held layers at once.
func TestLazyWarm(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	proxy := testutil.StartProxy(t, reg.URL(), testutil.Faults{})
	model := lazyPushModel(t, root, reg.Addr, "warm/model:v1", 12<<20, 21)
	ref := proxy.Addr + "/warm/model:v1"
	layers := warmLayers(t, ref)
	if len(layers) < 2 {
		t.Fatalf("the test model has %d layers, want several", len(layers))
	}
	dir, err := os.MkdirTemp(root, "warm-")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("mounts use warmed layers; Close lets go", func(t *testing.T) {
		n := lazyStartNodeWith(t, filepath.Join(dir, "cache1"), nil, lazy.WithWarmHold(time.Hour), lazy.WithBackgroundFill(false))
		proxy.Reset()
		n.m.Warm(t.Context(), ref, layers)
		lazyWaitFor(t, "every layer opened", func() bool { return openIs(n.m, layers) })
		// pack annotates every layer with its tar headers: opened from
		// them, with the check against the blob left to the first read,
		// a warmed layer has read nothing of its blob.
		for _, d := range layers {
			if n := proxy.BlobBytes(d.String()); n != 0 {
				t.Errorf("warming layer %s read %d bytes of its blob", d, n)
			}
		}
		img := n.mountImage(t, ref, filepath.Join(dir, "image1"))
		got, err := lazyReadFile(t, img.path(model.bigPath))
		if err != nil || !bytes.Equal(got, model.big) {
			t.Fatalf("read %s: err %v, content equal %v", model.bigPath, err, bytes.Equal(got, model.big))
		}
		if err := img.unmount(); err != nil {
			t.Fatal(err)
		}
		// Each mount ended Warm's hold of its layer: unmounted (containerd
		// removed the image), they close and stop filling.
		lazyWaitFor(t, "the unmounted layers to close", func() bool { return len(n.m.OpenLayers()) == 0 })
		n.m.Warm(t.Context(), ref, layers)
		lazyWaitFor(t, "every layer opened again", func() bool { return openIs(n.m, layers) })
		lazyGuarded(t, "close with held layers", func() struct{} { n.close(); return struct{}{} })
		if open := n.m.OpenLayers(); len(open) != 0 {
			t.Fatalf("layers still open after Close: %v", open)
		}
	})

	t.Run("more layers than open at once", func(t *testing.T) {
		// Holding a layer must not keep the next ones from opening.
		pushShardedModel(t, root, reg.Addr+"/warm/sharded:v1", 7)
		ref := reg.Addr + "/warm/sharded:v1"
		layers := warmLayers(t, ref)
		n := lazyStartNodeWith(t, filepath.Join(dir, "cache3"), nil, lazy.WithWarmHold(time.Hour), lazy.WithBackgroundFill(false))
		n.m.Warm(t.Context(), ref, layers)
		lazyWaitFor(t, "every layer opened", func() bool { return openIs(n.m, layers) })
	})

	t.Run("held layers close after the hold", func(t *testing.T) {
		// Each layer is open for the whole hold, so the poll sees every
		// one of them open at some point; nothing opens them again.
		n := lazyStartNodeWith(t, filepath.Join(dir, "cache2"), nil, lazy.WithWarmHold(2*time.Second), lazy.WithBackgroundFill(false))
		n.m.Warm(t.Context(), ref, layers)
		seen := map[digest.Digest]bool{}
		lazyWaitFor(t, "every layer opened", func() bool {
			for _, d := range n.m.OpenLayers() {
				seen[d] = true
			}
			return len(seen) == len(layers)
		})
		lazyWaitFor(t, "the held layers to close", func() bool { return len(n.m.OpenLayers()) == 0 })
	})
}

// pushShardedModel pushes to ref a model of a config file and shards
// files of 8 MiB, each in a layer of its own.
func pushShardedModel(t testing.TB, root, ref string, shards int) v1.Image {
	t.Helper()
	src := filepath.Join(root, "model-"+strconv.Itoa(shards))
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"config.json": []byte(`{"hidden_size": 64}`)}
	for i := range shards {
		files[fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, shards)] = lazyRandom(8<<20, uint64(40+i))
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(src, name), body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img, err := pack.Build(t.Context(), src, pack.Options{LargeFileThreshold: 1 << 20, Prefix: "models/m"})
	if err != nil {
		t.Fatal(err)
	}
	if err := pack.Push(t.Context(), img, ref, true, nil); err != nil {
		t.Fatal(err)
	}
	return img
}

// BenchmarkLayerMounts mounts the five layers of a model one after
// another, as containerd's Prepares come, through a proxy that adds 20 ms
// to every registry request (a registry across a network): without the
// image's layer list, and with it (Warm, as containerd's cri.image-layers
// label gives it). Every iteration starts from an empty cache. Run with
// go test ./integration -run '^$' -bench BenchmarkLayerMounts -benchtime 5x
func BenchmarkLayerMounts(b *testing.B) {
	testutil.RequireFUSE(b)
	root := b.TempDir()
	reg := testutil.StartRegistry(b)
	proxy := testutil.StartProxy(b, reg.URL(), testutil.Faults{Latency: 20 * time.Millisecond})
	pushShardedModel(b, root, reg.Addr+"/bench/layers:v1", 4)
	ref := proxy.Addr + "/bench/layers:v1"
	layers := warmLayers(b, ref)
	b.Logf("%d layers, %v added to every registry request", len(layers), 20*time.Millisecond)

	for _, warm := range []bool{false, true} {
		b.Run(fmt.Sprintf("warm=%v", warm), func(b *testing.B) {
			for i := range b.N {
				b.StopTimer()
				benchMountLayers(b, filepath.Join(root, fmt.Sprintf("run-%v-%d", warm, i)), ref, layers, warm)
			}
		})
	}
}

// BenchmarkLayerMountsTarHeaders mounts the five layers of a model one
// after another, as containerd's Prepares come, named by the manifest's
// digest as containerd names them, with the tar header annotation pack
// writes and with it stripped from the manifest (each layer's headers are
// then read from the blob: two range reads), straight from the registry
// and through a proxy that adds 20 ms to every request. A fresh cache for
// each run.
//
//	go test ./integration -run '^$' -bench BenchmarkLayerMountsTarHeaders -benchtime 5x
func BenchmarkLayerMountsTarHeaders(b *testing.B) {
	testutil.RequireFUSE(b)
	root := b.TempDir()
	reg := testutil.StartRegistry(b)
	proxy := testutil.StartProxy(b, reg.URL(), testutil.Faults{})
	img := pushShardedModel(b, root, reg.Addr+"/bench/headers:v1", 4)
	stripped, err := withoutAnnotation(img, tarheaders.Annotation)
	if err != nil {
		b.Fatal(err)
	}
	if err := pack.Push(b.Context(), stripped, reg.Addr+"/bench/headers:stripped", true, nil); err != nil {
		b.Fatal(err)
	}
	for _, latency := range []time.Duration{0, 20 * time.Millisecond} {
		for _, headers := range []bool{false, true} {
			tag := map[bool]string{false: "stripped", true: "v1"}[headers]
			resolved := lazyResolve(b, proxy.Addr+"/bench/headers:"+tag)
			ref := proxy.Addr + "/bench/headers@" + resolved.Digest.String()
			b.Run(fmt.Sprintf("latency=%v/headers=%v", latency, headers), func(b *testing.B) {
				if err := proxy.SetFaults(testutil.Faults{Latency: latency}); err != nil {
					b.Fatal(err)
				}
				for range b.N {
					b.StopTimer()
					dir, err := os.MkdirTemp(root, "run-")
					if err != nil {
						b.Fatal(err)
					}
					var ds []digest.Digest
					for _, l := range resolved.Layers {
						ds = append(ds, l.Digest)
					}
					benchMountLayers(b, dir, ref, ds, false)
				}
			})
		}
	}
}

// benchMountLayers mounts the layers ds of ref in turn under dir, with a
// new cache and Manager (warm: Warm told of all but the first layer
// first), timing the mounts and nothing else.
func benchMountLayers(b *testing.B, dir, ref string, ds []digest.Digest, warm bool) {
	store, err := cache.Open(filepath.Join(dir, "cache"))
	if err != nil {
		b.Fatal(err)
	}
	m := lazy.New(store, remote.New(lazyRemoteOptions()...), lazy.WithBackgroundFill(false))
	b.StartTimer()
	if warm {
		m.Warm(b.Context(), ref, ds[1:])
	}
	for j, d := range ds {
		if err := m.Mount(b.Context(), filepath.Join(dir, fmt.Sprintf("layer-%d", j)), ref, d); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if err := m.Close(); err != nil {
		b.Error(err)
	}
	if err := store.Close(); err != nil {
		b.Error(err)
	}
}
