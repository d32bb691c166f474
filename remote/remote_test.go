package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightsnap/weightsnap/metrics"
)

func TestResolveByTagAndDigest(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 200<<10, 3)
	ref := reg.pushImage(t, "models/llm:v1", img)
	want := imageDigest(t, img)
	blobs := layerBlobs(t, img)
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}

	c := New(fastRetry)
	for _, r := range []string{ref, strings.TrimSuffix(ref, ":v1") + "@" + want.String()} {
		got, err := c.Resolve(t.Context(), r)
		if err != nil {
			t.Fatalf("Resolve(%s): %v", r, err)
		}
		if got.Digest != want {
			t.Errorf("Resolve(%s).Digest = %s, want %s", r, got.Digest, want)
		}
		if got.Config == nil || len(got.Config.RootFS.DiffIDs) != 3 || got.Config.RootFS.DiffIDs[0] != cfg.RootFS.DiffIDs[0] {
			t.Fatalf("Resolve(%s).Config = %+v, want %+v", r, got.Config, cfg)
		}
		if len(got.Layers) != 3 {
			t.Fatalf("Resolve(%s): %d layers, want 3", r, len(got.Layers))
		}
		for i, l := range got.Layers {
			if l.Digest != digest.Digest(got.Manifest.Layers[i].Digest.String()) || l.Blob.Digest() != l.Digest {
				t.Errorf("layer %d: digest %s, blob %s, manifest %s", i, l.Digest, l.Blob.Digest(), got.Manifest.Layers[i].Digest)
			}
			if l.DiffID != digest.Digest(cfg.RootFS.DiffIDs[i].String()) {
				t.Errorf("layer %d: DiffID %s, want %s", i, l.DiffID, cfg.RootFS.DiffIDs[i])
			}
			data, ok := blobs[l.Digest]
			if !ok || l.Size != int64(len(data)) || l.Blob.Size() != l.Size {
				t.Fatalf("layer %d: %s of %d bytes not among the pushed layers", i, l.Digest, l.Size)
			}
		}
	}
}

func TestReadAtAndOpen(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 1<<20, 1)
	ref := reg.pushImage(t, "models/weights:v1", img)
	c := New(fastRetry)
	got, err := c.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	l := got.Layers[0]
	want := layerBlobs(t, img)[l.Digest]

	before := reg.conns.Load()
	rng := rand.New(rand.NewPCG(1, 2))
	checkRandomReads(t, l.Blob, want, 50, rng)
	// Sequential reads must reuse a kept-alive connection.
	if n := reg.conns.Load() - before; n > 5 {
		t.Errorf("50 sequential reads opened %d connections; keep-alive is not working", n)
	}
	for _, off := range []int64{0, 1, int64(len(want)) / 3, int64(len(want)) - 1, int64(len(want))} {
		checkOpen(t, l.Blob, want, off)
	}
	if l.Blob.RangeIgnored() {
		t.Error("RangeIgnored() on a registry that honours Range")
	}
	// OpenRange reads exactly its range, in one request.
	for _, r := range [][2]int64{{0, 1}, {1, int64(len(want)) / 2}, {int64(len(want)) - 100, 100}, {int64(len(want)), 0}} {
		rc, err := l.Blob.OpenRange(t.Context(), r[0], r[1])
		if err != nil {
			t.Fatalf("OpenRange(%d, %d): %v", r[0], r[1], err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, want[r[0]:r[0]+r[1]]) {
			t.Fatalf("OpenRange(%d, %d): %d bytes, %v; want the blob's %d", r[0], r[1], len(got), err, r[1])
		}
	}
	if _, err := l.Blob.OpenRange(t.Context(), int64(len(want))-1, 2); err == nil {
		t.Error("OpenRange past the blob's end: no error")
	}

	// Concurrent readers of one blob.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			checkRandomReads(t, l.Blob, want, 10, rand.New(rand.NewPCG(uint64(i), 7)))
		})
	}
	wg.Wait()

	// OpenBlob finds the same bytes, asking for the size when not given.
	b, err := c.OpenBlob(t.Context(), reg.host()+"/models/weights", l.Digest, -1)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size() != int64(len(want)) {
		t.Fatalf("OpenBlob size = %d, want %d", b.Size(), len(want))
	}
	checkRandomReads(t, b, want, 5, rng)
}

func TestResolveIndexChoosesPlatform(t *testing.T) {
	reg := newTestRegistry(t, nil)
	host := v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	other := v1.Platform{OS: "linux", Architecture: "riscv64"}
	if host.Architecture == other.Architecture {
		other.Architecture = "s390x"
	}
	hostImg, otherImg := randomImage(t, 1024, 1), randomImage(t, 1024, 1)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: otherImg, Descriptor: v1.Descriptor{Platform: &other}},
		mutate.IndexAddendum{Add: hostImg, Descriptor: v1.Descriptor{Platform: &host}},
	)
	ref := reg.pushIndex(t, "multi/arch:latest", idx)

	got, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if want := imageDigest(t, hostImg); got.Digest != want {
		t.Errorf("host platform: digest %s, want %s", got.Digest, want)
	}
	got, err = New(fastRetry, WithPlatform(other)).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if want := imageDigest(t, otherImg); got.Digest != want {
		t.Errorf("platform %v: digest %s, want %s", other, got.Digest, want)
	}
	_, err = New(fastRetry, WithPlatform(v1.Platform{OS: "plan9", Architecture: "386"})).Resolve(t.Context(), ref)
	if !errors.Is(err, ErrImageNotFound) || !strings.Contains(err.Error(), "plan9/386") {
		t.Errorf("missing platform: %v, want ErrImageNotFound naming plan9/386", err)
	}
}

func TestNotFound(t *testing.T) {
	reg := newTestRegistry(t, nil)
	ref := reg.pushImage(t, "present/image:v1", randomImage(t, 1024, 1))

	c := New(fastRetry)
	_, err := c.Resolve(t.Context(), strings.TrimSuffix(ref, ":v1")+":nope")
	if !errors.Is(err, ErrImageNotFound) || !strings.Contains(err.Error(), "image not found") {
		t.Errorf("missing tag: %v, want ErrImageNotFound", err)
	}
	_, err = c.Resolve(t.Context(), reg.host()+"/absent/repo:v1")
	if !errors.Is(err, ErrImageNotFound) {
		t.Errorf("missing repo: %v, want ErrImageNotFound", err)
	}

	missing := digest.FromString("not pushed")
	b, err := c.OpenBlob(t.Context(), reg.host()+"/present/image", missing, 100)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.ReadAt(t.Context(), make([]byte, 10), 0); !errors.Is(err, ErrBlobNotFound) || !strings.Contains(err.Error(), "blob not found") {
		t.Errorf("ReadAt of a missing blob: %v, want ErrBlobNotFound", err)
	}
	if _, err := b.Open(t.Context(), 0); !errors.Is(err, ErrBlobNotFound) {
		t.Errorf("Open of a missing blob: %v, want ErrBlobNotFound", err)
	}
	if _, err := c.OpenBlob(t.Context(), reg.host()+"/present/image", missing, -1); !errors.Is(err, ErrBlobNotFound) {
		t.Errorf("OpenBlob(size -1) of a missing blob: %v, want ErrBlobNotFound", err)
	}
}

func TestFaultsAreRetried(t *testing.T) {
	f := &faults{every: 12, seen: map[string]int{}}
	reg := newTestRegistry(t, func(h http.Handler) http.Handler { f.inner = h; return f })
	img := randomImage(t, 512<<10, 2)
	ref := reg.pushImage(t, "flaky/model:v1", img)
	blobs := layerBlobs(t, img)
	retriesBefore := testutil.ToFloat64(metrics.RegistryRequests.WithLabelValues("retry"))
	bytesBefore := testutil.ToFloat64(metrics.RegistryBytes.WithLabelValues("background"))

	got, err := New(fastRetry, WithStallTimeout(150*time.Millisecond)).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatalf("Resolve through faults: %v", err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, l := range got.Layers {
		checkRandomReads(t, l.Blob, blobs[l.Digest], 60, rng)
	}
	ctx := WithReason(t.Context(), "background")
	for _, l := range got.Layers {
		for _, off := range []int64{0, l.Size / 2} {
			rc, err := l.Blob.Open(ctx, off)
			if err != nil {
				t.Fatalf("Open(%d): %v", off, err)
			}
			// Small reads make many requests' bodies cross faults mid-body.
			data, err := io.ReadAll(io.LimitReader(rc, l.Size))
			rc.Close()
			if err != nil {
				t.Fatalf("Open(%d) read: %v", off, err)
			}
			if string(data) != string(blobs[l.Digest][off:]) {
				t.Fatalf("Open(%d) of %s: wrong bytes", off, l.Digest)
			}
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range faultKinds {
		if f.seen[k] == 0 {
			t.Errorf("fault %q was never injected (%d requests); the test does not cover it", k, f.n.Load())
		}
	}
	if d := testutil.ToFloat64(metrics.RegistryRequests.WithLabelValues("retry")) - retriesBefore; d == 0 {
		t.Error("no retries counted in metrics")
	}
	if d := testutil.ToFloat64(metrics.RegistryBytes.WithLabelValues("background")) - bytesBefore; d < float64(len(blobs)) {
		t.Errorf("registry bytes for reason background grew by %v", d)
	}
}

func TestRangeIgnored(t *testing.T) {
	reg := newTestRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			r.Header.Del("Range")
			h.ServeHTTP(w, r)
		})
	})
	img := randomImage(t, 256<<10, 1)
	ref := reg.pushImage(t, "norange/model:v1", img)
	got, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	l := got.Layers[0]
	want := layerBlobs(t, img)[l.Digest]
	checkRandomReads(t, l.Blob, want, 20, rand.New(rand.NewPCG(5, 6)))
	checkOpen(t, l.Blob, want, int64(len(want))/2)
	checkOpen(t, l.Blob, want, 0)
	if !l.Blob.RangeIgnored() {
		t.Error("RangeIgnored() = false on a registry that ignores Range")
	}
}

func TestBadContentRange(t *testing.T) {
	reg := newTestRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// Answer reads past the start (not the config's) with the
			// range one byte later than asked.
			var first, last int64
			if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &first, &last); err == nil && first > 0 {
				r.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", first+1, last+1))
			}
			h.ServeHTTP(w, r)
		})
	})
	img := randomImage(t, 4096, 1)
	ref := reg.pushImage(t, "bad/range:v1", img)
	got, err := New(fastRetry).Resolve(t.Context(), strings.TrimSuffix(ref, ":v1")+"@"+imageDigest(t, img).String())
	if err != nil {
		t.Fatal(err)
	}
	_, err = got.Layers[0].Blob.ReadAt(t.Context(), make([]byte, 100), 10)
	if !errors.Is(err, ErrBadResponse) {
		t.Errorf("ReadAt with a wrong Content-Range: %v, want ErrBadResponse", err)
	}
}

func TestCancelReturnsPromptly(t *testing.T) {
	started := make(chan string, 10)
	img := randomImage(t, 1024, 1)
	var layer digest.Digest
	for d := range layerBlobs(t, img) {
		layer = d
	}
	reg := newTestRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !strings.HasSuffix(r.URL.Path, "/blobs/"+layer.String()) || r.Method != http.MethodGet {
				h.ServeHTTP(w, r)
				return
			}
			switch r.Header.Get("Range") {
			case "bytes=0-9": // hang
				started <- "hang"
				<-r.Context().Done()
			default: // ask to come back much later
				w.Header().Set("Retry-After", "3600")
				w.WriteHeader(http.StatusServiceUnavailable)
				started <- "busy"
			}
		})
	})
	ref := reg.pushImage(t, "slow/model:v1", img)
	got, err := New(fastRetry).Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	b := got.Layers[0].Blob
	for _, tc := range []struct {
		name string
		off  int64
	}{{"hang", 0}, {"busy", 5}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error, 1)
			go func() {
				_, err := b.ReadAt(ctx, make([]byte, 10), tc.off)
				done <- err
			}()
			if s := <-started; s != tc.name {
				t.Fatalf("server saw %q, want %q", s, tc.name)
			}
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("ReadAt after cancel: %v, want context.Canceled", err)
			}
		})
	}
}

func TestCheckContentRange(t *testing.T) {
	for _, tc := range []struct {
		v          string
		first, end int64
		ok         bool
	}{
		{"bytes 0-9/100", 0, 9, true},
		{"bytes 10-19/*", 10, 19, true},
		{"bytes 11-20/100", 10, 19, false},
		{"bytes 10-18/100", 10, 19, false},
		{"bytes 10-19/99", 10, 19, false},
		{"10-19/100", 10, 19, false},
		{"", 10, 19, false},
	} {
		if err := checkContentRange(tc.v, tc.first, tc.end, 100); (err == nil) != tc.ok {
			t.Errorf("checkContentRange(%q, %d, %d) = %v, want ok=%v", tc.v, tc.first, tc.end, err, tc.ok)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	if d := retryAfter("0"); d != 0 {
		t.Errorf("Retry-After 0 = %v", d)
	}
	if d := retryAfter("7"); d != 7*time.Second {
		t.Errorf("Retry-After 7 = %v", d)
	}
	if d := retryAfter("99999"); d != maxBackoff {
		t.Errorf("Retry-After 99999 = %v, want the cap %v", d, maxBackoff)
	}
	if d := retryAfter(""); d >= 0 {
		t.Errorf("no Retry-After = %v, want < 0", d)
	}
	if d := retryAfter(time.Now().Add(time.Hour).UTC().Format(http.TimeFormat)); d != maxBackoff {
		t.Errorf("Retry-After date = %v, want the cap", d)
	}
}

// A registry that dribbles its bytes (each one in time to beat the stall
// timeout) loses the request to the minimum rate: the read fails after
// its attempts instead of holding a worker for as long as it likes, and
// the dribble does not count as progress that restarts the attempts.
func TestDribblingRegistryIsCutOff(t *testing.T) {
	var gets atomic.Int32
	img := randomImage(t, 64<<10, 1)
	ls, _ := img.Layers()
	slow, _ := ls[0].Digest()
	reg := newTestRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+slow.String()) {
				h.ServeHTTP(w, r)
				return
			}
			gets.Add(1)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			for _, b := range rec.Body.Bytes() {
				if _, err := w.Write([]byte{b}); err != nil {
					return
				}
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		})
	})
	ref := reg.pushImage(t, "slow/model:v1", img)
	c := New(WithRetry(3, time.Millisecond), WithStallTimeout(100*time.Millisecond), WithMinRate(64<<10))
	got, err := c.Resolve(t.Context(), ref)
	if err != nil {
		t.Fatal(err)
	}
	l := got.Layers[0]
	_, err = l.Blob.ReadAt(t.Context(), make([]byte, 32<<10), 0)
	if !errors.Is(err, errTooSlow) {
		t.Fatalf("read from a dribbling registry: %v, want errTooSlow", err)
	}
	if n := gets.Load(); n != 3 {
		t.Fatalf("%d blob GETs, want the 3 attempts", n)
	}
}
