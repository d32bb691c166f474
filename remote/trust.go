package remote

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
)

// What the Client trusts of the network. A registry is spoken to over
// HTTPS unless it is on loopback or plain HTTP was allowed for it: on any
// other address, private ones included, whoever is on the path could
// answer for it.

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
