package remote

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
)

// headCounter counts the HEADs of each blob, and answers the first
// HEAD of the blob fail names with 404.
type headCounter struct {
	mu    sync.Mutex
	heads map[string]int
	fail  string
	// configHeld, if set, holds every GET of a blob until it is closed;
	// arrived, if set, receives each HEAD as it arrives.
	configHeld chan struct{}
	arrived    chan string
}

func (c *headCounter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := strings.LastIndex(r.URL.Path, "/blobs/")
		if i < 0 {
			h.ServeHTTP(w, r)
			return
		}
		d := r.URL.Path[i+len("/blobs/"):]
		switch r.Method {
		case http.MethodHead:
			c.mu.Lock()
			c.heads[d]++
			first := c.heads[d] == 1
			arrived := c.arrived
			c.mu.Unlock()
			if arrived != nil {
				arrived <- d
			}
			if first && d == c.fail {
				http.NotFound(w, r)
				return
			}
		case http.MethodGet:
			if c.configHeld != nil {
				<-c.configHeld
			}
		}
		h.ServeHTTP(w, r)
	})
}

func (c *headCounter) count(d digest.Digest) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.heads[d.String()]
}

// Resolve WithLayerHeads asks for the sizes of the layers it selects
// while the config is on its way, and the OpenBlob of each that follows
// takes the answer instead of asking again; once: a second OpenBlob asks.
// A failed HEAD is not taken, and a layer not selected is asked for by its
// OpenBlob, as without the option.
func TestResolveWithLayerHeads(t *testing.T) {
	c := &headCounter{heads: map[string]int{}, configHeld: make(chan struct{}), arrived: make(chan string, 16)}
	reg := newTestRegistry(t, c.wrap)
	release := sync.OnceFunc(func() { close(c.configHeld) })
	t.Cleanup(release) // before the registry closes: it waits for the GET
	img := randomImage(t, 4<<10, 3)
	ref := reg.pushImage(t, "models/heads:v1", img)
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var ls []digest.Digest
	for _, l := range m.Layers {
		ls = append(ls, digest.Digest(l.Digest.String()))
	}
	c.fail = ls[1].String()
	skipped := ls[2]
	want := func(d v1.Descriptor) bool { return d.Digest.String() != skipped.String() }

	cl := New(fastRetry)
	type result struct {
		img *Image
		err error
	}
	done := make(chan result, 1)
	go func() {
		img, err := cl.Resolve(t.Context(), ref, WithLayerHeads(want))
		done <- result{img, err}
	}()
	// The HEADs of the two selected layers arrive while the config's GET
	// is held: they do not wait for it.
	got := map[string]bool{}
	deadline := time.After(30 * time.Second)
	for len(got) < 2 {
		select {
		case d := <-c.arrived:
			got[d] = true
		case <-deadline:
			t.Fatalf("HEADs during the config's GET: %v; want two", got)
		}
	}
	if !got[ls[0].String()] || !got[ls[1].String()] {
		t.Fatalf("HEADs during the config's GET: %v; want %s and %s", got, ls[0], ls[1])
	}
	release()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	c.mu.Lock()
	c.arrived = nil // no one reads it any more
	c.mu.Unlock()
	repo := r.img.Ref.Context().Name()

	sizes := map[digest.Digest]int64{}
	for _, l := range r.img.Layers {
		sizes[l.Digest] = l.Size
	}
	open := func(d digest.Digest) {
		t.Helper()
		b, err := cl.OpenBlob(t.Context(), repo, d, -1)
		if err != nil {
			t.Fatalf("OpenBlob(%s): %v", d, err)
		}
		if b.Size() != sizes[d] {
			t.Fatalf("OpenBlob(%s).Size() = %d, want %d", d, b.Size(), sizes[d])
		}
	}
	for i, d := range ls {
		open(d)
		// Layer 0: its Resolve's HEAD only. Layer 1: that HEAD failed,
		// so OpenBlob asked again. Layer 2: not selected, OpenBlob asked.
		if n, want := c.count(d), []int{1, 2, 1}[i]; n != want {
			t.Errorf("layer %d: %d HEADs after its OpenBlob, want %d", i, n, want)
		}
	}
	open(ls[0])
	if n := c.count(ls[0]); n != 2 {
		t.Errorf("layer 0: %d HEADs after a second OpenBlob, want 2 (a HEAD is taken once)", n)
	}
}

// A Resolve starts at most maxResolveHeads HEADs, however many layers
// its manifest lists: a hostile manifest of thousands of layers does not
// make it send thousands of requests at once.
func TestResolveBoundsItsHeads(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 256, maxResolveHeads+4)
	ref := reg.pushImage(t, "models/many:v1", img)
	cl := New(fastRetry)
	if _, err := cl.Resolve(t.Context(), ref, WithLayerHeads(func(v1.Descriptor) bool { return true })); err != nil {
		t.Fatal(err)
	}
	cl.heads.mu.Lock()
	n := len(cl.heads.m)
	cl.heads.mu.Unlock()
	if n != maxResolveHeads {
		t.Errorf("a Resolve of %d layers started %d HEADs, want %d", maxResolveHeads+4, n, maxResolveHeads)
	}
}
