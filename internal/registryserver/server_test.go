package registryserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// hits counts requests by "METHOD kind" so tests can tell which uploads a
// client really made.
type hits struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *hits) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind, _, _ := parseRoute(r.URL.Path)
		c.mu.Lock()
		c.m[fmt.Sprintf("%s %d", r.Method, kind)]++
		c.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

// uploads returns how many requests carried blob bytes or started an upload.
func (c *hits) uploads() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[fmt.Sprintf("POST %d", routeUploadStart)] +
		c.m[fmt.Sprintf("PATCH %d", routeUpload)] +
		c.m[fmt.Sprintf("PUT %d", routeUpload)]
}

func (c *hits) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m = map[string]int{}
}

type testRegistry struct {
	dir  string
	host string
	hits *hits
}

func newTestRegistry(t *testing.T) *testRegistry {
	t.Helper()
	dir := t.TempDir()
	h, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	c := &hits{m: map[string]int{}}
	srv := httptest.NewServer(c.wrap(h))
	t.Cleanup(srv.Close)
	return &testRegistry{dir: dir, host: strings.TrimPrefix(srv.URL, "http://"), hits: c}
}

func (r *testRegistry) url(p string) string { return "http://" + r.host + p }

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{byte(seed)})
	rng.Read(b)
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func do(t *testing.T, method, url string, body []byte, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, got
}

func TestPushPullRangeAndRepush(t *testing.T) {
	reg := newTestRegistry(t)
	size := 64 << 20
	if testing.Short() {
		size = 4 << 20
	}
	data := randomBytes(size, 1)
	img, err := mutate.AppendLayers(empty.Image, static.NewLayer(data, types.OCIUncompressedLayer))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(reg.host+"/test/big:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push: %v", err)
	}
	if reg.hits.uploads() == 0 {
		t.Fatal("first push made no upload requests")
	}
	if entries, err := os.ReadDir(filepath.Join(reg.dir, "uploads")); err != nil || len(entries) != 0 {
		t.Fatalf("upload dir after push: %v entries, err %v", len(entries), err)
	}

	pulled, err := remote.Image(ref)
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	wantDigest, _ := img.Digest()
	if got, _ := pulled.Digest(); got != wantDigest {
		t.Fatalf("pulled digest %s, pushed %s", got, wantDigest)
	}
	layers, err := pulled.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("pulled layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	blob := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if blob != sha(data) {
		t.Fatalf("pulled layer %s, want %s", blob, sha(data))
	}
	blobURL := reg.url("/v2/test/big/blobs/" + blob)

	t.Run("head", func(t *testing.T) {
		resp, _ := do(t, http.MethodHead, blobURL, nil, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("HEAD status %d", resp.StatusCode)
		}
		if resp.ContentLength != int64(size) {
			t.Errorf("HEAD Content-Length %d, want %d", resp.ContentLength, size)
		}
		if got := resp.Header.Get("Docker-Content-Digest"); got != blob {
			t.Errorf("Docker-Content-Digest %q", got)
		}
		if got := resp.Header.Get("Accept-Ranges"); got != "bytes" {
			t.Errorf("Accept-Ranges %q", got)
		}
		resp, _ = do(t, http.MethodHead, reg.url("/v2/test/big/blobs/"+sha([]byte("nope"))), nil, nil)
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("HEAD of unknown blob: %d", resp.StatusCode)
		}
	})

	t.Run("range", func(t *testing.T) {
		for _, tc := range []struct {
			rng        string
			status     int
			start, end int // inclusive, for 206
		}{
			{"bytes=10-19", http.StatusPartialContent, 10, 19},
			{"bytes=0-0", http.StatusPartialContent, 0, 0},
			{fmt.Sprintf("bytes=%d-", size-1000), http.StatusPartialContent, size - 1000, size - 1},
			{fmt.Sprintf("bytes=%d-%d", size-5, size+100), http.StatusPartialContent, size - 5, size - 1},
			{"bytes=-7", http.StatusPartialContent, size - 7, size - 1},
			{fmt.Sprintf("bytes=%d-", size), http.StatusRequestedRangeNotSatisfiable, 0, 0},
			{fmt.Sprintf("bytes=%d-%d", size+10, size+20), http.StatusRequestedRangeNotSatisfiable, 0, 0},
		} {
			resp, body := do(t, http.MethodGet, blobURL, nil, map[string]string{"Range": tc.rng})
			if resp.StatusCode != tc.status {
				t.Errorf("%s: status %d, want %d", tc.rng, resp.StatusCode, tc.status)
				continue
			}
			if tc.status == http.StatusRequestedRangeNotSatisfiable {
				if got, want := resp.Header.Get("Content-Range"), fmt.Sprintf("bytes */%d", size); got != want {
					t.Errorf("%s: Content-Range %q, want %q", tc.rng, got, want)
				}
				continue
			}
			if got, want := resp.Header.Get("Content-Range"), fmt.Sprintf("bytes %d-%d/%d", tc.start, tc.end, size); got != want {
				t.Errorf("%s: Content-Range %q, want %q", tc.rng, got, want)
			}
			if !bytes.Equal(body, data[tc.start:tc.end+1]) {
				t.Errorf("%s: body of %d bytes differs from data[%d:%d]", tc.rng, len(body), tc.start, tc.end+1)
			}
		}
	})

	t.Run("repush uploads nothing", func(t *testing.T) {
		reg.hits.reset()
		ref2, err := name.ParseReference(reg.host+"/test/other:v2", name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []name.Reference{ref, ref2} {
			if err := remote.Write(r, img); err != nil {
				t.Fatalf("re-push %s: %v", r, err)
			}
		}
		if n := reg.hits.uploads(); n != 0 {
			t.Fatalf("re-push made %d upload requests, want 0 (hits %v)", n, reg.hits.m)
		}
	})
}

func TestUploads(t *testing.T) {
	reg := newTestRegistry(t)
	data := randomBytes(300<<10, 2)
	digest := sha(data)
	wrong := sha([]byte("something else"))

	start := func(t *testing.T) string {
		t.Helper()
		resp, _ := do(t, http.MethodPost, reg.url("/v2/up/load/blobs/uploads/"), nil, nil)
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("POST status %d", resp.StatusCode)
		}
		loc := resp.Header.Get("Location")
		if !strings.HasPrefix(loc, "/v2/up/load/blobs/uploads/") {
			t.Fatalf("Location %q", loc)
		}
		return reg.url(loc)
	}
	status := func(t *testing.T, url string) int {
		t.Helper()
		resp, _ := do(t, http.MethodHead, url, nil, nil)
		return resp.StatusCode
	}

	t.Run("chunked", func(t *testing.T) {
		loc := start(t)
		cut := 100 << 10
		resp, _ := do(t, http.MethodPatch, loc, data[:cut], map[string]string{"Content-Range": fmt.Sprintf("0-%d", cut-1)})
		if resp.StatusCode != http.StatusAccepted || resp.Header.Get("Range") != fmt.Sprintf("0-%d", cut-1) {
			t.Fatalf("PATCH 1: %d Range %q", resp.StatusCode, resp.Header.Get("Range"))
		}
		// A chunk that does not continue the upload is refused.
		resp, _ = do(t, http.MethodPatch, loc, data[:10], map[string]string{"Content-Range": "5-14"})
		if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable {
			t.Fatalf("out-of-order PATCH: %d", resp.StatusCode)
		}
		resp, _ = do(t, http.MethodPatch, loc, data[cut:], nil)
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("PATCH 2: %d", resp.StatusCode)
		}
		resp, _ = do(t, http.MethodPut, loc+"?digest="+digest, nil, nil)
		if resp.StatusCode != http.StatusCreated || resp.Header.Get("Docker-Content-Digest") != digest {
			t.Fatalf("PUT: %d %q", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
		}
		_, body := do(t, http.MethodGet, reg.url("/v2/up/load/blobs/"+digest), nil, nil)
		if !bytes.Equal(body, data) {
			t.Fatal("stored blob differs from the uploaded chunks")
		}
		// The session is gone after commit.
		resp, _ = do(t, http.MethodPatch, loc, data, nil)
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("PATCH after commit: %d", resp.StatusCode)
		}
	})

	t.Run("digest mismatch on PUT", func(t *testing.T) {
		loc := start(t)
		if resp, _ := do(t, http.MethodPatch, loc, data, nil); resp.StatusCode != http.StatusAccepted {
			t.Fatalf("PATCH: %d", resp.StatusCode)
		}
		resp, body := do(t, http.MethodPut, loc+"?digest="+wrong, nil, nil)
		if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(body, []byte("DIGEST_INVALID")) {
			t.Fatalf("PUT with wrong digest: %d %s", resp.StatusCode, body)
		}
		if s := status(t, reg.url("/v2/up/load/blobs/"+wrong)); s != http.StatusNotFound {
			t.Fatalf("HEAD of rejected blob: %d", s)
		}
	})

	t.Run("digest mismatch monolithic", func(t *testing.T) {
		resp, body := do(t, http.MethodPost, reg.url("/v2/up/load/blobs/uploads/?digest="+wrong), data, nil)
		if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(body, []byte("DIGEST_INVALID")) {
			t.Fatalf("POST with wrong digest: %d %s", resp.StatusCode, body)
		}
		if s := status(t, reg.url("/v2/up/load/blobs/"+wrong)); s != http.StatusNotFound {
			t.Fatalf("HEAD of rejected blob: %d", s)
		}
		other := randomBytes(1000, 3)
		resp, _ = do(t, http.MethodPost, reg.url("/v2/up/load/blobs/uploads/?digest="+sha(other)), other, nil)
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("monolithic POST: %d", resp.StatusCode)
		}
		if s := status(t, reg.url("/v2/up/load/blobs/"+sha(other))); s != http.StatusOK {
			t.Fatalf("HEAD of monolithic blob: %d", s)
		}
	})

	t.Run("mount", func(t *testing.T) {
		resp, _ := do(t, http.MethodPost, reg.url("/v2/else/where/blobs/uploads/?mount="+digest+"&from=up/load"), nil, nil)
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("mount of a stored blob: %d", resp.StatusCode)
		}
		resp, _ = do(t, http.MethodPost, reg.url("/v2/else/where/blobs/uploads/?mount="+wrong+"&from=up/load"), nil, nil)
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("mount of a missing blob should start an upload: %d", resp.StatusCode)
		}
		if resp, _ := do(t, http.MethodDelete, reg.url(resp.Header.Get("Location")), nil, nil); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("DELETE of the upload the mount started: %d", resp.StatusCode)
		}
	})

	t.Run("cancel", func(t *testing.T) {
		loc := start(t)
		do(t, http.MethodPatch, loc, data[:10], nil)
		if resp, _ := do(t, http.MethodDelete, loc, nil, nil); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("DELETE upload: %d", resp.StatusCode)
		}
		if resp, _ := do(t, http.MethodPut, loc+"?digest="+sha(data[:10]), nil, nil); resp.StatusCode != http.StatusNotFound {
			t.Fatalf("PUT after cancel: %d", resp.StatusCode)
		}
	})

	entries, err := os.ReadDir(filepath.Join(reg.dir, "uploads"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("%d files left in the upload dir", len(entries))
	}

	// A new server on the same dir serves the blobs already stored.
	h, err := New(reg.dir)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	if resp, _ := do(t, http.MethodHead, srv.URL+"/v2/any/repo/blobs/"+digest, nil, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("blob after restart: %d", resp.StatusCode)
	}
}

func TestStart(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, stop, err := Start(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop() })
	if resp, _ := do(t, http.MethodGet, "http://"+addr+"/v2/", nil, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v2/: %d", resp.StatusCode)
	}
	if err := stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	_, err = http.Get("http://" + addr + "/v2/")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("GET after stop: %v, want connection refused", err)
	}

	// Cancelling the context also shuts the server down.
	ctx2, cancel2 := context.WithCancel(context.Background())
	addr2, stop2, err := Start(ctx2, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cancel2()
	if err := stop2(); err != nil {
		t.Fatalf("stop after cancel: %v", err)
	}
	if _, err := http.Get("http://" + addr2 + "/v2/"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("GET after cancel: %v, want connection refused", err)
	}
}

func TestParseRoute(t *testing.T) {
	for _, tc := range []struct {
		path      string
		kind      int
		repo, arg string
	}{
		{"/v2/", routeOther, "", ""},
		{"/v2/a/b/manifests/latest", routeOther, "", ""},
		{"/v2/a/b/blobs/sha256:ab", routeBlob, "a/b", "sha256:ab"},
		{"/v2/a/blobs/uploads/", routeUploadStart, "a", ""},
		{"/v2/a/blobs/uploads", routeUploadStart, "a", ""},
		{"/v2/a/b/c/blobs/uploads/123", routeUpload, "a/b/c", "123"},
		{"/v2/blobs/uploads/", routeOther, "", ""},
	} {
		kind, repo, arg := parseRoute(tc.path)
		if kind != tc.kind || repo != tc.repo || arg != tc.arg {
			t.Errorf("parseRoute(%q) = %d %q %q, want %d %q %q", tc.path, kind, repo, arg, tc.kind, tc.repo, tc.arg)
		}
	}
}

// Hash values the tests build must parse as ggcr hashes; a typo in sha()
// would make every "not found" assertion pass for the wrong reason.
func TestShaHelper(t *testing.T) {
	if _, err := v1.NewHash(sha(nil)); err != nil {
		t.Fatal(err)
	}
}

func TestRestartKeepsImages(t *testing.T) {
	reg := newTestRegistry(t)
	img, err := random.Image(1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref := func(host, tag string) name.Reference {
		r, err := name.ParseReference(host+"/keep/me:"+tag, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for _, tag := range []string{"v1", "v2"} {
		if err := remote.Write(ref(reg.host, tag), img); err != nil {
			t.Fatal(err)
		}
	}
	if err := remote.Delete(ref(reg.host, "v2")); err != nil {
		t.Fatal(err)
	}
	// A crash in the middle of an append leaves a torn line.
	f, err := os.OpenFile(filepath.Join(reg.dir, "manifests.jsonl"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"method":"PUT","pa`)
	f.Close()

	h, err := New(reg.dir)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	pulled, err := remote.Image(ref(host, "v1"))
	if err != nil {
		t.Fatalf("pull after restart: %v", err)
	}
	want, _ := img.Digest()
	if got, err := pulled.Digest(); err != nil || got != want {
		t.Fatalf("pulled %s (%v), want %s", got, err, want)
	}
	layers, err := pulled.Layers()
	if err != nil || len(layers) != 2 {
		t.Fatalf("layers after restart: %d, %v", len(layers), err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		d, _ := l.Digest()
		if err != nil || sha(b) != d.String() {
			t.Fatalf("layer %s after restart: %s, %v", d, sha(b), err)
		}
	}
	if _, err := remote.Head(ref(host, "v2")); err == nil {
		t.Fatal("deleted tag came back after restart")
	}
}
