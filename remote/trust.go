package remote

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
)

// What the Client trusts of the network. A registry decides where a blob
// is read from (a redirect, often to a storage service) and where tokens
// come from (the realm of its challenge). Neither may take the Client from
// HTTPS to plain HTTP, nor to this machine's own services (loopback), the
// link-local network or the cloud's instance metadata, whose answers would
// otherwise become file content in a pod. An endpoint that is itself on
// such an address, as a test registry on 127.0.0.1 is, may send the Client
// to addresses of its own kind.

// scope is the kind of address a request may go to only from an endpoint
// of the same kind. Every other address (public or private) is anywhere.
type scope string

const (
	anywhere  scope = ""
	loopback  scope = "loopback"
	linkLocal scope = "link-local"
	metadata  scope = "instance-metadata"
)

// String names the scope with its article, for errors.
func (s scope) String() string {
	if s == metadata {
		return "an " + string(s) + " address"
	}
	return "a " + string(s) + " address"
}

var metadataAddrs = []netip.Addr{
	netip.MustParseAddr("169.254.169.254"),
	netip.MustParseAddr("fd00:ec2::254"),
}

func scopeOf(ip netip.Addr) scope {
	ip = ip.Unmap()
	switch {
	case slices.Contains(metadataAddrs, ip.WithZone("")):
		return metadata
	case ip.IsLoopback(), ip.Is4() && ip.As4()[0] == 0, ip.IsUnspecified():
		// 0.0.0.0/8 and :: reach this machine too.
		return loopback
	case ip.IsLinkLocalUnicast():
		return linkLocal
	}
	return anywhere
}

// hostScope is the scope of a host as written, without resolving it:
// localhost is loopback, a name is anywhere.
func hostScope(host string) scope {
	if strings.EqualFold(host, "localhost") {
		return loopback
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return scopeOf(ip)
	}
	return anywhere
}

// hostname is host[:port] without the port and IPv6 brackets.
func hostname(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return strings.Trim(hostport, "[]")
}

// guard keeps the requests of one endpoint host where they may go. It is
// shared by every transport of the host.
type guard struct {
	registry string // the endpoint, host[:port], to name in errors
	host     string // its host name or address, dialled as asked
	scope    scope  // of host as written
	lookup   func(ctx context.Context, network, host string) ([]netip.Addr, error)
	proxies  sync.Map // host names of the proxies the transport chose, dialled as asked
}

func newGuard(registry string) *guard {
	h := hostname(registry)
	return &guard{registry: registry, host: h, scope: hostScope(h), lookup: net.DefaultResolver.LookupNetIP}
}

func (g *guard) allows(s scope) bool { return s == anywhere || s == g.scope }

// checkRedirect is the CheckRedirect of the endpoint's http.Client: at most
// 10 redirects, as Go's default; never from HTTPS to plain HTTP; not to an
// address the endpoint may not send the Client to. A name is judged when
// dialled, by the addresses it resolves to. The registry's Authorization
// does not follow a redirect either way: go-containerregistry adds it below
// http.Client, only to requests for the registry's own host, and the
// downgrade refused here is the one way it would cross in clear.
func (g *guard) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return errors.New("stopped after 10 redirects")
	}
	if via[len(via)-1].URL.Scheme == "https" && req.URL.Scheme != "https" {
		return g.refuse(redacted(req.URL), "from HTTPS to plain HTTP")
	}
	if ip, err := netip.ParseAddr(req.URL.Hostname()); err == nil {
		if s := scopeOf(ip); !g.allows(s) {
			return g.refuse(redacted(req.URL), s.String())
		}
	}
	return nil
}

func (g *guard) refuse(target, why string) error {
	return permanent(fmt.Errorf("%w: registry %s sent the request to %s: %s", ErrRedirectRefused, g.registry, target, why))
}

// redacted is u without its query and user, which may hold credentials (a
// signed storage URL).
func redacted(u *url.URL) string {
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
}

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// dial wraps a transport's DialContext. The endpoint's own host and the
// proxies are dialled as asked. Any other host (a redirect's, a token
// server's) is resolved first and refused if an address is one the endpoint
// may not send the Client to; otherwise those addresses are dialled, not the
// name, so that a second lookup cannot answer differently.
func (g *guard) dial(next dialFunc) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		if _, proxy := g.proxies.Load(host); host == g.host || proxy {
			return next(ctx, network, addr)
		}
		ips, err := g.resolve(ctx, host)
		if err != nil {
			return nil, err
		}
		for _, ip := range ips {
			if s := scopeOf(ip); !g.allows(s) {
				return nil, g.refuse(addr, fmt.Sprintf("it resolves to %s, %s", ip, s))
			}
		}
		var errs []error
		for _, ip := range ips {
			c, err := next(ctx, network, net.JoinHostPort(ip.String(), port))
			if err == nil {
				return c, nil
			}
			errs = append(errs, err)
		}
		return nil, errors.Join(errs...)
	}
}

func (g *guard) resolve(ctx context.Context, host string) ([]netip.Addr, error) {
	if ip, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{ip}, nil
	}
	ips, err := g.lookup(ctx, "ip", host)
	if err == nil && len(ips) == 0 {
		err = fmt.Errorf("no address for %s", host)
	}
	for i := range ips {
		ips[i] = ips[i].Unmap()
	}
	return ips, err
}

// proxy wraps a transport's Proxy to note the proxies it chooses: they are
// the operator's, dialled as the endpoint is. A request through a proxy is
// dialled by the proxy, so only its address literal is checked, by
// checkRedirect.
func (g *guard) proxy(next func(*http.Request) (*url.URL, error)) func(*http.Request) (*url.URL, error) {
	if next == nil {
		return nil
	}
	return func(req *http.Request) (*url.URL, error) {
		u, err := next(req)
		if u != nil {
			g.proxies.Store(u.Hostname(), true)
		}
		return u, err
	}
}

// httpsOnly refuses plain HTTP for an endpoint spoken to over HTTPS only.
// go-containerregistry's login falls back to plain HTTP when HTTPS fails
// for any host it guesses is local, private addresses included; this keeps
// that fallback from leaving the machine.
type httpsOnly struct {
	registry string
	next     http.RoundTripper
}

func (t httpsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, permanent(fmt.Errorf("plain HTTP to %s refused: registry %s is spoken to over HTTPS only (an http:// host in hosts.toml, or plain_http, allows plain HTTP)", req.URL.Host, t.registry))
	}
	return t.next.RoundTrip(req)
}
