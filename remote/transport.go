package remote

import (
	"bytes"
	"crypto/tls"
	"net"
	"net/http"
	"slices"
	"time"
)

// Each endpoint host has a transport of its own: a clone of the template
// (WithTransport) with the host's TLS configuration (hosts.toml "ca",
// "client", "skip_verify") and its guard on every dial. The mirrors are
// asked again for each image and blob, so that hosts.toml edits apply
// without a restart; a host keeps its transport, and its connections,
// until its TLS configuration really changes.

// RoundTrip sends req with the host's current transport.
func (h *hostState) RoundTrip(req *http.Request) (*http.Response, error) {
	return h.tr.Load().RoundTrip(req)
}

// configure makes the host's transport use cfg (nil: the template's TLS
// configuration), replacing the transport only if cfg differs from the
// configuration it was made for.
func (h *hostState) configure(template *http.Transport, cfg *tls.Config) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.tr.Load() != nil && sameTLS(h.tlsConfig, cfg) {
		return
	}
	tr := template.Clone()
	if cfg != nil {
		cfg = cfg.Clone()
		tr.TLSClientConfig = cfg.Clone() // the transport adds its ALPN protocols to its own
	}
	dial := tr.DialContext
	if dial == nil {
		dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	// Every connection goes through the guard, TLS ones included.
	tr.DialContext = h.guard.dial(dial)
	tr.DialTLSContext = nil
	tr.DialTLS = nil
	tr.Proxy = h.guard.proxy(tr.Proxy)
	h.tlsConfig = cfg
	if old := h.tr.Swap(tr); old != nil {
		old.CloseIdleConnections()
	}
}

// sameTLS reports whether a and b configure what hosts.toml can: the roots,
// the client certificates, verification and the server name.
func sameTLS(a, b *tls.Config) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.InsecureSkipVerify == b.InsecureSkipVerify &&
		a.ServerName == b.ServerName &&
		a.RootCAs.Equal(b.RootCAs) &&
		slices.EqualFunc(a.Certificates, b.Certificates, func(x, y tls.Certificate) bool {
			return slices.EqualFunc(x.Certificate, y.Certificate, bytes.Equal)
		})
}

// newTransport is the default template: keep-alive connections tuned for
// many parallel range requests to few hosts.
func newTransport() *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Range responses must arrive byte for byte as stored; Go would
		// otherwise ask for gzip and decompress transparently.
		DisableCompression: true,
	}
}
