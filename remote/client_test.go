package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
)

// readBlob opens blob d of repo with c and checks its first bytes.
func readBlob(ctx context.Context, c *Client, repo string, d digest.Digest, data []byte) error {
	b, err := c.OpenBlob(ctx, repo, d, int64(len(data)))
	if err != nil {
		return err
	}
	buf := make([]byte, min(100, len(data)))
	if _, err := b.ReadAt(ctx, buf, 0); err != nil {
		return fmt.Errorf("ReadAt of %s: %w", d, err)
	}
	if !bytes.Equal(buf, data[:len(buf)]) {
		return fmt.Errorf("ReadAt of %s: wrong bytes", d)
	}
	return nil
}

// readEach reads every blob of blobs in repo with readBlob.
func readEach(t *testing.T, c *Client, repo string, blobs map[digest.Digest][]byte) {
	t.Helper()
	for d, data := range blobs {
		if err := readBlob(t.Context(), c, repo, d, data); err != nil {
			t.Fatal(err)
		}
	}
}

// anyBlob returns one layer blob of img.
func anyBlob(t *testing.T, img v1.Image) (digest.Digest, []byte) {
	t.Helper()
	for d, b := range layerBlobs(t, img) {
		return d, b
	}
	t.Fatal("image without layers")
	return "", nil
}

func TestOneLoginPerRepository(t *testing.T) {
	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-1"}
	reg := newTestRegistry(t, auth.wrap)
	img := randomImage(t, 4096, 4)
	ref := reg.pushImage(t, "private/model:v1", img)
	other := reg.pushImage(t, "private/other:v1", randomImage(t, 4096, 1))
	c := New(fastRetry, WithKeychain(staticKeychain{reg.host(): {Username: "alice", Password: "secret"}}))

	if _, err := c.Resolve(t.Context(), ref); err != nil {
		t.Fatal(err)
	}
	readEach(t, c, reg.host()+"/private/model", layerBlobs(t, img))
	if _, err := c.Resolve(t.Context(), ref); err != nil {
		t.Fatal(err)
	}
	if n := auth.exchanges.Load(); n != 1 {
		t.Errorf("resolving an image twice and opening its 4 blobs: %d token exchanges, want 1", n)
	}
	// A token's scope is one repository: another one logs in anew.
	if _, err := c.Resolve(t.Context(), other); err != nil {
		t.Fatal(err)
	}
	if n := auth.exchanges.Load(); n != 2 {
		t.Errorf("after a second repository: %d token exchanges, want 2", n)
	}
}

// A keychain is asked for the repository, so that credentials given for
// one repository (kubelet's, from a CRI PullImage) serve it and no other.
func TestCredentialsPerRepository(t *testing.T) {
	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-r"}
	reg := newTestRegistry(t, auth.wrap)
	ref := reg.pushImage(t, "private/model:v1", randomImage(t, 4096, 1))
	other := reg.pushImage(t, "private/other:v1", randomImage(t, 4096, 1))
	c := New(fastRetry, WithKeychain(repoKeychain{reg.host() + "/private/model": {Username: "alice", Password: "secret"}}))

	if _, err := c.Resolve(t.Context(), ref); err != nil {
		t.Fatalf("the repository with credentials: %v", err)
	}
	if _, err := c.Resolve(t.Context(), other); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("another repository: %v, want ErrUnauthorized", err)
	}
}

func TestConcurrentFirstUseLogsInOnce(t *testing.T) {
	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-2", delay: 50 * time.Millisecond}
	reg := newTestRegistry(t, auth.wrap)
	img := randomImage(t, 4096, 4)
	ref := reg.pushImage(t, "private/model:v1", img)
	blobs := layerBlobs(t, img)
	c := New(fastRetry, WithKeychain(staticKeychain{reg.host(): {Username: "alice", Password: "secret"}}))

	start := make(chan struct{})
	var wg sync.WaitGroup
	for d, data := range blobs {
		for range 2 {
			wg.Go(func() {
				<-start
				if err := readBlob(t.Context(), c, reg.host()+"/private/model", d, data); err != nil {
					t.Error(err)
				}
			})
		}
	}
	wg.Go(func() {
		<-start
		if _, err := c.Resolve(t.Context(), ref); err != nil {
			t.Error(err)
		}
	})
	close(start)
	wg.Wait()
	if n := auth.exchanges.Load(); n != 1 {
		t.Errorf("%d concurrent first uses of one repository: %d token exchanges, want 1", 2*len(blobs)+1, n)
	}
}

func TestLoginOfCancelledCallerIsNotInherited(t *testing.T) {
	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-3", delay: 100 * time.Millisecond}
	exchanging := make(chan struct{}, 2)
	reg := newTestRegistry(t, func(h http.Handler) http.Handler {
		h = auth.wrap(h)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/token" {
				exchanging <- struct{}{}
			}
			h.ServeHTTP(w, r)
		})
	})
	img := randomImage(t, 4096, 1)
	reg.pushImage(t, "private/model:v1", img)
	repo := reg.host() + "/private/model"
	c := New(fastRetry, WithKeychain(staticKeychain{reg.host(): {Username: "alice", Password: "secret"}}))
	d, data := anyBlob(t, img)

	// The first caller gives up during its login while a second waits
	// for that login: the second must log in itself, not fail.
	ctx, cancel := context.WithCancel(t.Context())
	first := make(chan error, 1)
	go func() { first <- readBlob(ctx, c, repo, d, data) }()
	<-exchanging
	second := make(chan error, 1)
	go func() { second <- readBlob(t.Context(), c, repo, d, data) }()
	time.Sleep(20 * time.Millisecond) // let the second caller start waiting
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled caller: %v, want context.Canceled", err)
	}
	if err := <-second; err != nil {
		t.Errorf("caller waiting for a cancelled login: %v", err)
	}
	if n := auth.exchanges.Load(); n != 2 {
		t.Errorf("%d token exchanges, want 2 (the cancelled one and the waiter's own)", n)
	}
}

// mirrorOf returns the option that puts mirror before the origin.
func mirrorOf(mirror *httptest.Server) Option {
	return WithMirrors(func(registry string) []Endpoint {
		return []Endpoint{{Host: strings.TrimPrefix(mirror.URL, "http://"), Scheme: "http"}, {Host: registry}}
	})
}

func TestFailedMirrorIsSkippedByOtherBlobs(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 4)
	reg.pushImage(t, "mirrored/model:v1", img)
	blobs := layerBlobs(t, img)
	repo := reg.host() + "/mirrored/model"
	var hits atomic.Int64
	// The mirror lets clients log in, then fails every request.
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if r.URL.Path == "/v2/" {
			return
		}
		http.Error(w, "overloaded", http.StatusServiceUnavailable)
	}))
	t.Cleanup(failing.Close)

	c := New(WithRetry(3, time.Millisecond), mirrorOf(failing))
	first, data := anyBlob(t, img)
	readEach(t, c, repo, map[digest.Digest][]byte{first: data})
	tried := hits.Load()
	if tried == 0 {
		t.Fatal("the mirror was never asked")
	}
	readEach(t, c, repo, blobs)
	if n := hits.Load(); n != tried {
		t.Errorf("mirror asked %d times by the other blobs within its cooldown, want 0", n-tried)
	}

	// Once the cooldown is over, the mirror is tried again.
	c = New(WithRetry(1, 0), mirrorOf(failing))
	c.cooldown = 20 * time.Millisecond
	readEach(t, c, repo, map[digest.Digest][]byte{first: data})
	before := hits.Load()
	time.Sleep(2 * c.cooldown)
	readEach(t, c, repo, map[digest.Digest][]byte{first: data})
	if hits.Load() == before {
		t.Error("mirror not tried again after its cooldown")
	}
}

func TestMirrorWithoutBlobIsNotSkipped(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 3)
	reg.pushImage(t, "mirrored/model:v1", img)
	blobs := layerBlobs(t, img)
	var hits atomic.Int64
	empty := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	partial := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/blobs/") {
			hits.Add(1)
		}
		empty.ServeHTTP(w, r)
	}))
	t.Cleanup(partial.Close)

	c := New(fastRetry, mirrorOf(partial))
	readEach(t, c, reg.host()+"/mirrored/model", blobs)
	if n := hits.Load(); n != int64(len(blobs)) {
		t.Errorf("mirror lacking every blob asked for %d of %d blobs, want all", n, len(blobs))
	}
}

func TestBearerAuthAndRedirect(t *testing.T) {
	var storageReqs, storageAuth atomic.Int64
	var storageBlobs sync.Map // digest → []byte
	storage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		storageReqs.Add(1)
		if r.Header.Get("Authorization") != "" {
			storageAuth.Add(1)
		}
		data, ok := storageBlobs.Load(strings.TrimPrefix(r.URL.Path, "/"))
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(data.([]byte))))
	}))
	t.Cleanup(storage.Close)

	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-123"}
	reg := newTestRegistry(t, func(h http.Handler) http.Handler {
		return auth.wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if i := strings.Index(r.URL.Path, "/blobs/"); i >= 0 && r.Method == http.MethodGet {
				if _, ok := storageBlobs.Load(r.URL.Path[i+len("/blobs/"):]); ok {
					http.Redirect(w, r, storage.URL+"/"+r.URL.Path[i+len("/blobs/"):], http.StatusTemporaryRedirect)
					return
				}
			}
			h.ServeHTTP(w, r)
		}))
	})
	img := randomImage(t, 128<<10, 1)
	ref := reg.pushImage(t, "private/model:v1", img)
	blobs := layerBlobs(t, img)
	for d, b := range blobs {
		storageBlobs.Store(d.String(), b)
	}

	if _, err := New(fastRetry, WithKeychain(staticKeychain{})).Resolve(t.Context(), ref); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("Resolve without credentials: %v, want ErrUnauthorized", err)
	}
	kc := staticKeychain{reg.host(): {Username: "alice", Password: "secret"}}
	got, err := New(fastRetry, WithKeychain(kc)).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatalf("Resolve with credentials: %v", err)
	}
	l := got.Layers[0]
	want := blobs[l.Digest]
	checkRandomReads(t, l.Blob, want, 10, rand.New(rand.NewPCG(7, 8)))
	checkOpen(t, l.Blob, want, 1000)
	if storageReqs.Load() == 0 {
		t.Fatal("no request reached the blob storage: redirects were not followed")
	}
	if n := storageAuth.Load(); n != 0 {
		t.Errorf("%d requests to the blob storage carried the registry's Authorization", n)
	}
}

func TestMirrorFallback(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 64<<10, 1)
	ref := reg.pushImage(t, "mirrored/model:v1", img)
	want := layerBlobs(t, img)

	// A working mirror under a path prefix, as a pull-through cache would be.
	var mirrorHits atomic.Int64
	var nsSeen sync.Map
	mirror := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v2/" {
			p, ok := strings.CutPrefix(r.URL.Path, "/cache")
			if !ok {
				http.NotFound(w, r)
				return
			}
			mirrorHits.Add(1)
			nsSeen.Store(r.URL.Query().Get("ns"), true)
			r.URL.Path = p
		}
		reg.handler.ServeHTTP(w, r)
	}))
	t.Cleanup(mirror.Close)
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
	}))
	t.Cleanup(failing.Close)
	dead := closedAddr(t)
	origin := reg.host()
	mirrorHost := strings.TrimPrefix(mirror.URL, "http://")

	for _, tc := range []struct {
		name       string
		endpoints  []Endpoint
		wantMirror bool
	}{
		{"dead mirror", []Endpoint{{Host: dead, Scheme: "http"}, {Host: origin}}, false},
		{"failing mirror", []Endpoint{{Host: strings.TrimPrefix(failing.URL, "http://"), Scheme: "http"}, {Host: origin}}, false},
		{"path mirror", []Endpoint{{Host: mirrorHost, Scheme: "http", Path: "/cache/v2"}, {Host: origin}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var asked []string
			hitsBefore := mirrorHits.Load()
			opt := WithMirrors(func(registry string) []Endpoint {
				asked = append(asked, registry)
				return tc.endpoints
			})
			got, err := New(fastRetry, opt).Resolve(t.Context(), ref)
			if err != nil {
				t.Fatalf("Resolve: %v", err)
			}
			if len(asked) != 1 || asked[0] != origin {
				t.Errorf("mirrors asked for %v, want [%s]", asked, origin)
			}
			l := got.Layers[0]
			checkRandomReads(t, l.Blob, want[l.Digest], 5, rand.New(rand.NewPCG(9, 10)))
			if hit := mirrorHits.Load() > hitsBefore; hit != tc.wantMirror {
				t.Errorf("mirror used = %v, want %v", hit, tc.wantMirror)
			}
		})
	}
	if _, ok := nsSeen.Load(origin); !ok {
		t.Errorf("mirror requests lacked ns=%s", origin)
	}
}
