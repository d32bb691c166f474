package remote

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
)

// endpointCooldown is how long a mirror that failed is skipped.
const endpointCooldown = 30 * time.Second

// Client reads images and blobs from registries. It keeps what one call
// learns for the next: the login to each repository on each host, so that
// the layers of an image and every later mount of it share one token, and
// the health of each host, so that a mirror that failed is skipped by every
// blob for a while instead of costing each one its retries. A Client is
// safe for concurrent use; a process needs one.
type Client struct {
	o        *options
	cooldown time.Duration // endpointCooldown; tests shorten it

	// mu guards the maps, not their entries, which guard themselves.
	// Entries are never removed: there is one per repository and host the
	// process pulls from, and a login is worth keeping as long as that.
	mu     sync.Mutex
	logins map[loginKey]*login
	hosts  map[string]*hostState

	heads heads // started by Resolve, taken by OpenBlob
}

// loginKey names a repository on one endpoint: a token's pull scope is one
// repository, and one host's token means nothing to another.
type loginKey struct {
	scheme, host, repo string
}

// hostState is what the Client learned about one endpoint host, shared by
// every repository on it, and the host's transport.
type hostState struct {
	downUntil    atomic.Int64 // unix nanoseconds; a mirror is skipped until then
	rangeIgnored atomic.Bool  // it answered a Range request with the whole blob

	guard *guard
	tr    atomic.Pointer[http.Transport]
	// mu serializes configure; tlsConfig is the configuration tr was made for.
	mu        sync.Mutex
	tlsConfig *tls.Config
}

func (h *hostState) down(now time.Time) bool { return h.downUntil.Load() > now.UnixNano() }

// New returns a Client configured by opts.
func New(opts ...Option) *Client {
	return &Client{
		o:        newOptions(opts),
		cooldown: endpointCooldown,
		logins:   make(map[loginKey]*login),
		hosts:    make(map[string]*hostState),
	}
}

// login returns the login to repo on reg over scheme, made when first
// asked for, whose requests go through h.
func (c *Client) login(scheme string, reg name.Registry, repo name.Repository, h *hostState) *login {
	k := loginKey{scheme: scheme, host: reg.RegistryStr(), repo: repo.RepositoryStr()}
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.logins[k]
	if l == nil {
		var rt http.RoundTripper = h
		if scheme == "https" {
			rt = httpsOnly{registry: reg.RegistryStr(), next: h}
		}
		l = newLogin(reg, repo, c.o, rt, h.guard.checkRedirect)
		c.logins[k] = l
	}
	return l
}

// host returns the state of the endpoint host reg, its transport
// configured for tlsConfig.
func (c *Client) host(reg name.Registry, tlsConfig *tls.Config) *hostState {
	c.mu.Lock()
	h := c.hosts[reg.RegistryStr()]
	if h == nil {
		h = &hostState{guard: newGuard(reg.RegistryStr())}
		c.hosts[reg.RegistryStr()] = h
	}
	c.mu.Unlock()
	h.configure(c.o.transport, tlsConfig)
	return h
}

// registryHost is how a registry is named in references and hosts.toml.
func registryHost(reg name.Registry) string {
	if h := reg.RegistryStr(); h != name.DefaultRegistry {
		return h
	}
	return "docker.io"
}

// source returns repo reached through the endpoints the mirrors give for
// its registry now (hosts.toml may have changed since the last call), each
// bound to the Client's login and host state.
func (c *Client) source(repo name.Repository) (*source, error) {
	origin := registryHost(repo.Registry)
	var eps []Endpoint
	if c.o.mirrors != nil {
		eps = c.o.mirrors(origin)
	}
	if len(eps) == 0 {
		eps = []Endpoint{{Host: repo.RegistryStr()}}
	}
	s := &source{o: c.o, cooldown: c.cooldown, repo: repo}
	for _, ep := range eps {
		e, err := c.endpoint(ep, repo, origin)
		if err != nil {
			return nil, err
		}
		s.endpoints = append(s.endpoints, e)
	}
	return s, nil
}

func (c *Client) endpoint(ep Endpoint, repo name.Repository, origin string) (*endpoint, error) {
	scheme, err := c.scheme(ep)
	if err != nil {
		return nil, err
	}
	var nopts []name.Option
	if scheme == "http" {
		nopts = append(nopts, name.Insecure)
	}
	reg, err := name.NewRegistry(ep.Host, nopts...)
	if err != nil {
		return nil, fmt.Errorf("registry endpoint %q: %w", ep.Host, err)
	}
	root := "/" + strings.Trim(ep.Path, "/")
	if root == "/" {
		root = "/v2"
	}
	r := reg.Repo(repo.RepositoryStr())
	h := c.host(reg, ep.TLS)
	e := &endpoint{host: ep.Host, scheme: scheme, root: root, reg: reg, repo: r, o: c.o, auth: c.login(scheme, reg, r, h), state: h}
	if registryHost(reg) != origin {
		e.query = "?" + url.Values{"ns": {origin}}.Encode()
	}
	return e, nil
}

// scheme is how ep is spoken to: as it says, or by default plain HTTP on
// loopback only. go-containerregistry's own default would speak plain HTTP
// to private addresses and *.localhost names too, where anyone on the path
// could answer for the registry.
func (c *Client) scheme(ep Endpoint) (string, error) {
	switch {
	case c.o.plainHTTP:
		return "http", nil
	case ep.Scheme == "http", ep.Scheme == "https":
		return ep.Scheme, nil
	case ep.Scheme != "":
		return "", fmt.Errorf("registry endpoint %q: scheme %q is neither http nor https", ep.Host, ep.Scheme)
	case hostScope(hostname(ep.Host)) == loopback:
		return "http", nil
	}
	return "https", nil
}
