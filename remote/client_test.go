package remote

import (
	"errors"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

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
		{"dead mirror", []Endpoint{{Host: dead, PlainHTTP: true}, {Host: origin}}, false},
		{"failing mirror", []Endpoint{{Host: strings.TrimPrefix(failing.URL, "http://"), PlainHTTP: true}, {Host: origin}}, false},
		{"path mirror", []Endpoint{{Host: mirrorHost, PlainHTTP: true, Path: "/cache/v2"}, {Host: origin}}, true},
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
