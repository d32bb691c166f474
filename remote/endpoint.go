package remote

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weightsnap/weightsnap/metrics"
)

// endpointCooldown is how long a mirror that failed is skipped.
const endpointCooldown = 30 * time.Second

// source is one repository reached through its ordered endpoints. It is
// shared by every Blob of an Image so that logins and connections are too.
type source struct {
	o         *options
	repo      name.Repository // as referenced, on the origin registry
	endpoints []*endpoint
}

// endpoint is one repository on one host, with its authenticated client
// made on first use.
type endpoint struct {
	host  string
	root  string // API root, "/v2" by default
	query string // "?ns=<origin>" on mirrors, as containerd sends it
	reg   name.Registry
	repo  name.Repository
	o     *options

	downUntil atomic.Int64 // unix nanoseconds; a mirror is skipped until then

	mu      sync.Mutex
	client  *http.Client
	pending chan struct{} // closed when a login in progress ends
}

// registryHost is how a registry is named in references and hosts.toml.
func registryHost(reg name.Registry) string {
	if h := reg.RegistryStr(); h != name.DefaultRegistry {
		return h
	}
	return "docker.io"
}

func newSource(repo name.Repository, o *options) (*source, error) {
	origin := registryHost(repo.Registry)
	var eps []Endpoint
	if o.mirrors != nil {
		eps = o.mirrors(origin)
	}
	if len(eps) == 0 {
		eps = []Endpoint{{Host: repo.RegistryStr()}}
	}
	s := &source{o: o, repo: repo}
	for _, ep := range eps {
		var nopts []name.Option
		if ep.PlainHTTP || o.plainHTTP {
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
		e := &endpoint{host: ep.Host, root: root, reg: reg, repo: reg.Repo(repo.RepositoryStr()), o: o}
		if registryHost(reg) != origin {
			e.query = "?" + url.Values{"ns": {origin}}.Encode()
		}
		s.endpoints = append(s.endpoints, e)
	}
	return s, nil
}

// do runs fn against the endpoints in order, each under retry, until one
// succeeds; a mirror that fails is skipped for endpointCooldown. The last
// endpoint's error is returned.
func (s *source) do(ctx context.Context, fn func(ctx context.Context, e *endpoint) (progress bool, err error)) error {
	var last error
	now := time.Now().UnixNano()
	for i, e := range s.endpoints {
		isLast := i == len(s.endpoints)-1
		if !isLast && e.downUntil.Load() > now {
			continue
		}
		err := s.o.retry(ctx, !isLast, func(ctx context.Context) (bool, error) { return fn(ctx, e) })
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		last = err
		if !isLast {
			e.downUntil.Store(time.Now().Add(endpointCooldown).UnixNano())
			log.G(ctx).WithError(err).WithField("endpoint", e.host).WithField("repo", s.repo.Name()).
				Warn("registry endpoint failed, trying the next one")
		}
	}
	return last
}

// url is the address of an API object of the repository on this endpoint,
// kind being "manifests" or "blobs".
func (e *endpoint) url(kind, ref string) string {
	return fmt.Sprintf("%s://%s%s/%s/%s/%s%s", e.reg.Scheme(), e.reg.RegistryStr(), e.root, e.repo.RepositoryStr(), kind, ref, e.query)
}

// httpClient returns the endpoint's authenticated client, logging in (ping,
// token exchange with the repository's pull scope) on first use. Callers
// waiting for another's login stay cancellable.
func (e *endpoint) httpClient(ctx context.Context) (*http.Client, error) {
	for {
		e.mu.Lock()
		if e.client != nil {
			c := e.client
			e.mu.Unlock()
			return c, nil
		}
		if ch := e.pending; ch != nil {
			e.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			}
		}
		ch := make(chan struct{})
		e.pending = ch
		e.mu.Unlock()

		c, err := e.login(ctx)
		e.mu.Lock()
		e.client = c
		e.pending = nil
		close(ch)
		e.mu.Unlock()
		return c, err
	}
}

func (e *endpoint) login(ctx context.Context) (*http.Client, error) {
	auth, err := e.o.keychain.Resolve(e.reg)
	if err != nil {
		return nil, permanent(fmt.Errorf("credentials for %s: %w", e.host, err))
	}
	rt, err := transport.NewWithContext(ctx, e.reg, auth, e.o.transport, []string{e.repo.Scope(transport.PullScope)})
	if err != nil {
		var terr *transport.Error
		if errors.As(err, &terr) && (terr.StatusCode == http.StatusUnauthorized || terr.StatusCode == http.StatusForbidden) {
			return nil, permanent(fmt.Errorf("%w: login to %s: %v", ErrUnauthorized, e.host, err))
		}
		return nil, fmt.Errorf("login to %s: %w", e.host, err)
	}
	// The transport adds credentials only for the registry's own host, and
	// http.Client follows redirects above it, so redirected requests (blob
	// storage) never carry the registry's Authorization.
	return &http.Client{Transport: rt}, nil
}

// roundTrip sends one request under a stall watchdog that aborts it when no
// byte arrives for the stall timeout, headers included. The caller must
// close the returned body, which also releases the watchdog.
func (e *endpoint) roundTrip(ctx context.Context, method, rawURL string, hdr http.Header) (*http.Response, *body, error) {
	actx, cancel := context.WithCancelCause(ctx)
	wd := startWatchdog(e.o.stall, cancel)
	fail := func(err error) error {
		wd.stop()
		stalled := errors.Is(context.Cause(actx), errStalled)
		cancel(nil)
		if stalled {
			return fmt.Errorf("%w: %s %s: %v", errStalled, method, e.host, err)
		}
		return err
	}
	client, err := e.httpClient(actx)
	if err != nil {
		return nil, nil, fail(err)
	}
	req, err := http.NewRequestWithContext(actx, method, rawURL, nil)
	if err != nil {
		return nil, nil, fail(permanent(err))
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, fail(err)
	}
	wd.progress()
	return resp, &body{resp: resp, ctx: actx, cancel: cancel, wd: wd, bytes: metrics.RegistryBytes.WithLabelValues(reasonOf(ctx))}, nil
}

// body is a response body that feeds the watchdog, counts bytes, and
// reports a stall as errStalled.
type body struct {
	resp   *http.Response
	ctx    context.Context
	cancel context.CancelCauseFunc
	wd     *watchdog
	bytes  prometheus.Counter
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.resp.Body.Read(p)
	if n > 0 {
		b.wd.progress()
		b.bytes.Add(float64(n))
	}
	if err != nil && errors.Is(context.Cause(b.ctx), errStalled) {
		err = fmt.Errorf("%w: reading %s: %v", errStalled, b.resp.Request.URL.Host, err)
	}
	return n, err
}

// Close closes the body; a body not read to its end costs its connection.
func (b *body) Close() error {
	b.wd.stop()
	err := b.resp.Body.Close()
	b.cancel(nil)
	return err
}

// watchdog cancels an attempt when no progress was seen for stall. It
// checks lazily when its timer fires instead of resetting a timer on every
// read.
type watchdog struct {
	stall   time.Duration
	start   time.Time
	last    atomic.Int64 // nanoseconds since start of the last progress
	stopped atomic.Bool
	timer   *time.Timer
	cancel  context.CancelCauseFunc
}

func startWatchdog(stall time.Duration, cancel context.CancelCauseFunc) *watchdog {
	w := &watchdog{stall: stall, start: time.Now(), cancel: cancel}
	if stall > 0 {
		w.timer = time.AfterFunc(stall, w.fire)
	}
	return w
}

func (w *watchdog) fire() {
	if w.stopped.Load() {
		return
	}
	idle := time.Since(w.start) - time.Duration(w.last.Load())
	if idle >= w.stall {
		w.cancel(errStalled)
		return
	}
	w.timer.Reset(w.stall - idle)
}

func (w *watchdog) progress() {
	if w.timer != nil {
		w.last.Store(int64(time.Since(w.start)))
	}
}

func (w *watchdog) stop() {
	w.stopped.Store(true)
	if w.timer != nil {
		w.timer.Stop()
	}
}
