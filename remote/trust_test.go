package remote

import (
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
