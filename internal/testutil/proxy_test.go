package testutil

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
	"slices"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// inProcessRegistry serves go-containerregistry's registry, so the proxy's
// tests need no docker-registry binary, and returns its host:port.
func inProcessRegistry(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// pushRandomBlob uploads size random bytes as a blob of repo and returns them
// with their digest.
func pushRandomBlob(t *testing.T, addr, repo string, size int) ([]byte, string) {
	t.Helper()
	b := make([]byte, size)
	_, _ = rand.NewChaCha8([32]byte{byte(size)}).Read(b)
	r, err := name.NewRepository(addr+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteLayer(r, static.NewLayer(b, types.OCILayer), remote.WithContext(t.Context())); err != nil {
		t.Fatalf("push blob: %v", err)
	}
	return b, sha256Digest(b)
}

type fetchResult struct {
	status     int
	header     http.Header
	body       []byte
	err        error // from the request or from reading the body
	bodyLength int64
}

// fetch GETs (or HEADs) a blob with an optional Range header.
func fetch(ctx context.Context, method, url, rng string) fetchResult {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return fetchResult{err: err}
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fetchResult{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return fetchResult{status: resp.StatusCode, header: resp.Header, body: body, err: err, bodyLength: resp.ContentLength}
}

func blobURL(p *Proxy, repo, digest string) string {
	return fmt.Sprintf("%s/v2/%s/blobs/%s", p.URL(), repo, digest)
}

func TestProxyCountsBlobBytes(t *testing.T) {
	addr := inProcessRegistry(t)
	blob, digest := pushRandomBlob(t, addr, "count", 300_001)
	p := StartProxy(t, addr, Faults{})
	url := blobURL(p, "count", digest)

	res := fetch(t.Context(), http.MethodGet, url, "")
	if res.err != nil || res.status != http.StatusOK || !bytes.Equal(res.body, blob) {
		t.Fatalf("full GET: status %d, %d bytes, err %v", res.status, len(res.body), res.err)
	}
	if got := p.BlobBytes(digest); got != int64(len(blob)) {
		t.Errorf("after a full GET: BlobBytes %d, want %d", got, len(blob))
	}
	res = fetch(t.Context(), http.MethodGet, url, "bytes=100-199")
	if res.err != nil || res.status != http.StatusPartialContent || !bytes.Equal(res.body, blob[100:200]) {
		t.Fatalf("range GET: status %d, %d bytes, err %v", res.status, len(res.body), res.err)
	}
	if res := fetch(t.Context(), http.MethodHead, url, ""); res.status != http.StatusOK || res.bodyLength != int64(len(blob)) {
		t.Errorf("HEAD: status %d, Content-Length %d", res.status, res.bodyLength)
	}
	if res := fetch(t.Context(), http.MethodGet, p.URL()+"/v2/", ""); res.status != http.StatusOK {
		t.Errorf("GET /v2/: status %d", res.status)
	}

	want := int64(len(blob) + 100)
	if got := p.BlobBytes(digest); got != want {
		t.Errorf("BlobBytes %d, want %d", got, want)
	}
	if got := p.TotalBlobBytes(); got != want {
		t.Errorf("TotalBlobBytes %d, want %d", got, want)
	}
	if got := p.BlobBytes("sha256:0000"); got != 0 {
		t.Errorf("BlobBytes of another blob: %d", got)
	}
	if got := p.Requests(); got != 4 {
		t.Errorf("Requests %d, want 4", got)
	}
	if got := p.BlobRequests(); got != 2 {
		t.Errorf("BlobRequests %d, want 2", got)
	}
	p.Reset()
	if p.BlobBytes(digest) != 0 || p.TotalBlobBytes() != 0 || p.Requests() != 0 || p.BlobRequests() != 0 {
		t.Error("Reset left counters non-zero")
	}
}

func TestProxyFaults(t *testing.T) {
	addr := inProcessRegistry(t)
	blob, digest := pushRandomBlob(t, addr, "faults", 200_000)

	t.Run("fail", func(t *testing.T) {
		p := StartProxy(t, addr, Faults{FailRate: 1})
		if res := fetch(t.Context(), http.MethodGet, blobURL(p, "faults", digest), ""); res.status != http.StatusInternalServerError {
			t.Errorf("status %d, want 500", res.status)
		}
		// Only blob GETs are faulted.
		if res := fetch(t.Context(), http.MethodHead, blobURL(p, "faults", digest), ""); res.status != http.StatusOK {
			t.Errorf("HEAD status %d, want 200", res.status)
		}
	})
	t.Run("too many", func(t *testing.T) {
		p := StartProxy(t, addr, Faults{TooManyRate: 1})
		res := fetch(t.Context(), http.MethodGet, blobURL(p, "faults", digest), "")
		if res.status != http.StatusTooManyRequests || res.header.Get("Retry-After") != "0" {
			t.Errorf("status %d, Retry-After %q; want 429, 0", res.status, res.header.Get("Retry-After"))
		}
	})
	t.Run("reset", func(t *testing.T) {
		p := StartProxy(t, addr, Faults{ResetRate: 1})
		res := fetch(t.Context(), http.MethodGet, blobURL(p, "faults", digest), "")
		if res.status != http.StatusOK || !errors.Is(res.err, io.ErrUnexpectedEOF) {
			t.Errorf("status %d, err %v; want 200 and an unexpected EOF", res.status, res.err)
		}
		if len(res.body) != len(blob)/2 || !bytes.Equal(res.body, blob[:len(blob)/2]) {
			t.Errorf("got %d body bytes before the reset, want the first %d", len(res.body), len(blob)/2)
		}
		if got := p.BlobBytes(digest); got != int64(len(blob)/2) {
			t.Errorf("BlobBytes %d, want %d", got, len(blob)/2)
		}
	})
	t.Run("stall", func(t *testing.T) {
		p := StartProxy(t, addr, Faults{StallRate: 1})
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		res := fetch(ctx, http.MethodGet, blobURL(p, "faults", digest), "")
		if !errors.Is(res.err, context.DeadlineExceeded) {
			t.Errorf("status %d, err %v; want the client's deadline", res.status, res.err)
		}
		if got := p.BlobBytes(digest); got != 0 {
			t.Errorf("BlobBytes %d, want 0", got)
		}
	})
	t.Run("corrupt", func(t *testing.T) {
		p := StartProxy(t, addr, Faults{CorruptDigest: digest})
		res := fetch(t.Context(), http.MethodGet, blobURL(p, "faults", digest), "bytes=1000-1999")
		if res.err != nil || len(res.body) != 1000 {
			t.Fatalf("status %d, %d bytes, err %v", res.status, len(res.body), res.err)
		}
		for i, b := range res.body {
			if b != ^blob[1000+i] {
				t.Fatalf("byte %d not inverted", 1000+i)
			}
		}
	})
	t.Run("invalid rates", func(t *testing.T) {
		p := StartProxy(t, addr, Faults{})
		if err := p.SetFaults(Faults{FailRate: 0.6, ResetRate: 0.6}); err == nil {
			t.Error("rates adding up to 1.2 accepted")
		}
		if err := p.SetFaults(Faults{StallRate: -0.1}); err == nil {
			t.Error("negative rate accepted")
		}
	})
}

// TestProxyRetryingClientSucceeds fetches a blob through every kind of fault
// with a simple retrying client, as the fetcher under test will.
func TestProxyRetryingClientSucceeds(t *testing.T) {
	addr := inProcessRegistry(t)
	blob, digest := pushRandomBlob(t, addr, "retry", 100_000)
	p := StartProxy(t, addr, Faults{FailRate: 0.15, TooManyRate: 0.15, ResetRate: 0.15, StallRate: 0.1, Seed: 42})

	const fetches, maxAttempts = 5, 200
	attempts := 0
	for range fetches {
		var got []byte
		for got == nil {
			attempts++
			if attempts > maxAttempts {
				t.Fatalf("no success after %d attempts", maxAttempts)
			}
			// The timeout is how the client gives up on a stalled request.
			ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
			res := fetch(ctx, http.MethodGet, blobURL(p, "retry", digest), "")
			cancel()
			if res.err == nil && res.status == http.StatusOK {
				got = res.body
			}
		}
		if !bytes.Equal(got, blob) {
			t.Fatal("fetched blob differs")
		}
	}
	if attempts == fetches {
		t.Errorf("%d fetches took no retries: no fault was injected", fetches)
	}
	if got := p.BlobRequests(); got != int64(attempts) {
		t.Errorf("BlobRequests %d, want %d attempts", got, attempts)
	}
	if got := p.BlobBytes(digest); got < int64(fetches*len(blob)) {
		t.Errorf("BlobBytes %d, less than %d full fetches", got, fetches)
	}
	t.Logf("%d attempts for %d fetches", attempts, fetches)
}

func TestProxyHoldsBlobBytesUntilReleased(t *testing.T) {
	addr := inProcessRegistry(t)
	blob, digest := pushRandomBlob(t, addr, "hold", 200_000)
	p := StartProxy(t, addr, Faults{})
	release := p.Hold(digest, 50_000, 150_000)
	url := blobURL(p, "hold", digest)

	// A range ending before the hold is not affected.
	if r := fetch(t.Context(), http.MethodGet, url, "bytes=0-49999"); r.err != nil || !bytes.Equal(r.body, blob[:50_000]) {
		t.Fatalf("range before the hold: err %v, %d bytes", r.err, len(r.body))
	}

	// So is one starting after it.
	if r := fetch(t.Context(), http.MethodGet, url, "bytes=150000-199999"); r.err != nil || !bytes.Equal(r.body, blob[150_000:]) {
		t.Fatalf("range after the hold: err %v, %d bytes", r.err, len(r.body))
	}

	// A full GET delivers the head and then blocks: read exactly the head,
	// check it, and only then release.
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	head := make([]byte, 50_000)
	if _, err := io.ReadFull(resp.Body, head); err != nil || !bytes.Equal(head, blob[:50_000]) {
		t.Fatalf("held GET: head: err %v", err)
	}
	if got := p.BlobBytes(digest); got != 150_000 {
		t.Fatalf("blob bytes sent while held: got %d, want 150000 (two heads and the tail)", got)
	}
	if !p.Sent(digest, 0, 50_000) || !p.Sent(digest, 150_000, 200_000) {
		t.Error("Sent: the head or the tail, both sent, reported missing")
	}
	if p.Sent(digest, 0, 50_001) || p.Sent(digest, 149_999, 150_000) || p.Sent(digest, 0, 200_000) {
		t.Error("Sent: a held byte reported sent")
	}
	release()
	rest, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(rest, blob[50_000:]) {
		t.Fatalf("held GET after release: err %v, %d bytes", err, len(rest))
	}
	if !p.Sent(digest, 0, 200_000) {
		t.Error("Sent: after the release, not every byte reported sent")
	}
	release() // idempotent
}

// TestProxyHeldCountsWaitingResponses: Held counts a response while it
// waits at the hold, and no longer once its client went away.
func TestProxyHeldCountsWaitingResponses(t *testing.T) {
	addr := inProcessRegistry(t)
	blob, digest := pushRandomBlob(t, addr, "held", 100_000)
	p := StartProxy(t, addr, Faults{})
	release := p.Hold(digest, 10_000, 20_000)
	defer release()
	if got := p.Held(digest); got != 0 {
		t.Fatalf("Held before any request = %d, want 0", got)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, blobURL(p, "held", digest), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	head := make([]byte, 10_000)
	if _, err := io.ReadFull(resp.Body, head); err != nil || !bytes.Equal(head, blob[:10_000]) {
		t.Fatalf("held GET: head: err %v", err)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// The head is flushed before the proxy counts the response as
	// waiting: poll.
	waitFor("the response to wait at the hold", func() bool { return p.Held(digest) == 1 })
	cancel()
	waitFor("the held response to end after its client went away", func() bool { return p.Held(digest) == 0 })
	if got := p.BlobBytes(digest); got != 10_000 {
		t.Errorf("blob bytes sent = %d, want the 10000 before the hold", got)
	}
}

func TestProxyCountsInjectedFaults(t *testing.T) {
	addr := inProcessRegistry(t)
	_, digest := pushRandomBlob(t, addr, "count-faults", 1000)
	p := StartProxy(t, addr, Faults{FailRate: 1})
	for range 3 {
		if r := fetch(t.Context(), http.MethodGet, blobURL(p, "count-faults", digest), ""); r.status != http.StatusInternalServerError {
			t.Fatalf("status %d, want 500", r.status)
		}
	}
	if got := p.InjectedFaults(); got != 3 {
		t.Fatalf("InjectedFaults = %d, want 3", got)
	}
}

func TestByteRanges(t *testing.T) {
	var r byteRanges
	for _, x := range [][2]int64{{10, 20}, {30, 40}, {20, 25}, {50, 50}, {5, 12}, {38, 45}} {
		r = r.add(x[0], x[1])
	}
	want := byteRanges{{5, 25}, {30, 45}}
	if !slices.Equal(r, want) {
		t.Fatalf("ranges %v, want %v", r, want)
	}
	for _, c := range []struct {
		off, end int64
		want     bool
	}{
		{5, 25, true}, {6, 7, true}, {30, 45, true}, {7, 7, true},
		{4, 6, false}, {24, 26, false}, {20, 31, false}, {45, 46, false},
	} {
		if got := r.cover(c.off, c.end); got != c.want {
			t.Errorf("cover(%d, %d) = %v, want %v", c.off, c.end, got, c.want)
		}
	}
	if r = r.add(25, 30); !slices.Equal(r, byteRanges{{5, 45}}) {
		t.Errorf("filling the gap: %v, want [[5 45]]", r)
	}
}
