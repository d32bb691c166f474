package remote

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// fakeHosts is a pretend network for the tests of what the Client trusts:
// fake registry hosts are served over HTTPS by local servers with
// certificates of one test CA, which the Client's transport trusts.
type fakeHosts struct {
	net testutil.FakeNet
	ca  *testutil.CA
}

func newFakeHosts(t *testing.T) *fakeHosts {
	return &fakeHosts{ca: testutil.NewCA(t)}
}

// serveTLS serves h over HTTPS as hostport, a fake address.
func (f *fakeHosts) serveTLS(t *testing.T, hostport string, h http.Handler) *httptest.Server {
	t.Helper()
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		t.Fatal(err)
	}
	s := f.ca.StartTLS(t, h, nil, host, "localhost", "127.0.0.1")
	f.net.Route(hostport, s.Listener.Addr().String())
	return s
}

// serve serves h over plain HTTP as hostport, a fake address.
func (f *fakeHosts) serve(t *testing.T, hostport string, h http.Handler) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	f.net.Route(hostport, s.Listener.Addr().String())
	return s
}

// transport reaches the fake hosts and trusts the test CA.
func (f *fakeHosts) transport() *http.Transport {
	return &http.Transport{
		DialContext:        f.net.DialContext,
		TLSClientConfig:    &tls.Config{RootCAs: f.ca.Pool()},
		DisableCompression: true,
	}
}

// redirectBlobs answers every blob GET with a redirect to target followed
// by the digest, and counts them.
func redirectBlobs(h http.Handler, target string, gets *atomic.Int64) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if i := strings.Index(r.URL.Path, "/blobs/"); i >= 0 && r.Method == http.MethodGet {
			gets.Add(1)
			http.Redirect(w, r, target+r.URL.Path[i+len("/blobs/"):], http.StatusTemporaryRedirect)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// secretServer stands for a service that must never be read through a
// registry: instance metadata, a node-local admin API. It answers anything
// with a secret of size bytes, ranges included, and counts requests.
func secretServer(size int) (http.Handler, *atomic.Int64, []byte) {
	var hits atomic.Int64
	secret := bytes.Repeat([]byte("SECRET-"), size/7+1)[:size]
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(secret))
	}), &hits, secret
}

// TestRedirectToLocalServiceRefused: a registry that redirects a blob to a
// loopback or metadata address must not make that service's answer the
// blob's bytes.
func TestRedirectToLocalServiceRefused(t *testing.T) {
	f := newFakeHosts(t)
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 1)
	reg.pushImage(t, "models/llm:v1", img)
	d, data := anyBlob(t, img)

	secret, hits, secretBytes := secretServer(len(data))
	plainSecret := httptest.NewServer(secret)
	t.Cleanup(plainSecret.Close)
	tlsSecret := f.ca.StartTLS(t, secret, nil, "localhost", "127.0.0.1")
	_, tlsPort, _ := net.SplitHostPort(tlsSecret.Listener.Addr().String())

	for _, tc := range []struct{ name, target, named string }{
		{"plain HTTP to loopback", plainSecret.URL + "/", plainSecret.Listener.Addr().String()},
		{"HTTPS to loopback", "https://127.0.0.1:" + tlsPort + "/", "127.0.0.1:" + tlsPort},
		{"HTTPS to a name resolving to loopback", "https://localhost:" + tlsPort + "/", "localhost:" + tlsPort},
		{"metadata", "https://169.254.169.254/latest/meta-data/", "169.254.169.254"},
		{"link-local", "https://169.254.10.10/", "169.254.10.10"},
		{"IPv6 metadata", "https://[fd00:ec2::254]/latest/", "fd00:ec2::254"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var gets atomic.Int64
			host := "registry.test"
			f.serveTLS(t, host+":443", redirectBlobs(reg.handler, tc.target, &gets))
			hitsBefore := hits.Load()
			c := New(fastRetry, WithTransport(f.transport()))
			b, err := c.OpenBlob(t.Context(), host+"/models/llm", d, int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, len(data))
			n, err := b.ReadAt(t.Context(), buf, 0)
			if bytes.Contains(buf[:n], secretBytes[:7]) {
				t.Fatalf("the local service's answer was returned as the blob's bytes")
			}
			if n := hits.Load() - hitsBefore; n != 0 {
				t.Errorf("the local service was asked %d times", n)
			}
			if !errors.Is(err, ErrRedirectRefused) {
				t.Fatalf("ReadAt: %v, want ErrRedirectRefused", err)
			}
			t.Log(err)
			if msg := err.Error(); !strings.Contains(msg, host) || !strings.Contains(msg, tc.named) {
				t.Errorf("error %q does not name the registry %s and the target %s", msg, host, tc.named)
			}
			if n := gets.Load(); n != 1 {
				t.Errorf("refused redirect: %d blob GETs, want 1 (not retried)", n)
			}
		})
	}
}

// TestRedirectDowngradeRefused: a redirect from HTTPS to plain HTTP is not
// followed, to another host or to the registry's own, so neither the
// blob's bytes nor the registry's token cross the network in clear.
func TestRedirectDowngradeRefused(t *testing.T) {
	f := newFakeHosts(t)
	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-downgrade"}
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 1)
	reg.pushImage(t, "private/model:v1", img)
	d, data := anyBlob(t, img)

	// Plain-HTTP blob storage that would serve the right bytes.
	var storageReqs, storageAuth atomic.Int64
	storage := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		storageReqs.Add(1)
		if r.Header.Get("Authorization") != "" {
			storageAuth.Add(1)
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	})
	f.serve(t, "198.51.100.7:80", storage)
	f.serve(t, "registry.test:80", storage)
	kc := staticKeychain{"registry.test": {Username: "alice", Password: "secret"}}

	for _, tc := range []struct{ name, target string }{
		{"to another host", "http://198.51.100.7/"},
		{"to the registry's own host", "http://registry.test/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var gets atomic.Int64
			f.serveTLS(t, "registry.test:443", auth.wrap(redirectBlobs(reg.handler, tc.target, &gets)))
			before, authBefore := storageReqs.Load(), storageAuth.Load()
			c := New(fastRetry, WithKeychain(kc), WithTransport(f.transport()))
			err := readBlob(t.Context(), c, "registry.test/private/model", d, data)
			if n := storageAuth.Load() - authBefore; n != 0 {
				t.Errorf("the registry's token was sent over plain HTTP %d times", n)
			}
			if n := storageReqs.Load() - before; n != 0 {
				t.Errorf("%d plain-HTTP requests followed the redirect", n)
			}
			if !errors.Is(err, ErrRedirectRefused) || !strings.Contains(err.Error(), tc.target) {
				t.Fatalf("read: %v, want ErrRedirectRefused naming %s", err, tc.target)
			}
			t.Log(err)
			if n := gets.Load(); n != 1 {
				t.Errorf("refused redirect: %d blob GETs, want 1 (not retried)", n)
			}
		})
	}
}

// TestRedirectToStorageIsFollowed: a redirect over HTTPS to blob storage on
// another (here private) host is followed, without the registry's token.
func TestRedirectToStorageIsFollowed(t *testing.T) {
	f := newFakeHosts(t)
	auth := &bearerAuth{user: "alice", pass: "secret", token: "tok-storage"}
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 64<<10, 1)
	reg.pushImage(t, "private/model:v1", img)
	d, data := anyBlob(t, img)
	var storageReqs, storageAuth atomic.Int64
	f.serveTLS(t, "10.9.9.9:443", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		storageReqs.Add(1)
		if r.Header.Get("Authorization") != "" {
			storageAuth.Add(1)
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	var gets atomic.Int64
	f.serveTLS(t, "registry.test:443", auth.wrap(redirectBlobs(reg.handler, "https://10.9.9.9/", &gets)))

	kc := staticKeychain{"registry.test": {Username: "alice", Password: "secret"}}
	c := New(fastRetry, WithKeychain(kc), WithTransport(f.transport()))
	if err := readBlob(t.Context(), c, "registry.test/private/model", d, data); err != nil {
		t.Fatal(err)
	}
	if storageReqs.Load() == 0 {
		t.Fatal("the redirect to blob storage was not followed")
	}
	if n := storageAuth.Load(); n != 0 {
		t.Errorf("%d requests to the blob storage carried the registry's token", n)
	}
}

// TestPrivateRegistryIsHTTPS: a registry on a private address or a .local
// or .localhost name is spoken to over HTTPS; plain HTTP is never tried, so
// an impostor speaking plain HTTP there is not believed.
func TestPrivateRegistryIsHTTPS(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 2)
	reg.pushImage(t, "models/llm:v1", img)
	blobs := layerBlobs(t, img)
	for _, host := range []string{"10.1.2.3:5000", "192.168.7.7:5000", "models.localhost:5000", "registry.local:5000"} {
		t.Run(host, func(t *testing.T) {
			f := newFakeHosts(t)
			f.serveTLS(t, host, reg.handler)
			c := New(fastRetry, WithTransport(f.transport()))
			got, err := c.Resolve(t.Context(), host+"/models/llm:v1")
			if err != nil {
				t.Fatalf("Resolve over HTTPS: %v", err)
			}
			readEach(t, c, host+"/models/llm", blobs)
			if got.Digest != imageDigest(t, img) {
				t.Errorf("digest %s, want %s", got.Digest, imageDigest(t, img))
			}
			if n := f.net.PlainConns(host); n != 0 {
				t.Errorf("%d plain-HTTP connections to %s", n, host)
			}

			var impostorReqs atomic.Int64
			impostor := newFakeHosts(t)
			impostor.serve(t, host, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				impostorReqs.Add(1)
				reg.handler.ServeHTTP(w, r)
			}))
			c = New(WithRetry(2, time.Millisecond), WithTransport(impostor.transport()))
			if _, err := c.Resolve(t.Context(), host+"/models/llm:v1"); err == nil {
				t.Error("Resolve from a plain-HTTP impostor succeeded")
			}
			if n := impostor.net.PlainConns(host); n != 0 || impostorReqs.Load() != 0 {
				t.Errorf("%d plain-HTTP connections and %d requests to the impostor", n, impostorReqs.Load())
			}
		})
	}
}

// TestLoopbackIsPlainHTTP: loopback registries, as tests and `weightsnap
// mount` run them, need no configuration.
func TestLoopbackIsPlainHTTP(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 1)
	ref := reg.pushImage(t, "models/llm:v1", img)
	_, port, _ := net.SplitHostPort(reg.host())
	for _, host := range []string{reg.host(), "localhost:" + port} {
		ref := strings.Replace(ref, reg.host(), host, 1)
		if _, err := New(fastRetry).Resolve(t.Context(), ref); err != nil {
			t.Errorf("Resolve %s: %v", ref, err)
		}
	}
}

func TestScopeOf(t *testing.T) {
	for addr, want := range map[string]scope{
		"127.0.0.1":        loopback,
		"127.8.9.10":       loopback,
		"::1":              loopback,
		"::ffff:127.0.0.1": loopback,
		"0.0.0.0":          loopback,
		"::":               loopback,
		"169.254.1.2":      linkLocal,
		"fe80::1%eth0":     linkLocal,
		"169.254.169.254":  metadata,
		"fd00:ec2::254":    metadata,
		"10.1.2.3":         anywhere,
		"192.168.0.1":      anywhere,
		"fd00::1":          anywhere,
		"203.0.113.5":      anywhere,
		"2001:db8::1":      anywhere,
	} {
		if got := scopeOf(netip.MustParseAddr(addr)); got != want {
			t.Errorf("scopeOf(%s) = %q, want %q", addr, got, want)
		}
	}
}

// TestGuardDial: a host other than the endpoint's is dialled only by the
// addresses it resolves to, and only if none is one the endpoint may not
// send the Client to.
func TestGuardDial(t *testing.T) {
	names := map[string][]string{
		"storage.test":   {"10.9.9.9"},
		"rebind.test":    {"203.0.113.5", "127.0.0.1"},
		"meta.test":      {"169.254.169.254"},
		"mapped.test":    {"::ffff:127.0.0.1"},
		"linklocal.test": {"fe80::1"},
	}
	lookup := func(_ context.Context, _, host string) ([]netip.Addr, error) {
		var ips []netip.Addr
		for _, a := range names[host] {
			ips = append(ips, netip.MustParseAddr(a))
		}
		return ips, nil
	}
	for _, tc := range []struct {
		registry, addr string
		want           string // the address dialled; empty: refused
	}{
		{"registry.test", "registry.test:443", "registry.test:443"},
		{"registry.test", "storage.test:443", "10.9.9.9:443"},
		{"registry.test", "rebind.test:443", ""},
		{"registry.test", "meta.test:80", ""},
		{"registry.test", "mapped.test:80", ""},
		{"registry.test", "linklocal.test:80", ""},
		{"registry.test", "127.0.0.1:80", ""},
		{"127.0.0.1:5000", "127.0.0.1:6000", "127.0.0.1:6000"},
		{"127.0.0.1:5000", "mapped.test:80", "127.0.0.1:80"},
		{"127.0.0.1:5000", "meta.test:80", ""},
		{"localhost:5000", "127.0.0.2:80", "127.0.0.2:80"},
	} {
		g := newGuard(tc.registry)
		g.lookup = lookup
		var dialled string
		dial := g.dial(func(_ context.Context, _, addr string) (net.Conn, error) {
			dialled = addr
			return nil, nil
		})
		_, err := dial(t.Context(), "tcp", tc.addr)
		switch {
		case tc.want == "" && !errors.Is(err, ErrRedirectRefused):
			t.Errorf("registry %s, dial %s: dialled %q, err %v; want refused", tc.registry, tc.addr, dialled, err)
		case tc.want != "" && (err != nil || dialled != tc.want):
			t.Errorf("registry %s, dial %s: dialled %q, err %v; want %s", tc.registry, tc.addr, dialled, err, tc.want)
		}
	}
}

// TestEndpointTLS: an endpoint's own TLS configuration is used for it, and
// an equal configuration given again (hosts.toml is read for each blob)
// keeps the host's connections.
func TestEndpointTLS(t *testing.T) {
	reg := newTestRegistry(t, nil)
	img := randomImage(t, 4096, 3)
	reg.pushImage(t, "models/llm:v1", img)
	blobs := layerBlobs(t, img)
	ca := testutil.NewCA(t)
	mirror := ca.StartTLS(t, reg.handler, nil, "127.0.0.1")
	mirrorHost := strings.TrimPrefix(mirror.URL, "https://")
	var tlsConfig func() *tls.Config
	opt := WithMirrors(func(string) []Endpoint {
		return []Endpoint{{Host: mirrorHost, Scheme: "https", TLS: tlsConfig()}}
	})
	var dials testutil.FakeNet // nothing routed: it only counts
	c := New(fastRetry, opt, WithTransport(&http.Transport{DialContext: dials.DialContext}))

	tlsConfig = func() *tls.Config { return &tls.Config{RootCAs: ca.Pool()} }
	readEach(t, c, reg.host()+"/models/llm", blobs)
	if n := dials.Dials(mirrorHost); n != 1 {
		t.Errorf("%d blobs read one at a time: %d connections, want 1", len(blobs), n)
	}

	tlsConfig = func() *tls.Config { return &tls.Config{RootCAs: testutil.NewCA(t).Pool()} }
	d, data := anyBlob(t, img)
	if err := readBlob(t.Context(), c, reg.host()+"/models/llm", d, data); !errors.As(err, new(*tls.CertificateVerificationError)) {
		t.Errorf("read with another CA: %v, want a certificate verification error", err)
	}
}
