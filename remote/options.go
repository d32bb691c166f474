// Package remote reads OCI images from registries for weightsnap: a Client
// resolves a reference to an image manifest, config and layer list, and
// reads layer blobs by HTTP Range GETs with retries, stall detection and
// mirror fallback. It speaks HTTPS unless told otherwise, with each
// endpoint's own TLS configuration, and follows no redirect to plain HTTP or
// to this machine's services (trust.go). It knows nothing of FUSE, caches
// or tar.
package remote

import (
	"context"
	"crypto/tls"
	"net/http"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Option configures a Client.
type Option func(*options)

// Endpoint is one host that serves a registry's content: a mirror or the
// origin itself.
type Endpoint struct {
	// Host is host[:port] of the endpoint.
	Host string
	// Scheme is "https" (HTTPS only) or "http" (plain HTTP allowed; HTTPS
	// is tried first). Empty means "http" for a loopback host (127.0.0.0/8,
	// ::1, localhost), where registries for tests and `weightsnap mount`
	// run, and "https" for any other host, private addresses included.
	Scheme string
	// Path is the API root that replaces "/v2" in request paths, as in the
	// path of a containerd hosts.toml host URL (for example "/cache/v2").
	// Empty means "/v2".
	Path string
	// TLS is the TLS configuration of HTTPS to this endpoint (its roots,
	// client certificates, verification), as hosts.toml "ca", "client" and
	// "skip_verify" make it. Nil means the transport's own (WithTransport).
	TLS *tls.Config
}

type options struct {
	plainHTTP bool
	keychain  authn.Keychain
	transport *http.Transport
	attempts  int
	base      time.Duration
	stall     time.Duration
	minRate   int64
	platform  v1.Platform
	mirrors   func(registry string) []Endpoint
}

const (
	defaultAttempts = 6
	defaultBase     = 100 * time.Millisecond
	defaultStall    = 30 * time.Second
	// defaultMinRate is the slowest a response may be, measured over each
	// stall window: 64 KiB/s, far below any registry a GPU node pulls
	// weights from, far above a dribble meant to hold workers.
	defaultMinRate = 64 << 10
	// maxBackoff caps both the exponential backoff and a registry's
	// Retry-After, so that a reader blocked on the registry learns about a
	// persistent failure in bounded time.
	maxBackoff = 30 * time.Second
)

func newOptions(opts []Option) *options {
	o := &options{
		keychain:  authn.DefaultKeychain,
		transport: newTransport(),
		attempts:  defaultAttempts,
		base:      defaultBase,
		stall:     defaultStall,
		minRate:   defaultMinRate,
		platform:  v1.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH},
	}
	for _, opt := range opts {
		opt(o)
	}
	return o
}

// WithPlainHTTP lets every registry endpoint be spoken to over plain HTTP,
// as if its Scheme were "http" (HTTPS is still tried first). Without it,
// only loopback hosts and endpoints whose Scheme is "http" are.
func WithPlainHTTP(plain bool) Option {
	return func(o *options) { o.plainHTTP = plain }
}

// WithKeychain sets where registry credentials come from; the default is
// authn.DefaultKeychain (the docker config.json). It is asked for each
// repository on each endpoint host (a name.Repository), mirrors included.
// An authenticator it gives that has a method Refused(context.Context) bool
// is told when the registry refused its credentials, and is asked again
// while it reports it has others (see credentials.Keychain).
func WithKeychain(k authn.Keychain) Option {
	return func(o *options) {
		if k != nil {
			o.keychain = k
		}
	}
}

// WithTransport sets the template of the HTTP transports under
// authentication; the default keeps connections alive for many parallel
// range requests. Each endpoint host gets a clone of it with the host's TLS
// configuration (Endpoint.TLS) and a DialContext that checks where
// redirects and token servers lead; DialTLSContext is not used. It should
// not transparently decompress responses.
func WithTransport(t *http.Transport) Option {
	return func(o *options) {
		if t != nil {
			o.transport = t
		}
	}
}

// WithRetry sets how many times a request is tried (attempts ≥ 1) and the
// base of its exponential, jittered backoff. A transient failure that made
// progress (bytes received) starts the count afresh.
func WithRetry(attempts int, base time.Duration) Option {
	return func(o *options) {
		o.attempts = max(attempts, 1)
		o.base = max(base, 0)
	}
}

// WithStallTimeout sets how long a request may go without receiving a byte
// (response headers included) before it is aborted and retried. Zero
// disables stall detection.
func WithStallTimeout(d time.Duration) Option {
	return func(o *options) { o.stall = max(d, 0) }
}

// WithMinRate sets the slowest a response may be, in bytes per second,
// measured over each stall window (WithStallTimeout): a slower attempt is
// aborted and retried, without restarting the count of attempts. Zero
// disables the check.
func WithMinRate(bytesPerSecond int64) Option {
	return func(o *options) { o.minRate = max(bytesPerSecond, 0) }
}

// WithPlatform sets the platform whose manifest is chosen from a
// multi-platform index; the default is the host's GOOS/GOARCH. Empty fields
// match anything.
func WithPlatform(p v1.Platform) Option {
	return func(o *options) { o.platform = p }
}

// WithMirrors sets the endpoints to try for a registry, in order: mirrors
// first, the origin last (a containerd hosts.toml maps to this). The
// function gets the registry host as written in references ("docker.io"
// for Docker Hub) and returns the complete list; an empty list means the
// origin alone. A failing endpoint falls back to the next one; a mirror
// that failed is then skipped by every request of the Client for a while,
// unless it only lacked what was asked for.
func WithMirrors(fn func(registry string) []Endpoint) Option {
	return func(o *options) { o.mirrors = fn }
}

type reasonKey struct{}

// WithReason labels the registry traffic done under ctx for metrics:
// "ondemand", "readahead", "background" or "stream" (feeding a layer's
// decompressed stream). Unlabelled traffic counts as "ondemand".
func WithReason(ctx context.Context, reason string) context.Context {
	return context.WithValue(ctx, reasonKey{}, reason)
}

func reasonOf(ctx context.Context) string {
	if r, ok := ctx.Value(reasonKey{}).(string); ok && r != "" {
		return r
	}
	return "ondemand"
}
