package remote

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/weightsnap/weightsnap/metrics"
)

// source is one repository reached through its ordered endpoints. It is
// shared by every Blob of an Image.
type source struct {
	o         *options
	cooldown  time.Duration
	repo      name.Repository // as referenced, on the origin registry
	endpoints []*endpoint
	local     *localReads // tried first for content named by digest; nil: none
}

// endpoint is one repository on one host, with the Client's login to it
// and its host's state.
type endpoint struct {
	host   string
	scheme string // "https", or "http" if plain HTTP is allowed
	root   string // API root, "/v2" by default
	query  string // "?ns=<origin>" on mirrors, as containerd sends it
	reg    name.Registry
	repo   name.Repository
	o      *options
	auth   *login
	state  *hostState
}

// do runs fn against the endpoints in order, each under retry, until one
// succeeds, and returns the last endpoint's error. A mirror that failed is
// skipped, by every source of the Client, for the cooldown.
func (s *source) do(ctx context.Context, fn func(ctx context.Context, e *endpoint) (progress bool, err error)) error {
	var last error
	now := time.Now()
	for i, e := range s.endpoints {
		isLast := i == len(s.endpoints)-1
		if !isLast && e.state.down(now) {
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
			s.markFailed(ctx, e, err)
		}
	}
	return last
}

// markFailed puts a mirror that failed to cool down, unless it only lacked
// the object: a mirror without one blob (a partial mirror, a cache not yet
// filled) still serves the others.
func (s *source) markFailed(ctx context.Context, e *endpoint, err error) {
	var cooldown time.Duration // none: the next blob tries it again
	if !errors.Is(err, ErrBlobNotFound) && !errors.Is(err, ErrImageNotFound) {
		cooldown = s.cooldown
		e.state.downUntil.Store(time.Now().Add(cooldown).UnixNano())
	}
	log.G(ctx).WithError(err).WithFields(log.Fields{
		"endpoint": e.host,
		"repo":     s.repo.Name(),
		"cooldown": cooldown,
	}).Warn("registry endpoint failed, trying the next one")
}

// url is the address of an API object of the repository on this endpoint,
// kind being "manifests" or "blobs".
func (e *endpoint) url(kind, ref string) string {
	return fmt.Sprintf("%s://%s%s/%s/%s/%s%s", e.scheme, e.reg.RegistryStr(), e.root, e.repo.RepositoryStr(), kind, ref, e.query)
}

// roundTrip sends one request under a stall watchdog that aborts it when no
// byte arrives for the stall timeout, headers included. The caller must
// close the returned body, which also releases the watchdog.
func (e *endpoint) roundTrip(ctx context.Context, method, rawURL string, hdr http.Header) (*http.Response, *body, error) {
	actx, cancel := context.WithCancelCause(ctx)
	wd := startWatchdog(e.o.stall, e.o.minRate, cancel)
	fail := func(err error) error {
		wd.stop()
		cause := context.Cause(actx)
		cancel(nil)
		if errors.Is(cause, errStalled) || errors.Is(cause, errTooSlow) {
			return fmt.Errorf("%w: %s %s: %v", cause, method, e.host, err)
		}
		return err
	}
	client, err := e.auth.httpClient(actx)
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
		return nil, nil, fail(refusal(err))
	}
	wd.progress(0)
	return resp, &body{resp: resp, ctx: actx, cancel: cancel, wd: wd, bytes: metrics.RegistryBytes.WithLabelValues(reasonOf(ctx))}, nil
}

// refusal is err without the url.Error around a refused redirect: the
// refusal names the registry and the target, and the URL it would add may
// carry a signed query.
func refusal(err error) error {
	var perm *permanentError
	if errors.Is(err, ErrRedirectRefused) && errors.As(err, &perm) {
		return perm
	}
	return err
}
