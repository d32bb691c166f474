package integration

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/chunks"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/metrics"
)

// daemonReadBytes counts the bytes reads through the daemon took from the
// cache; reads the kernel passes through never add to it.
func daemonReadBytes() float64 {
	return promtest.ToFloat64(metrics.CacheBytes.WithLabelValues("hit")) +
		promtest.ToFloat64(metrics.CacheBytes.WithLabelValues("miss"))
}

func passthroughOpens() float64 {
	return promtest.ToFloat64(metrics.FileOpens.WithLabelValues("passthrough"))
}

// passthroughCompleteLayer makes the largest layer of ref cached whole and
// verified, every chunk checked, through the node's own cache.
func passthroughCompleteLayer(t *testing.T, n *lazyNode, ref string) {
	t.Helper()
	img := lazyResolve(t, ref)
	ctx, cancel := context.WithTimeout(t.Context(), lazyGuard)
	defer cancel()
	big := img.Layers[0]
	for _, l := range img.Layers {
		if l.Size > big.Size {
			big = l
		}
	}
	fetch := func(ctx context.Context, p []byte, off int64) error {
		_, err := big.Blob.ReadAt(ctx, p, off)
		if err == io.EOF && off+int64(len(p)) >= big.Size {
			err = nil
		}
		return err
	}
	var opts []cache.BlobOption
	if tab, err := chunks.Find(big.Annotations, big.Size); err == nil {
		opts = append(opts, cache.WithTable(tab)) // as the layer opened it
	}
	b, err := n.store.Blob(big.Digest, big.Size, fetch, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Verify(ctx); err != nil {
		t.Fatalf("verify layer %s: %v", big.Digest, err)
	}
	if err := b.Check(ctx, 0, big.Size); err != nil {
		t.Fatalf("check layer %s: %v", big.Digest, err)
	}
}

// TestLazyPassthrough: once its layer is cached whole and verified, a large
// file opened anew is passed through to its cache file (through the
// image's overlayfs too): the bytes are right and the daemon serves none
// of its reads, after a restart as well. A file still open in FUSE mode is
// opened in FUSE mode again, which the kernel requires.
func TestLazyPassthrough(t *testing.T) {
	root := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	model := lazyPushModel(t, root, reg.Addr, "passthrough/model:v1", 24<<20, 11)
	dir, err := os.MkdirTemp(root, "pt-")
	if err != nil {
		t.Fatal(err)
	}
	cacheDir := filepath.Join(dir, "cache")
	// Files other tests left open in FUSE mode count too: only this
	// test's closes are waited for.
	openBefore := promtest.ToFloat64(metrics.OpenFiles.WithLabelValues("fuse"))
	n := lazyStartNode(t, cacheDir, nil)
	img := n.mountImage(t, model.ref, filepath.Join(dir, "image"))
	p := img.path(model.bigPath)
	size := int64(len(model.big))

	// Opened cold: served by the daemon, and still open below.
	early, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	readRange := func(f *os.File, off, n int64) {
		t.Helper()
		buf := make([]byte, n)
		got := lazyGuarded(t, "read", func() error { _, err := f.ReadAt(buf, off); return err })
		if got != nil || !bytes.Equal(buf, model.big[off:off+n]) {
			t.Fatalf("%s at %d+%d: err %v, or bytes differ", f.Name(), off, n, got)
		}
	}
	readRange(early, 0, 4096)

	passthroughCompleteLayer(t, n, model.ref)

	opens := passthroughOpens()
	during, err := os.Open(p)
	if err != nil {
		t.Fatalf("open while the file is open in FUSE mode: %v", err)
	}
	readRange(during, size-4096, 4096)
	readRange(early, size/2, 4096)
	during.Close()
	early.Close()
	if got := passthroughOpens(); got != opens {
		t.Fatalf("an open made while the file was open in FUSE mode was passed through (%v opens)", got-opens)
	}

	readThrough := func(what string) {
		t.Helper()
		// A close reaches the daemon after the caller's close returns;
		// until it does, the file counts as open in FUSE mode.
		lazyWaitFor(t, "closes to reach the daemon", func() bool {
			return promtest.ToFloat64(metrics.OpenFiles.WithLabelValues("fuse")) == openBefore
		})
		served, opens := daemonReadBytes(), passthroughOpens()
		got, err := lazyReadFile(t, p)
		if err != nil || !bytes.Equal(got, model.big) {
			t.Fatalf("%s: read: err %v, content equal %v", what, err, bytes.Equal(got, model.big))
		}
		if d := passthroughOpens() - opens; d != 1 {
			t.Fatalf("%s: %v passthrough opens, want 1", what, d)
		}
		// Most of the file never entered the FUSE page cache: served
		// by the daemon, it would have counted here.
		if d := daemonReadBytes() - served; d != 0 {
			t.Fatalf("%s: the daemon served %v bytes of a passed-through file", what, d)
		}
	}
	readThrough("verified layer")

	// After a restart the layer is known whole, but a file is passed
	// through only once its chunks are checked again.
	img.unmount()
	n.close()
	// (Without background fill, which would check them at its own pace.)
	n = lazyStartNodeWith(t, cacheDir, nil, lazy.WithBackgroundFill(false))
	img = n.mountImage(t, model.ref, filepath.Join(dir, "image2"))
	p = img.path(model.bigPath)
	opens = passthroughOpens()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	readRange(f, 0, 4096)
	f.Close()
	if got := passthroughOpens(); got != opens {
		t.Fatal("a file was passed through after a restart before its chunks were checked")
	}
	passthroughCompleteLayer(t, n, model.ref)
	readThrough("after a restart")
}
