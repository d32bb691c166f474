package testutil

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
)

// FakeNet lets a test talk to pretend hosts ("registry.test:443",
// "10.1.2.3:5000") that are really local servers, so that code deciding by
// address can be tested on a machine that reaches only loopback. Its
// DialContext connects a routed address to its local server and any other
// 127.0.0.0/8 address (or localhost) as asked; it refuses everything else,
// so a test never sends a packet beyond this machine. It also notes each
// connection on which the client spoke before TLS, that is, plain HTTP.
type FakeNet struct {
	mu     sync.Mutex
	routes map[string]string // fake host:port → loopback host:port
	dials  map[string]int    // by address asked for
	plain  map[string]int    // connections whose first byte was not a TLS handshake
}

// Route makes dials to fake (host:port) reach local (a loopback host:port).
func (n *FakeNet) Route(fake, local string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.routes == nil {
		n.routes = map[string]string{}
	}
	n.routes[fake] = local
}

// Dials is how many connections were made to addr as asked for.
func (n *FakeNet) Dials(addr string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.dials[addr]
}

// PlainConns is how many connections to addr began with something other
// than a TLS handshake.
func (n *FakeNet) PlainConns(addr string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.plain[addr]
}

// DialContext is a net.Dialer's DialContext over the fake network.
func (n *FakeNet) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	target, err := n.target(addr)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, target)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	if n.dials == nil {
		n.dials = map[string]int{}
	}
	n.dials[addr]++
	n.mu.Unlock()
	return &sniffConn{Conn: c, n: n, addr: addr}, nil
}

// target is the loopback address that serves addr.
func (n *FakeNet) target(addr string) (string, error) {
	n.mu.Lock()
	local, ok := n.routes[addr]
	n.mu.Unlock()
	if ok {
		return local, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "localhost" {
		return net.JoinHostPort("127.0.0.1", port), nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Is4() && netip.MustParsePrefix("127.0.0.0/8").Contains(ip) {
		return addr, nil
	}
	return "", fmt.Errorf("fakenet: refusing to dial %s: not routed and not loopback", addr)
}

// sniffConn notes whether the client's first byte opens a TLS handshake.
type sniffConn struct {
	net.Conn
	n       *FakeNet
	addr    string
	written bool
}

func (c *sniffConn) Write(p []byte) (int, error) {
	if !c.written && len(p) > 0 {
		c.written = true
		const handshake = 0x16 // TLS record type of a ClientHello
		if p[0] != handshake {
			c.n.mu.Lock()
			if c.n.plain == nil {
				c.n.plain = map[string]int{}
			}
			c.n.plain[c.addr]++
			c.n.mu.Unlock()
		}
	}
	return c.Conn.Write(p)
}
