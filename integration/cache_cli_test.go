package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/testutil"
)

// TestCacheCLI runs `weightsnap cache` on a cache filled through a lazy
// mount: list shows the layer with its image, whole and verified once it
// was read; prune refuses while a Store holds the cache and removes only
// what no image names once none does; verify finds a corrupted data file
// and removes the blob.
func TestCacheCLI(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	bin := weightsnapBinary(t)
	cacheDir := filepath.Join(root, "cache")

	weights := lazyRandom(6<<20+123, 11) // large enough for a segment of its own
	tarLayer := lazyTar(t, lazyDir("models"), lazyFile("models/config.json", []byte(`{"a":1}`)), lazyFile("models/w.bin", weights))
	blobs := testutil.EncodeLayers(t, [][]byte{tarLayer}, testutil.FormatTar)
	ref, manifest := testutil.PushImageWithDigest(t, reg.Addr, "cachecli/model:v1", blobs)
	layer := digest.Digest(blobs[0].Digest())

	n := lazyStartNode(t, cacheDir, nil)
	img := n.mountImage(t, ref, filepath.Join(root, "image"))
	got, err := lazyReadFile(t, img.path("models/w.bin"))
	if err != nil || lazySHA256(got) != lazySHA256(weights) {
		t.Fatalf("read through the mount: %d bytes, %v", len(got), err)
	}
	// The blob's records say it is whole and verified once the rest of
	// it (tar headers, padding) came in by background fill and the
	// records were flushed.
	lazyWaitFor(t, "the layer to be complete on disk", func() bool {
		es, _ := cache.Inspect(cacheDir)
		return len(es) == 1 && es[0].Key == layer && es[0].Complete
	})

	run := func(args ...string) (string, error) {
		t.Helper()
		out, err := exec.Command(bin, append([]string{"cache", "--cache-dir", cacheDir}, args...)...).CombinedOutput()
		return string(out), err
	}
	// list and usage read the directory: they work while the node runs.
	out, err := run("list")
	if err != nil {
		t.Fatalf("cache list: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("cache list printed %d lines, want a header and the layer:\n%s", len(lines), out)
	}
	for _, want := range []string{"blob", layer.String(), "100.0%", "yes", manifest} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("cache list: %q lacks %q", lines[1], want)
		}
	}
	if out, err := run("usage", "--max-bytes", "1GiB"); err != nil || !strings.Contains(out, "in 1 blobs and 0 streams") || !strings.Contains(out, "1.00 GiB") {
		t.Errorf("cache usage: %v\n%s", err, out)
	}
	t.Logf("weightsnap cache list:\n%s", out)

	// prune and verify refuse while the node's Store holds the lock.
	for _, sub := range []string{"prune", "verify"} {
		out, err := run(sub)
		if err == nil || !strings.Contains(out, "in use") {
			t.Errorf("cache %s while the node runs: %v\n%s; want a refusal saying the cache is in use", sub, err, out)
		}
	}
	if err := img.unmount(); err != nil {
		t.Fatal(err)
	}
	n.close()

	// Data no image names, as an image whose record is gone would leave.
	stray := lazyRandom(2<<20, 12)
	strayKey := digest.FromBytes(stray)
	s, err := cache.Open(cacheDir)
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.Blob(strayKey, int64(len(stray)), func(_ context.Context, p []byte, off int64) error {
		copy(p, stray[off:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Fetch(t.Context(), 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	h.Close()
	s.Close()

	out, err = run("prune")
	if err != nil {
		t.Fatalf("cache prune: %v\n%s", err, out)
	}
	t.Logf("weightsnap cache prune:\n%s", out)
	if !strings.Contains(out, "removed blob "+strayKey.String()) || strings.Contains(out, "removed blob "+layer.String()) {
		t.Errorf("cache prune removed the wrong blobs:\n%s", out)
	}
	if es, _ := cache.Inspect(cacheDir); len(es) != 1 || es[0].Key != layer {
		t.Errorf("after prune the cache holds %+v, want the layer only", es)
	}

	out, err = run("verify")
	if err != nil || !strings.Contains(out, "ok        "+layer.String()) {
		t.Fatalf("cache verify of an intact cache: %v\n%s", err, out)
	}

	// One flipped byte in the data file: the first tar header, which is
	// not in the weights' segment.
	data := filepath.Join(cacheDir, "blobs", "sha256", layer.Encoded()+".data")
	f, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := f.ReadAt(b[:], 0); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x55
	if _, err := f.WriteAt(b[:], 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err = run("verify", layer.String())
	t.Logf("weightsnap cache verify of a corrupted blob:\n%s", out)
	if err == nil || !strings.Contains(out, "mismatch  "+layer.String()) || !strings.Contains(out, "removed") {
		t.Errorf("cache verify of a corrupted blob: %v\n%s", err, out)
	}
	if es, _ := cache.Inspect(cacheDir); len(es) != 0 {
		t.Errorf("after verify found the corruption the cache holds %+v", es)
	}
}
