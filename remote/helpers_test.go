package remote

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	ggcrremote "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
)

// testRegistry is an in-process registry: pushes go to push directly, reads
// to serve, which can wrap the registry with faults, auth or redirects.
type testRegistry struct {
	handler http.Handler
	push    *httptest.Server
	serve   *httptest.Server
	conns   atomic.Int64 // connections opened to serve
}

func newTestRegistry(t *testing.T, wrap func(http.Handler) http.Handler) *testRegistry {
	t.Helper()
	r := &testRegistry{handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	r.push = httptest.NewServer(r.handler)
	t.Cleanup(r.push.Close)
	h := r.handler
	if wrap != nil {
		h = wrap(h)
	}
	r.serve = httptest.NewUnstartedServer(h)
	r.serve.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			r.conns.Add(1)
		}
	}
	r.serve.Start()
	t.Cleanup(r.serve.Close)
	return r
}

// host is the address reads go to.
func (r *testRegistry) host() string { return strings.TrimPrefix(r.serve.URL, "http://") }

// pushImage pushes img as repo:tag and returns the reference to read it by.
func (r *testRegistry) pushImage(t *testing.T, repoTag string, img v1.Image) string {
	t.Helper()
	ref, err := name.ParseReference(strings.TrimPrefix(r.push.URL, "http://") + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := ggcrremote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return r.host() + "/" + repoTag
}

func (r *testRegistry) pushIndex(t *testing.T, repoTag string, idx v1.ImageIndex) string {
	t.Helper()
	ref, err := name.ParseReference(strings.TrimPrefix(r.push.URL, "http://") + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := ggcrremote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return r.host() + "/" + repoTag
}

func randomImage(t *testing.T, size, layers int64) v1.Image {
	t.Helper()
	img, err := random.Image(size, layers)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// layerBlobs returns each layer blob of img by digest.
func layerBlobs(t *testing.T, img v1.Image) map[digest.Digest][]byte {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	out := map[digest.Digest][]byte{}
	for _, l := range ls {
		h, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[digest.Digest(h.String())] = b
	}
	return out
}

func imageDigest(t *testing.T, img interface{ Digest() (v1.Hash, error) }) digest.Digest {
	t.Helper()
	h, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(h.String())
}

// checkRandomReads reads blob at random offsets and lengths (some running
// past its end) and compares with want.
func checkRandomReads(t *testing.T, b *Blob, want []byte, n int, rng *rand.Rand) {
	t.Helper()
	ctx := t.Context()
	for i := 0; i < n; i++ {
		off := rng.Int64N(int64(len(want)))
		buf := make([]byte, 1+rng.IntN(64<<10))
		got, err := b.ReadAt(ctx, buf, off)
		end := min(off+int64(len(buf)), int64(len(want)))
		if got != int(end-off) {
			t.Fatalf("ReadAt(%d, len %d) = %d bytes, %v; want %d", off, len(buf), got, err, end-off)
		}
		if end-off < int64(len(buf)) && err != io.EOF {
			t.Fatalf("ReadAt(%d, len %d) past the end: err %v, want io.EOF", off, len(buf), err)
		}
		if end-off == int64(len(buf)) && err != nil {
			t.Fatalf("ReadAt(%d, len %d): %v", off, len(buf), err)
		}
		if !bytes.Equal(buf[:got], want[off:end]) {
			t.Fatalf("ReadAt(%d, len %d): wrong bytes", off, len(buf))
		}
	}
}

// checkOpen reads the blob from off with Open and compares with want.
func checkOpen(t *testing.T, b *Blob, want []byte, off int64) {
	t.Helper()
	rc, err := b.Open(t.Context(), off)
	if err != nil {
		t.Fatalf("Open(%d): %v", off, err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("Open(%d) read: %v", off, err)
	}
	if !bytes.Equal(got, want[off:]) {
		t.Fatalf("Open(%d) read: %d bytes, want %d, or wrong bytes", off, len(got), len(want)-int(off))
	}
}

// faults is a handler that fails some requests in each way a registry or
// the network can: 500, 429 with Retry-After: 0, a connection dropped
// mid-body, and a stall before or in the body.
type faults struct {
	inner http.Handler
	every int64 // one request in every is failed
	n     atomic.Int64

	mu   sync.Mutex
	seen map[string]int // fault kind → count
}

var faultKinds = []string{"500", "429", "drop", "stall-headers", "stall-body"}

func (f *faults) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := f.n.Add(1)
	if n%f.every != f.every/2 {
		f.inner.ServeHTTP(w, r)
		return
	}
	kind := faultKinds[(n/f.every)%int64(len(faultKinds))]
	f.mu.Lock()
	f.seen[kind]++
	f.mu.Unlock()
	switch kind {
	case "500":
		http.Error(w, "injected", http.StatusInternalServerError)
	case "429":
		w.Header().Set("Retry-After", "0")
		http.Error(w, "injected", http.StatusTooManyRequests)
	case "stall-headers":
		<-r.Context().Done()
	case "drop", "stall-body":
		rec := httptest.NewRecorder()
		f.inner.ServeHTTP(rec, r)
		res := rec.Result()
		body := rec.Body.Bytes()
		half := body[:len(body)/2]
		if kind == "stall-body" {
			for k, v := range res.Header {
				w.Header()[k] = v
			}
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.WriteHeader(res.StatusCode)
			w.Write(half)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return
		}
		conn, buf, err := w.(http.Hijacker).Hijack()
		if err != nil {
			panic(err)
		}
		defer conn.Close()
		writeRawResponse(buf, res, len(body), half)
	}
}

func writeRawResponse(buf *bufio.ReadWriter, res *http.Response, length int, body []byte) {
	fmt.Fprintf(buf, "HTTP/1.1 %d %s\r\n", res.StatusCode, http.StatusText(res.StatusCode))
	res.Header.Del("Content-Length")
	res.Header.Write(buf)
	fmt.Fprintf(buf, "Content-Length: %d\r\n\r\n", length)
	buf.Write(body)
	buf.Flush()
}

// closedAddr is an address where nothing listens.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// bearerAuth makes a registry demand bearer tokens from its /token
// endpoint, which wants basic credentials, and counts the tokens it hands
// out.
type bearerAuth struct {
	user, pass, token string
	delay             time.Duration // before each token, so that logins overlap
	exchanges         atomic.Int64
}

func (a *bearerAuth) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			if u, p, ok := r.BasicAuth(); !ok || u != a.user || p != a.pass {
				http.Error(w, "bad credentials", http.StatusUnauthorized)
				return
			}
			a.exchanges.Add(1)
			time.Sleep(a.delay)
			json.NewEncoder(w).Encode(map[string]string{"token": a.token})
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+a.token {
			scheme := "http"
			if r.TLS != nil {
				scheme = "https"
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+scheme+`://`+r.Host+`/token",service="test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}`, http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// staticKeychain gives the credentials of each registry host it has, and
// anonymous access to the others.
type staticKeychain map[string]authn.AuthConfig

func (k staticKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.RegistryStr()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}

// repoKeychain gives the credentials of each repository (host/path) it
// has, and anonymous access to the others.
type repoKeychain map[string]authn.AuthConfig

func (k repoKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.String()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}

// fastRetry keeps tests quick: many attempts, millisecond backoff.
var fastRetry = WithRetry(10, time.Millisecond)
