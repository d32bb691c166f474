package integration

// Helpers of the lazy file system tests (lazy_test.go): a Manager over its
// own cache, image mounts that are always taken down, and readers that
// cannot hang a test on a stuck FUSE request.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/remote"
)

// lazyGuard bounds any single blocking step of these tests (a mount, a
// tree walk, a read): a lazy file system that hangs must fail the test, not
// stall the suite until go test's global timeout.
const lazyGuard = 90 * time.Second

// lazyStallTimeout is the registry client's stall timeout: short, so that
// the proxy's stalls cost little.
const lazyStallTimeout = 2 * time.Second

// lazyRemoteOptions are the registry options of every Manager here:
// plain HTTP, a short stall timeout and quick retries.
func lazyRemoteOptions() []remote.Option {
	return []remote.Option{
		remote.WithPlainHTTP(true),
		remote.WithStallTimeout(lazyStallTimeout),
		remote.WithRetry(10, 5*time.Millisecond),
	}
}

// lazyRoot returns a fresh temporary directory for one test's mounts and
// caches. Every mount still under it when the test ends is detached
// (umount -l) before the directory is removed, whatever else failed.
func lazyRoot(t *testing.T) string {
	t.Helper()
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	t.Cleanup(func() {
		for _, mp := range mountsUnder(t, dir) {
			t.Errorf("mount left behind at %s: detaching it", mp)
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				t.Errorf("detach %s: %v", mp, err)
			}
		}
	})
	return dir
}

// lazyNode is a Manager over its own Store, as one weightsnap process on a
// node would run it.
type lazyNode struct {
	t        *testing.T
	cacheDir string
	store    *cache.Store
	m        *lazy.Manager
	once     sync.Once
}

// lazyStartNode opens the cache at cacheDir and a Manager over it with the
// default configuration; both are closed in t.Cleanup unless closed before
// (a "restart").
func lazyStartNode(t *testing.T, cacheDir string, copt []cache.Option, extra ...remote.Option) *lazyNode {
	t.Helper()
	return lazyStartNodeWithRegistry(t, cacheDir, copt, remote.New(append(lazyRemoteOptions(), extra...)...))
}

// lazyStartNodeWith is lazyStartNode with Manager options.
func lazyStartNodeWith(t *testing.T, cacheDir string, copt []cache.Option, opts ...lazy.Option) *lazyNode {
	t.Helper()
	return lazyStartNodeWithRegistry(t, cacheDir, copt, remote.New(lazyRemoteOptions()...), opts...)
}

func lazyStartNodeWithRegistry(t *testing.T, cacheDir string, copt []cache.Option, reg *remote.Client, opts ...lazy.Option) *lazyNode {
	t.Helper()
	store, err := cache.Open(cacheDir, copt...)
	if err != nil {
		t.Fatalf("open cache %s: %v", cacheDir, err)
	}
	n := &lazyNode{t: t, cacheDir: cacheDir, store: store, m: lazy.New(store, reg, opts...)}
	t.Cleanup(n.close)
	return n
}

// close unmounts everything the Manager mounted and closes the cache.
func (n *lazyNode) close() {
	n.once.Do(func() {
		if err := n.m.Close(); err != nil {
			n.t.Errorf("close manager: %v", err)
		}
		if err := n.store.Close(); err != nil {
			n.t.Errorf("close cache: %v", err)
		}
	})
}

// lazyImage is a mounted image.
type lazyImage struct {
	target string
	im     *lazy.ImageMount
	once   sync.Once
	err    error
}

// mountImage mounts ref at dir/merged with its layers under dir/layers; the
// mount is taken down in t.Cleanup unless unmounted before.
func (n *lazyNode) mountImage(t *testing.T, ref, dir string) *lazyImage {
	t.Helper()
	img, err := n.tryMountImage(t, ref, dir)
	if err != nil {
		t.Fatalf("mount image %s: %v", ref, err)
	}
	return img
}

// tryMountImage is mountImage returning the error.
func (n *lazyNode) tryMountImage(t *testing.T, ref, dir string) (*lazyImage, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), lazyGuard)
	defer cancel()
	target := filepath.Join(dir, "merged")
	im, err := n.m.MountImage(ctx, ref, target, filepath.Join(dir, "layers"))
	if err != nil {
		return nil, err
	}
	img := &lazyImage{target: target, im: im}
	t.Cleanup(func() {
		if err := img.unmount(); err != nil {
			t.Errorf("unmount image %s: %v", ref, err)
		}
	})
	return img, nil
}

func (img *lazyImage) unmount() error {
	img.once.Do(func() { img.err = img.im.Unmount() })
	return img.err
}

// path returns the path of rel inside the merged tree.
func (img *lazyImage) path(rel string) string { return filepath.Join(img.target, rel) }

// lazyGuarded runs f in a goroutine and fails the test if it has not
// returned within lazyGuard: a FUSE request stuck in the kernel cannot be
// interrupted, so the test reports it instead of hanging.
func lazyGuarded[T any](t *testing.T, what string, f func() T) T {
	t.Helper()
	done := make(chan T, 1)
	go func() { done <- f() }()
	select {
	case v := <-done:
		return v
	case <-time.After(lazyGuard):
		t.Fatalf("%s did not return within %v", what, lazyGuard)
		panic("unreachable")
	}
}

// lazyScan is testutil.ScanTree under lazyGuarded.
func lazyScan(t *testing.T, root string) testutil.Tree {
	t.Helper()
	return lazyGuarded(t, "scanning "+root, func() testutil.Tree { return testutil.ScanTree(t, root) })
}

// lazyReadFile reads a whole file under lazyGuarded.
func lazyReadFile(t *testing.T, p string) ([]byte, error) {
	t.Helper()
	type res struct {
		b   []byte
		err error
	}
	r := lazyGuarded(t, "reading "+p, func() res { b, err := os.ReadFile(p); return res{b, err} })
	return r.b, r.err
}

// lazyReadAt reads len(p) bytes at off from the file at path, under
// lazyGuarded, returning what was read before any error.
func lazyReadAt(t *testing.T, path string, p []byte, off int64) (int, error) {
	t.Helper()
	type res struct {
		n   int
		err error
	}
	r := lazyGuarded(t, "reading "+path, func() res {
		f, err := os.Open(path)
		if err != nil {
			return res{0, err}
		}
		defer f.Close()
		n, err := f.ReadAt(p, off)
		return res{n, err}
	})
	return r.n, r.err
}

// lazyRandom returns n deterministic pseudo-random bytes.
func lazyRandom(n int, seed uint64) []byte {
	b := make([]byte, n)
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	_, _ = rand.NewChaCha8(key).Read(b)
	return b
}

func lazySHA256(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// lazyTarEntry is one entry of a hand-made tar layer.
type lazyTarEntry struct {
	hdr  tar.Header
	body []byte
}

// lazyTar writes entries as a tar. Regular files get their Size from body
// unless hdr.Size is set; directories default to mode 0755, files to 0644.
func lazyTar(t testing.TB, entries ...lazyTarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(e.body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.ModTime.IsZero() {
			h.ModTime = time.Unix(1700000000, 0)
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatalf("tar body %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// lazyFile and lazyDir are shorthands for lazyTar entries.
func lazyFile(name string, body []byte) lazyTarEntry {
	return lazyTarEntry{hdr: tar.Header{Name: name}, body: body}
}

func lazyDir(name string) lazyTarEntry {
	return lazyTarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir}}
}

// lazyBlobDataPath returns where Debian's registry (the distribution
// filesystem driver) keeps the bytes of blob digest under its root.
func lazyBlobDataPath(root, digest string) string {
	alg, hexd, _ := strings.Cut(digest, ":")
	return filepath.Join(root, "docker", "registry", "v2", "blobs", alg, hexd[:2], hexd, "data")
}

// lazyLayerBytes sums proxy blob bytes over the given layers (the config
// blob, which every resolve fetches, is left out).
func lazyLayerBytes(p *testutil.Proxy, layers []testutil.LayerBlob) int64 {
	var n int64
	for _, l := range layers {
		n += p.BlobBytes(l.Digest())
	}
	return n
}

// lazySnapshot records every path below dir outside the skipped
// directories, with the content hash of regular files, so a test can prove
// that nothing outside its mounts was created, changed or removed.
func lazySnapshot(t *testing.T, dir string, skip ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		for _, s := range skip {
			if p == s {
				return filepath.SkipDir
			}
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		v := info.Mode().String()
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			v += " " + lazySHA256(b)
		}
		out[p] = v
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot %s: %v", dir, err)
	}
	return out
}

// lazyWaitFor polls cond until it holds, failing the test after lazyGuard.
// It is for conditions the code under test offers no event for (a stream
// sealed in the background), never a stand-in for a fixed sleep.
func lazyWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(lazyGuard)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lazyResolve resolves ref from the registry, as the Manager would.
func lazyResolve(t testing.TB, ref string) *remote.Image {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), lazyGuard)
	defer cancel()
	img, err := remote.New(lazyRemoteOptions()...).Resolve(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// lazyIsEIO reports whether err is an EIO from the file system.
func lazyIsEIO(err error) bool { return errors.Is(err, unix.EIO) }
