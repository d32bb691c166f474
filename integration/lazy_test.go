package integration

// End-to-end tests of the lazy layer file system (issue 2, "Tests that must
// exist and pass"): lazy.Manager mounts images from a real registry (Debian's
// docker-registry) through real FUSE and overlayfs mounts, with a counting,
// fault-injecting proxy in front where the test needs one.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/pack"
	"github.com/weightsnap/weightsnap/remote"
)

// lazyCompareOpts relaxes mtimes to seconds for eStargz, whose TOC keeps
// no sub-second times.
func lazyCompareOpts(f testutil.Format) []testutil.CompareOption {
	if f == testutil.FormatEStargz {
		return []testutil.CompareOption{testutil.WithSecondModTimes()}
	}
	return nil
}

// TestLazyFidelity: for the fixture layers in every format, the merged
// mount equals an independent extraction, and each layer mounted alone
// equals the extraction of that layer.
func TestLazyFidelity(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	layers := testutil.FixtureLayers()
	want := testutil.ExtractTree(layers)
	for _, f := range testutil.Formats {
		t.Run(string(f), func(t *testing.T) {
			dir := filepath.Join(root, string(f))
			blobs := testutil.EncodeLayers(t, layers, f)
			ref := testutil.PushImage(t, reg.Addr, "fidelity/"+string(f)+":v1", blobs)
			n := lazyStartNode(t, filepath.Join(dir, "cache"), nil)
			img := n.mountImage(t, ref, filepath.Join(dir, "image"))
			testutil.CompareTrees(t, want, lazyScan(t, img.target), lazyCompareOpts(f)...)

			for i, l := range blobs {
				t.Run("layer"+strconv.Itoa(i), func(t *testing.T) {
					mp := filepath.Join(dir, "layer", strconv.Itoa(i))
					n.mountLayer(t, mp, ref, l.Digest())
					// A layer mount shows whiteouts as 0/0 devices, which
					// ScanTree skips like an overlay hides them; opaque
					// markers are trusted.* xattrs, which it ignores.
					testutil.CompareTrees(t, testutil.ExtractTree(layers[i:i+1]), lazyScan(t, mp), lazyCompareOpts(f)...)
					// df shows the layer's content size, as for a disk.
					var st unix.Statfs_t
					if err := unix.Statfs(mp, &st); err != nil || st.Blocks == 0 {
						t.Errorf("statfs %s: %d blocks, %v; want the content's size", mp, st.Blocks, err)
					}
				})
			}
		})
	}
}

// mountLayer mounts one layer with Manager.Mount, unmounted in
// t.Cleanup.
func (n *lazyNode) mountLayer(t *testing.T, mp, ref, dgst string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), lazyGuard)
	defer cancel()
	if err := n.m.Mount(ctx, mp, ref, digest.Digest(dgst)); err != nil {
		t.Fatalf("mount layer %s of %s: %v", dgst, ref, err)
	}
	t.Cleanup(func() {
		if err := n.m.Unmount(context.Background(), mp); err != nil {
			t.Errorf("unmount layer %s: %v", mp, err)
		}
	})
}

// lazyModel is a model directory packed with pack.Build and pushed.
type lazyModel struct {
	ref     string
	big     []byte // content of bigPath
	bigPath string // path of the large file in the image
	small   map[string][]byte
}

// lazyPushModel packs a model directory with one large random file of
// bigSize bytes (its own layer) and a few small files (one layer).
func lazyPushModel(t *testing.T, root, addr, repoTag string, bigSize int, seed uint64) lazyModel {
	t.Helper()
	src := filepath.Join(root, "model-src-"+strconv.FormatUint(seed, 10))
	m := lazyModel{
		big:     lazyRandom(bigSize, seed),
		bigPath: "models/m/weights/model.safetensors",
		small: map[string][]byte{
			"models/m/config.json":    []byte(`{"hidden_size": 64}`),
			"models/m/tokenizer.json": lazyRandom(70_000, seed+1),
			"models/m/README.md":      []byte("# test model\n"),
		},
	}
	write := func(rel string, b []byte) {
		p := filepath.Join(src, strings.TrimPrefix(rel, "models/m/"))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(m.bigPath, m.big)
	for rel, b := range m.small {
		write(rel, b)
	}
	img, err := pack.Build(t.Context(), src, pack.Options{LargeFileThreshold: 1 << 20, Prefix: "models/m"})
	if err != nil {
		t.Fatalf("pack: %v", err)
	}
	m.ref = addr + "/" + repoTag
	if err := pack.Push(t.Context(), img, m.ref, true, nil); err != nil {
		t.Fatalf("push: %v", err)
	}
	return m
}

// TestLazyReads reads a packed model's 48 MiB file through fresh mounts:
// random ranges, mmap, and 16 concurrent readers.
func TestLazyReads(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	model := lazyPushModel(t, root, reg.Addr, "reads/model:v1", 48<<20, 1)
	wantSum := lazySHA256(model.big)
	size := int64(len(model.big))

	// Each subtest reads cold: its own cache and mount.
	mount := func(t *testing.T) *lazyImage {
		dir, err := os.MkdirTemp(root, "mnt-")
		if err != nil {
			t.Fatal(err)
		}
		n := lazyStartNode(t, filepath.Join(dir, "cache"), nil)
		return n.mountImage(t, model.ref, filepath.Join(dir, "image"))
	}

	t.Run("small files", func(t *testing.T) {
		img := mount(t)
		for rel, want := range model.small {
			got, err := lazyReadFile(t, img.path(rel))
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s: err %v, content equal %v", rel, err, bytes.Equal(got, want))
			}
		}
	})

	t.Run("random ranges", func(t *testing.T) {
		img := mount(t)
		p := img.path(model.bigPath)
		rng := rand.New(rand.NewPCG(7, 7))
		type rg struct{ off, n int64 }
		ranges := []rg{{0, 1}, {0, 8}, {size - 1, 1}, {size - 100, 100}, {size/2 - 3, 4 << 20}, {1<<20 - 1, 2}}
		for range 150 {
			ranges = append(ranges, rg{rng.Int64N(size), 1 + rng.Int64N(3<<20)})
		}
		for _, r := range ranges {
			buf := make([]byte, r.n)
			got, err := lazyReadAt(t, p, buf, r.off)
			end := min(r.off+r.n, size)
			if int64(got) != end-r.off || (err != nil && err != io.EOF) {
				t.Fatalf("ReadAt(%d, off %d): read %d bytes, err %v; want %d bytes", r.n, r.off, got, err, end-r.off)
			}
			if !bytes.Equal(buf[:got], model.big[r.off:end]) {
				t.Fatalf("ReadAt(%d, off %d): bytes differ from the original", r.n, r.off)
			}
		}
		// Reading at the end gives io.EOF and no bytes.
		if n, err := lazyReadAt(t, p, make([]byte, 10), size); n != 0 || err != io.EOF {
			t.Errorf("ReadAt at the end: n %d err %v, want 0, EOF", n, err)
		}
	})

	t.Run("mmap", func(t *testing.T) {
		img := mount(t)
		// The mapping is read by another process: a page fault on a FUSE
		// file served by this very process would deadlock with the Go
		// runtime stopping the world (the faulting thread cannot reach a
		// safe point while the server goroutines are stopped).
		ctx, cancel := context.WithTimeout(t.Context(), lazyGuard)
		defer cancel()
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestLazyMmapHelper$", "-test.v", "-test.timeout=80s")
		cmd.Env = append(os.Environ(), lazyMmapEnv+"="+img.path(model.bigPath))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("mmap helper: %v\n%s", err, out)
		}
		got := ""
		for _, line := range strings.Split(string(out), "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "lazy-mmap-sha256 "); ok {
				got = v
			}
		}
		if got != wantSum {
			t.Fatalf("sha256 of the file read through mmap: got %q, want %s\n%s", got, wantSum, out)
		}
	})

	t.Run("16 concurrent readers", func(t *testing.T) {
		img := mount(t)
		p := img.path(model.bigPath)
		var wg sync.WaitGroup
		sums := make([]string, 16)
		errs := make([]error, 16)
		for i := range 16 {
			wg.Go(func() {
				f, err := os.Open(p)
				if err != nil {
					errs[i] = err
					return
				}
				defer f.Close()
				h := sha256.New()
				// Readers start at different offsets and wrap around, so
				// they contend for different and for the same ranges.
				start := int64(i) * (size / 16) / 4096 * 4096
				if _, err := io.Copy(h, io.NewSectionReader(f, start, size-start)); err != nil {
					errs[i] = err
					return
				}
				if _, err := io.Copy(h, io.NewSectionReader(f, 0, start)); err != nil {
					errs[i] = err
					return
				}
				sums[i] = fmt.Sprintf("%x", h.Sum(nil))
			})
		}
		lazyGuarded(t, "16 concurrent readers", func() struct{} { wg.Wait(); return struct{}{} })
		for i := range 16 {
			start := int64(i) * (size / 16) / 4096 * 4096
			want := lazySHA256(append(bytes.Clone(model.big[start:]), model.big[:start]...))
			if errs[i] != nil || sums[i] != want {
				t.Errorf("reader %d: err %v, sha256 %s, want %s", i, errs[i], sums[i], want)
			}
		}
	})
}

// lazyMmapEnv names the file TestLazyMmapHelper maps.
const lazyMmapEnv = "WEIGHTSNAP_LAZY_MMAP"

// TestLazyMmapHelper is the other process of TestLazyReads/mmap: it maps
// the file named by $WEIGHTSNAP_LAZY_MMAP, touches pages out of order (a
// page fault each), and prints the sha256 of the whole mapping.
func TestLazyMmapHelper(t *testing.T) {
	p := os.Getenv(lazyMmapEnv)
	if p == "" {
		t.Skip("helper process of TestLazyReads/mmap, run by it")
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	size := int(info.Size())
	mm, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	defer unix.Munmap(mm)
	rng := rand.New(rand.NewPCG(9, 9))
	var sink byte
	for range 64 {
		sink ^= mm[rng.IntN(size)]
	}
	fmt.Printf("lazy-mmap-pages %d\nlazy-mmap-sha256 %s\n", sink, lazySHA256(mm))
}

// TestLazyReadWhileStreaming: a gzip layer without an index is streamed in
// the background; a file early in the layer reads correctly while the
// proxy still holds back the second half of the blob, so the stream
// provably has not finished, and everything reads correctly once it can.
func TestLazyReadWhileStreaming(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	early := []byte("early bytes, at the start of the layer\n")
	weights := lazyRandom(8<<20, 3)
	late := []byte("late bytes, after the weights\n")
	layer := lazyTar(t, lazyDir("data/"), lazyFile("data/early.txt", early),
		lazyFile("data/weights.bin", weights), lazyFile("data/late.txt", late))
	blobs := testutil.EncodeLayers(t, [][]byte{layer}, testutil.FormatGzip)
	testutil.PushImage(t, reg.Addr, "stream/model:v1", blobs)
	blob := blobs[0]
	size := int64(len(blob.Blob))

	proxy := testutil.StartProxy(t, reg.Addr, testutil.Faults{})
	// Hold the middle of the blob; its tail stays readable, for a reader
	// looking for an eStargz footer.
	release := proxy.Hold(blob.Digest(), size/2, size-(2<<20))
	t.Cleanup(release)

	cacheDir := filepath.Join(root, "cache")
	// No stall timeout: the held stream must wait, not be retried.
	n := lazyStartNode(t, cacheDir, nil, remote.WithStallTimeout(0))
	img := n.mountImage(t, proxy.Addr+"/stream/model:v1", filepath.Join(root, "image"))

	got, err := lazyReadFile(t, img.path("data/early.txt"))
	if err != nil || !bytes.Equal(got, early) {
		t.Fatalf("early file while streaming: err %v, got %q", err, got)
	}
	if sent := proxy.BlobBytes(blob.Digest()); sent >= size {
		t.Fatalf("proxy sent %d of %d blob bytes while holding: the hold did not hold", sent, size)
	}
	sealed := filepath.Join(cacheDir, "streams", "sha256", strings.TrimPrefix(blob.DiffID, "sha256:"))
	if _, err := os.Stat(sealed); err == nil {
		t.Fatalf("stream %s sealed while half of the blob is held back", sealed)
	}

	release()
	testutil.CompareTrees(t, testutil.ExtractTree([][]byte{layer}), lazyScan(t, img.target))
	got, err = lazyReadFile(t, img.path("data/late.txt"))
	if err != nil || !bytes.Equal(got, late) {
		t.Fatalf("late file after release: err %v, got %q", err, got)
	}
}

// lazySharedImages pushes two images, base first [shared, own], of format
// f and returns their references and layers.
func lazySharedImages(t *testing.T, addr string, f testutil.Format) (refA, refB string, shared testutil.LayerBlob, layersA, layersB [][]byte) {
	t.Helper()
	sharedTar := lazyTar(t, lazyDir("shared/"), lazyFile("shared/weights.bin", lazyRandom(6<<20, 11)),
		lazyFile("shared/config.json", []byte(`{"shared": true}`)))
	aTar := lazyTar(t, lazyFile("a.txt", []byte("image a\n")))
	bTar := lazyTar(t, lazyFile("b.txt", []byte("image b\n")))
	layersA, layersB = [][]byte{sharedTar, aTar}, [][]byte{sharedTar, bTar}
	blobsA := testutil.EncodeLayers(t, layersA, f)
	blobsB := testutil.EncodeLayers(t, layersB, f)
	refA = testutil.PushImage(t, addr, "shared/a-"+string(f)+":v1", blobsA)
	refB = testutil.PushImage(t, addr, "shared/b-"+string(f)+":v1", blobsB)
	return refA, refB, blobsA[0], layersA, layersB
}

// TestLazyCacheSharedLayer: two images sharing a layer, mounted together,
// get that layer's bytes from the registry once.
func TestLazyCacheSharedLayer(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	proxy := testutil.StartProxy(t, reg.Addr, testutil.Faults{})
	for _, f := range testutil.Formats {
		t.Run(string(f), func(t *testing.T) {
			refA, refB, shared, layersA, layersB := lazySharedImages(t, reg.Addr, f)
			proxied := func(ref string) string { return proxy.Addr + strings.TrimPrefix(ref, reg.Addr) }
			dir := filepath.Join(root, string(f))
			n := lazyStartNode(t, filepath.Join(dir, "cache"), nil)
			proxy.Reset()
			a := n.mountImage(t, proxied(refA), filepath.Join(dir, "a"))
			b := n.mountImage(t, proxied(refB), filepath.Join(dir, "b"))

			testutil.CompareTrees(t, testutil.ExtractTree(layersA), lazyScan(t, a.target), lazyCompareOpts(f)...)
			afterA := proxy.BlobBytes(shared.Digest())
			testutil.CompareTrees(t, testutil.ExtractTree(layersB), lazyScan(t, b.target), lazyCompareOpts(f)...)
			afterB := proxy.BlobBytes(shared.Digest())
			size := int64(len(shared.Blob))
			t.Logf("shared layer (%d bytes): %d bytes served after reading image A, %d after image B", size, afterA, afterB)
			if afterB != afterA {
				t.Errorf("reading image B fetched %d more bytes of the shared layer, want 0", afterB-afterA)
			}
			if afterB != size {
				t.Errorf("registry served %d bytes of the shared layer, want its size %d (once, all of it)", afterB, size)
			}
		})
	}
}

// lazyWaitSealed waits until the streams of gzip and zstd layers are
// sealed in the cache: only a sealed stream survives a restart, and
// sealing follows the last read by a moment the Manager does not report.
func lazyWaitSealed(t *testing.T, cacheDir string, f testutil.Format, blobs []testutil.LayerBlob) {
	t.Helper()
	if f != testutil.FormatGzip && f != testutil.FormatZstd {
		return
	}
	for _, b := range blobs {
		p := filepath.Join(cacheDir, "streams", "sha256", strings.TrimPrefix(b.Digest(), "sha256:"))
		lazyWaitFor(t, "stream "+p+" sealed", func() bool { _, err := os.Stat(p); return err == nil })
	}
}

// TestLazyCacheRestart: an image read once, then mounted again by a new
// Manager over a new Store on the same cache directory, reads no layer
// byte from the registry; with the cache's data files corrupted while no
// process had them open, reads still return the right bytes, refetched.
func TestLazyCacheRestart(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	proxy := testutil.StartProxy(t, reg.Addr, testutil.Faults{})
	layers := testutil.FixtureLayers()
	want := testutil.ExtractTree(layers)
	for _, f := range testutil.Formats {
		t.Run(string(f), func(t *testing.T) {
			blobs := testutil.EncodeLayers(t, layers, f)
			testutil.PushImage(t, reg.Addr, "restart/"+string(f)+":v1", blobs)
			ref := proxy.Addr + "/restart/" + string(f) + ":v1"
			dir := filepath.Join(root, string(f))
			cacheDir := filepath.Join(dir, "cache")

			first := lazyStartNode(t, cacheDir, nil)
			img := first.mountImage(t, ref, filepath.Join(dir, "image"))
			testutil.CompareTrees(t, want, lazyScan(t, img.target), lazyCompareOpts(f)...)
			lazyWaitSealed(t, cacheDir, f, blobs)
			if err := img.unmount(); err != nil {
				t.Fatalf("unmount: %v", err)
			}
			first.close()

			proxy.Reset()
			second := lazyStartNode(t, cacheDir, nil)
			img = second.mountImage(t, ref, filepath.Join(dir, "image"))
			testutil.CompareTrees(t, want, lazyScan(t, img.target), lazyCompareOpts(f)...)
			if got := lazyLayerBytes(proxy, blobs); got != 0 {
				t.Errorf("after a restart the registry served %d layer bytes, want 0", got)
			}
			if err := img.unmount(); err != nil {
				t.Fatalf("unmount: %v", err)
			}
			second.close()

			corrupted := lazyCorruptCache(t, cacheDir)
			t.Logf("corrupted %d cache files: %v", len(corrupted), corrupted)
			proxy.Reset()
			third := lazyStartNode(t, cacheDir, nil)
			img = third.mountImage(t, ref, filepath.Join(dir, "image"))
			testutil.CompareTrees(t, want, lazyScan(t, img.target), lazyCompareOpts(f)...)
			if got := lazyLayerBytes(proxy, blobs); got == 0 {
				t.Errorf("after corrupting the cache the registry served no layer bytes: nothing was refetched")
			}
		})
	}
}

// lazyCorruptCache flips one byte in every 16 KiB of every data file of
// the cache at dir (blob data and sealed streams; presence records and
// metadata are left alone), as bit rot or a stray write would, and returns
// the files changed.
func lazyCorruptCache(t *testing.T, dir string) []string {
	t.Helper()
	var changed []string
	for _, sub := range []string{"blobs", "streams"} {
		err := filepath.WalkDir(filepath.Join(dir, sub), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if d.Name() == "tmp" {
					return filepath.SkipDir
				}
				return nil
			}
			if strings.HasSuffix(p, ".rec") {
				return nil
			}
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			info, err := f.Stat()
			if err != nil {
				return err
			}
			b := make([]byte, 1)
			for off := int64(100); off < info.Size(); off += 16 << 10 {
				if _, err := f.ReadAt(b, off); err != nil {
					return err
				}
				b[0] ^= 0xff
				if _, err := f.WriteAt(b, off); err != nil {
					return err
				}
			}
			rel, _ := filepath.Rel(dir, p)
			changed = append(changed, rel)
			return nil
		})
		if err != nil {
			t.Fatalf("corrupt cache: %v", err)
		}
	}
	if len(changed) == 0 {
		t.Fatalf("no cache data files found under %s", dir)
	}
	return changed
}

// TestLazyCacheSizeBound: with a bound smaller than two images, reading the
// second after unmounting the first keeps the cache within the bound.
func TestLazyCacheSizeBound(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	const bound = 9 << 20
	var refs []string
	var trees []testutil.Tree
	for i := range 2 {
		l := lazyTar(t, lazyDir("w/"), lazyFile("w/weights.bin", lazyRandom(6<<20, uint64(20+i))))
		blobs := testutil.EncodeLayers(t, [][]byte{l}, testutil.FormatTar)
		refs = append(refs, testutil.PushImage(t, reg.Addr, fmt.Sprintf("bound/m%d:v1", i), blobs))
		trees = append(trees, testutil.ExtractTree([][]byte{l}))
	}
	n := lazyStartNode(t, filepath.Join(root, "cache"), []cache.Option{cache.WithMaxBytes(bound)})

	first := n.mountImage(t, refs[0], filepath.Join(root, "first"))
	testutil.CompareTrees(t, trees[0], lazyScan(t, first.target))
	t.Logf("usage after the first image: %d", n.store.Usage())
	if err := first.unmount(); err != nil {
		t.Fatalf("unmount: %v", err)
	}

	second := n.mountImage(t, refs[1], filepath.Join(root, "second"))
	testutil.CompareTrees(t, trees[1], lazyScan(t, second.target))
	// Eviction runs in the goroutine that stored the last bytes, which
	// may be a read-ahead worker still finishing after the read returned.
	lazyWaitFor(t, "the cache to come back under its bound", func() bool { return n.store.Usage() <= bound })
	usage := n.store.Usage()
	t.Logf("usage after the second image: %d (bound %d)", usage, bound)
	if usage < 6<<20 {
		t.Errorf("cache usage %d is less than the mounted image's data: the bound evicted data in use, or nothing is cached", usage)
	}
}
