package remote

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

// expiringAuth is a registry whose token server hands out tokens that
// serve uses requests each, to the one password it accepts now.
type expiringAuth struct {
	uses      int64
	challenge bool // answer an expired token with a WWW-Authenticate challenge

	mu        sync.Mutex
	pass      string
	tokens    map[string]int64 // requests left
	exchanges atomic.Int64
}

func (a *expiringAuth) setPassword(p string) { a.mu.Lock(); a.pass = p; a.mu.Unlock() }

// expireAfter makes the tokens handed out so far serve n more requests.
func (a *expiringAuth) expireAfter(n int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for tok := range a.tokens {
		a.tokens[tok] = n
	}
}

func (a *expiringAuth) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		if r.URL.Path == "/token" {
			defer a.mu.Unlock()
			if _, p, ok := r.BasicAuth(); !ok || p != a.pass {
				http.Error(w, "bad credentials", http.StatusUnauthorized)
				return
			}
			n := a.exchanges.Add(1)
			tok := fmt.Sprintf("tok-%d", n)
			a.tokens[tok] = a.uses
			json.NewEncoder(w).Encode(map[string]string{"token": tok})
			return
		}
		var tok string
		fmt.Sscanf(r.Header.Get("Authorization"), "Bearer %s", &tok)
		left, ok := a.tokens[tok]
		if ok && left > 0 {
			a.tokens[tok] = left - 1
		}
		a.mu.Unlock()
		if !ok || left <= 0 {
			if a.challenge || !ok {
				w.Header().Set("WWW-Authenticate", `Bearer realm="http://`+r.Host+`/token",service="test"`)
			}
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}`, http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// sourcesKeychain gives its credentials in order, moving to the next one
// when told the last was refused, as credentials.Keychain does.
type sourcesKeychain struct {
	cfgs    []authn.AuthConfig
	mu      sync.Mutex
	next    int
	refused atomic.Int64
}

func (k *sourcesKeychain) Resolve(authn.Resource) (authn.Authenticator, error) { return k, nil }

func (k *sourcesKeychain) Authorization() (*authn.AuthConfig, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := k.cfgs[k.next]
	return &c, nil
}

func (k *sourcesKeychain) Refused(context.Context) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.refused.Add(1)
	if k.next+1 < len(k.cfgs) {
		k.next++
		return true
	}
	return false
}

// readRanges reads blob in 64-byte ranges, each its own request.
func readRanges(t *testing.T, b *Blob, want []byte) {
	t.Helper()
	p := make([]byte, 64)
	for off := int64(0); off < int64(len(want)); off += 64 {
		n, err := b.ReadAt(t.Context(), p, off)
		if err != nil && (err != io.EOF || off+int64(n) != int64(len(want))) {
			t.Fatalf("ReadAt(%d): %v", off, err)
		}
		if string(p[:n]) != string(want[off:off+int64(n)]) {
			t.Fatalf("ReadAt(%d): wrong bytes", off)
		}
	}
}

func TestTokenExpiringMidReadIsRenewedOnce(t *testing.T) {
	for _, challenge := range []bool{true, false} {
		t.Run(fmt.Sprintf("challenge=%v", challenge), func(t *testing.T) {
			auth := &expiringAuth{uses: 1000, challenge: challenge, pass: "secret", tokens: map[string]int64{}}
			reg := newTestRegistry(t, auth.wrap)
			img := randomImage(t, 1024, 1)
			ref := reg.pushImage(t, "private/model:v1", img)
			// No retries: a renewal must be transparent, not a retry.
			c := New(WithRetry(1, 0), WithKeychain(staticKeychain{reg.host(): {Username: "alice", Password: "secret"}}))
			if _, err := c.Resolve(t.Context(), ref); err != nil {
				t.Fatal(err)
			}
			for d, want := range layerBlobs(t, img) {
				b, err := c.OpenBlob(t.Context(), reg.host()+"/private/model", d, int64(len(want)))
				if err != nil {
					t.Fatal(err)
				}
				before := auth.exchanges.Load()
				// The token runs out after 5 of the read's 16 requests.
				auth.expireAfter(5)
				readRanges(t, b, want)
				if n := auth.exchanges.Load() - before; n != 1 {
					t.Errorf("token exchanges during the read: %d, want exactly 1", n)
				}
			}
		})
	}
}

func TestRefusedCredentialMovesToTheNextSource(t *testing.T) {
	auth := &expiringAuth{uses: 10, challenge: true, pass: "plugin-secret", tokens: map[string]int64{}}
	reg := newTestRegistry(t, auth.wrap)
	img := randomImage(t, 1024, 1)
	ref := reg.pushImage(t, "private/model:v1", img)
	k := &sourcesKeychain{cfgs: []authn.AuthConfig{
		{Username: "kubelet", Password: "stale"},
		{Username: "plugin", Password: "plugin-secret"},
		{Username: "docker", Password: "rotated"},
	}}
	c := New(WithRetry(1, 0), WithKeychain(k))
	// At login: kubelet's stale password is refused by the token server.
	if _, err := c.Resolve(t.Context(), ref); err != nil {
		t.Fatalf("Resolve with a refused first credential: %v", err)
	}
	if n := k.refused.Load(); n != 1 {
		t.Fatalf("refusals: %d, want 1", n)
	}
	// In the middle of a read: the plugin's password is rotated away, the
	// token expires, and the renewal moves on to the docker config's.
	auth.setPassword("rotated")
	auth.expireAfter(5)
	for d, want := range layerBlobs(t, img) {
		b, err := c.OpenBlob(t.Context(), reg.host()+"/private/model", d, int64(len(want)))
		if err != nil {
			t.Fatal(err)
		}
		readRanges(t, b, want)
	}
	if n := k.refused.Load(); n != 2 {
		t.Fatalf("refusals: %d, want 2", n)
	}
}
