package lazy

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/remote"
)

// fakeHolder records what a Manager puts in and drops from its holder.
type fakeHolder struct {
	mu   sync.Mutex
	held map[string][]byte
}

func (h *fakeHolder) Put(key string, meta []byte, f *os.File) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if f == nil {
		panic("put without a descriptor")
	}
	h.held[key] = meta
	return nil
}

func (h *fakeHolder) Drop(key string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.held, key)
	return nil
}

func (h *fakeHolder) get(key string) ([]byte, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	b, ok := h.held[key]
	return b, ok
}

// TestHandOverAndResume: a mount's connection goes to the holder with
// the pinned image, the layer and the INIT; a second Manager on the same
// cache resumes it from that alone, with the registry gone, and serves
// what the first one had read; an unmount takes it out of the holder.
func TestHandOverAndResume(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	cacheDir, state := t.TempDir(), t.TempDir()
	h := &fakeHolder{held: map[string][]byte{}}
	store, err := cache.Open(cacheDir)
	if err != nil {
		t.Fatal(err)
	}
	first := New(store, remote.New(), WithBackgroundFill(false), WithHolder(h, state))
	firstFake := &fakeServe{}
	first.serve = firstFake.serve
	mp := filepath.Join(t.TempDir(), "mp")
	if err := first.Mount(t.Context(), mp, ref, ds[0]); err != nil {
		t.Fatal(err)
	}
	want := strings.Repeat("w", 3000) // models/f0, as pushModel makes it
	if got := readFile(t, firstFake.live()[0].l, "models/f0"); got != want {
		t.Fatalf("first manager read %q", got)
	}
	meta, ok := h.get(mp)
	if !ok {
		t.Fatal("the mount's connection is not in the holder")
	}
	var hm heldMount
	if err := json.Unmarshal(meta, &hm); err != nil {
		t.Fatal(err)
	}
	if hm.Proto != heldProto || hm.Layer != ds[0] || !strings.Contains(hm.Image, "@sha256:") || string(hm.Init) != "init "+mp {
		t.Fatalf("held %+v", hm)
	}
	// As if it had died: its cache stays. (Close would unmount; the
	// fake unmount leaves the holder's record alone.)
	first.Close()
	store.Close()
	h.Put(mp, meta, os.Stdin)

	g.srv.Close() // what the pods read is in the cache
	second, fake := newTestManagerOn(t, cacheDir, nil, WithHolder(h, state))
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	if err := second.Resume(t.Context(), mp, meta, fs.Conn{File: devnull}); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	live := fake.live()
	if len(live) != 1 || live[0].resumedInit != "init "+mp {
		t.Fatalf("resumed mounts %+v", live)
	}
	if got := readFile(t, live[0].l, "models/f0"); got != want {
		t.Fatalf("the resumed layer, registry gone, read %q", got)
	}
	if err := second.Check(t.Context(), mp); err != nil {
		t.Fatalf("Check after Resume: %v", err)
	}
	if err := second.Unmount(t.Context(), mp); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.get(mp); ok {
		t.Fatal("an unmounted layer's connection is still in the holder")
	}
}

// TestResumeErrorsNameTheImage: a held mount that cannot be served again
// fails with an error that says which image and layer.
func TestResumeErrorsNameTheImage(t *testing.T) {
	m, _ := newTestManager(t)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(t.Context(), "/nowhere", []byte("{"), fs.Conn{File: devnull}); err == nil {
		t.Fatal("Resume with unreadable metadata succeeded")
	}
	devnull, _ = os.Open(os.DevNull)
	if err := m.Resume(t.Context(), "/nowhere", []byte(`{"proto":99}`), fs.Conn{File: devnull}); err == nil || !strings.Contains(err.Error(), "another protocol") {
		t.Fatalf("Resume of a connection of another protocol: %v", err)
	}
	meta, _ := json.Marshal(heldMount{Proto: heldProto, Image: "127.0.0.1:1/private/model@sha256:" + strings.Repeat("a", 64), Layer: digest.Digest("sha256:" + strings.Repeat("b", 64))})
	devnull, _ = os.Open(os.DevNull)
	err = m.Resume(t.Context(), "/nowhere", meta, fs.Conn{File: devnull})
	if err == nil || !strings.Contains(err.Error(), "private/model") || !strings.Contains(err.Error(), strings.Repeat("b", 64)) {
		t.Fatalf("Resume of an unknown image: %v; want an error naming the image and layer", err)
	}
}

// readFile reads the named file of l whole.
func readFile(t *testing.T, l *layer.Opened, name string) string {
	t.Helper()
	e, err := l.Lookup(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, e.Size)
	if n, err := l.ReadAt(t.Context(), e, buf, 0); n != len(buf) {
		t.Fatalf("read %s: %d of %d bytes, %v", name, n, len(buf), err)
	}
	return string(buf)
}

// TestDrainWaitsForMountsInFlight: a manager about to hand over lets a
// mount in flight finish (and stay mounted, for the holder) and takes no
// new one.
func TestDrainWaitsForMountsInFlight(t *testing.T) {
	g := newGatedRegistry(t)
	ref, ds := pushModel(t, g, 1)
	m, fake := newTestManager(t)
	release := holdBlob(t, g, m, ref, ds[0])
	defer release()
	mp := filepath.Join(t.TempDir(), "mp")
	errc := make(chan error, 1)
	go func() { errc <- m.Mount(context.Background(), mp, ref, ds[0]) }()
	<-g.waiting
	drained := make(chan bool, 1)
	go func() { drained <- m.Drain(time.Minute) }()
	release()
	if err := <-errc; err != nil {
		t.Fatalf("the mount in flight: %v", err)
	}
	if !<-drained {
		t.Fatal("Drain gave up")
	}
	if live := fake.live(); len(live) != 1 || live[0].mp != mp {
		t.Fatalf("mounts after Drain: %+v, want the one in flight", live)
	}
	if err := m.Mount(t.Context(), mp+"2", ref, ds[0]); !errors.Is(err, ErrClosed) {
		t.Fatalf("Mount after Drain: %v, want ErrClosed", err)
	}
}
