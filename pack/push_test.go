package pack

// Tests of pushing a packed image.

import (
	"bytes"
	"context"
	"io"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/weightsnap/weightsnap/internal/registryserver"
)

// uploadCounter counts requests that start or carry a blob upload.
type uploadCounter struct {
	mu sync.Mutex
	n  int
}

// push pushes with a progress channel and returns the last update.
func push(t *testing.T, img v1.Image, ref string) v1.Update {
	t.Helper()
	updates := make(chan v1.Update, 16)
	var last v1.Update
	done := make(chan struct{})
	go func() {
		defer close(done)
		for u := range updates {
			last = u
		}
	}()
	err := Push(context.Background(), img, ref, true, updates)
	<-done // Push closed the channel
	if err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return last
}

func TestPushAndPull(t *testing.T) {
	h, err := registryserver.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var uploads uploadCounter
	srv := httptest.NewServer(uploads.wrap(h))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")

	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, modelSpec(), 0o644)
	img := build(t, dir, Options{})
	ref := host + "/models/tiny-llama:v1"

	last := push(t, img, ref)
	first := uploads.get()
	if first == 0 {
		t.Fatal("push uploaded nothing")
	}
	if last.Total == 0 || last.Complete != last.Total {
		t.Errorf("last progress update %+v, want complete == total > 0", last)
	}

	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	pulled, err := remote.Image(r)
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if got, want := digestOf(t, pulled), digestOf(t, img); got != want {
		t.Fatalf("pulled %s, pushed %s", got, want)
	}
	pm, _ := pulled.RawManifest()
	im, _ := img.RawManifest()
	pc, _ := pulled.RawConfigFile()
	ic, _ := img.RawConfigFile()
	if !bytes.Equal(pm, im) || !bytes.Equal(pc, ic) {
		t.Fatal("pulled manifest or config differs from the built one")
	}
	pls, _ := pulled.Layers()
	ils, _ := img.Layers()
	for i := range ils {
		rc, err := pls[i].Compressed()
		if err != nil {
			t.Fatal(err)
		}
		pb, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		rc, _ = ils[i].Compressed()
		ib, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pb, ib) {
			t.Errorf("layer %d: pulled %d bytes differ from built %d bytes", i, len(pb), len(ib))
		}
	}

	// Re-pushing, to the same tag, another tag, or from a fresh build of
	// the same dir, uploads no blob.
	push(t, img, ref)
	push(t, img, host+"/models/tiny-llama:v2")
	push(t, build(t, dir, Options{}), host+"/other/repo:v1")
	if n := uploads.get(); n != first {
		t.Fatalf("re-pushes made %d upload requests, want 0", n-first)
	}
}

func TestPushBadRef(t *testing.T) {
	dir := t.TempDir()
	writeModel(t, dir, []fileSpec{{path: "a", data: []byte("a")}}, 0o644)
	img := build(t, dir, Options{})
	updates := make(chan v1.Update, 1)
	if err := Push(context.Background(), img, "not a ref!", false, updates); err == nil {
		t.Fatal("Push to an invalid reference succeeded")
	}
	if _, open := <-updates; open {
		t.Fatal("progress channel not closed after a failed Push")
	}
}
