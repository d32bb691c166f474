package remote

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// login is the authenticated HTTP client of one repository on one host,
// made on first use (ping, token exchange with the repository's pull
// scope) and shared by every request to it after. A failed login is not
// kept: the next request tries again.
//
// A login outlives its credentials. The bearer transport fetches a new
// token when the registry challenges the old one; a 401 without a
// challenge logs in again with the same credentials; a refusal (a token
// exchange refused, a 401 or 403 after a fresh token) tells the keychain's
// authenticator (a refusable one, see WithKeychain) and logs in again with
// the credentials of its next source. Each is transparent to the request,
// which is sent again, at most maxLogins times.
type login struct {
	reg  name.Registry
	repo name.Repository
	o    *options
	// rt carries the login's requests, checkRedirect judges their redirects.
	rt            http.RoundTripper
	checkRedirect func(*http.Request, []*http.Request) error
	client        *http.Client // with the login itself as its transport

	mu      sync.Mutex
	tr      http.RoundTripper   // authenticated; nil until logged in
	auth    authn.Authenticator // what tr was made with
	gen     uint64              // counts the logins made
	pending *loginAttempt       // the login in progress, if any
}

// maxLogins bounds the logins one request or login attempt makes: one per
// source of credentials a keychain has, and one renewal.
const maxLogins = 5

// refusable is an authenticator that can be told the registry refused the
// credentials it gave last; it reports whether it has others to give.
type refusable interface {
	Refused(ctx context.Context) bool
}

func newLogin(reg name.Registry, repo name.Repository, o *options, rt http.RoundTripper, checkRedirect func(*http.Request, []*http.Request) error) *login {
	l := &login{reg: reg, repo: repo, o: o, rt: rt, checkRedirect: checkRedirect}
	// The transport adds credentials only for the registry's own host, and
	// http.Client follows redirects above it, so redirected requests (blob
	// storage) never carry the registry's Authorization.
	l.client = &http.Client{Transport: l, CheckRedirect: checkRedirect}
	return l
}

// loginAttempt is one login in progress; done is closed when its outcome
// is set.
type loginAttempt struct {
	done chan struct{}
	tr   http.RoundTripper
	auth authn.Authenticator
	gen  uint64
	err  error
}

// httpClient returns the authenticated client, logging in if no one has.
func (l *login) httpClient(ctx context.Context) (*http.Client, error) {
	if _, _, err := l.transport(ctx); err != nil {
		return nil, err
	}
	return l.client, nil
}

// transport returns the authenticated transport and its login's number,
// logging in if no one has. Callers that arrive during a login wait for it
// (single flight) and stay cancellable; they share its error unless it is
// only the cancellation of the caller who logged in, in which case they
// try themselves.
func (l *login) transport(ctx context.Context) (http.RoundTripper, uint64, error) {
	for {
		l.mu.Lock()
		if tr := l.tr; tr != nil {
			gen := l.gen
			l.mu.Unlock()
			return tr, gen, nil
		}
		a := l.pending
		if a == nil {
			a = &loginAttempt{done: make(chan struct{})}
			l.pending = a
			l.mu.Unlock()
			l.run(ctx, a)
			return a.tr, a.gen, a.err
		}
		l.mu.Unlock()
		select {
		case <-a.done:
		case <-ctx.Done():
			return nil, 0, context.Cause(ctx)
		}
		if a.err == nil {
			return a.tr, a.gen, nil
		}
		if isContextErr(a.err) && ctx.Err() == nil {
			continue
		}
		return nil, 0, a.err
	}
}

// run performs attempt a and publishes its outcome.
func (l *login) run(ctx context.Context, a *loginAttempt) {
	a.tr, a.auth, a.err = l.authenticate(ctx)
	l.mu.Lock()
	if a.err == nil {
		l.gen++
		a.gen = l.gen
	}
	l.tr, l.auth = a.tr, a.auth
	l.pending = nil
	l.mu.Unlock()
	close(a.done)
}

func (l *login) authenticate(ctx context.Context) (http.RoundTripper, authn.Authenticator, error) {
	host := l.reg.RegistryStr()
	// The repository, not only its host: a keychain may hold credentials
	// for one repository (kubelet's, from a CRI PullImage), and the docker
	// config.json may too.
	auth, err := authn.Resolve(ctx, l.o.keychain, l.repo)
	if err != nil {
		return nil, nil, permanent(fmt.Errorf("credentials for %s: %w", host, err))
	}
	for i := 1; ; i++ {
		rt, err := transport.NewWithContext(ctx, l.reg, auth, l.rt, []string{l.repo.Scope(transport.PullScope)})
		if err == nil {
			return rt, auth, nil
		}
		if !refusedErr(err) {
			return nil, nil, fmt.Errorf("login to %s: %w", host, err)
		}
		if r, ok := auth.(refusable); !ok || i == maxLogins || !r.Refused(ctx) {
			return nil, nil, permanent(fmt.Errorf("%w: login to %s: %v", ErrUnauthorized, host, err))
		}
	}
}

// RoundTrip sends req with the login's transport, logging in again when
// the registry's answer says the credentials expired or were refused.
// Requests redirected to other hosts go out once, as they are.
func (l *login) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	renewed := false
	for i := 1; ; i++ {
		tr, gen, err := l.transport(ctx)
		if err != nil {
			return nil, err
		}
		out := req
		if req.Body == nil && i < maxLogins {
			out = req.Clone(ctx) // the bearer transport sets its header on it
		}
		resp, err := tr.RoundTrip(out)
		if out == req || req.URL.Host != l.reg.RegistryStr() {
			return resp, err
		}
		var refuse bool
		switch {
		case err != nil:
			if !refusedErr(err) {
				return resp, err
			}
			refuse = true
		case resp.StatusCode == http.StatusUnauthorized && resp.Header.Get("WWW-Authenticate") == "" && !renewed:
			// Expired, and not challenged for a token the bearer
			// transport would have fetched itself: renew with the same
			// credentials first.
			renewed = true
		case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
			refuse = true
		default:
			return resp, nil
		}
		if !l.renew(ctx, gen, refuse) {
			return resp, err
		}
		if resp != nil {
			resp.Body.Close()
		}
		log.G(ctx).WithFields(log.Fields{"registry": l.reg.RegistryStr(), "repo": l.repo.RepositoryStr(), "refused": refuse}).Info("registry credentials renewed")
	}
}

// renew drops login gen so that the next request logs in again, after
// telling the authenticator its credentials were refused if refuse is set.
// It reports false, changing nothing, when there is nothing else to try.
// A login another request renewed already is not renewed again.
func (l *login) renew(ctx context.Context, gen uint64, refuse bool) bool {
	l.mu.Lock()
	if l.gen != gen || l.tr == nil {
		l.mu.Unlock()
		return true
	}
	auth := l.auth
	r, ok := auth.(refusable)
	if refuse && !ok {
		l.mu.Unlock()
		return false
	}
	l.tr = nil
	l.mu.Unlock()
	if refuse && !r.Refused(ctx) {
		return false
	}
	return true
}

// refusedErr reports whether err is a registry or token server refusing
// the credentials.
func refusedErr(err error) bool {
	var terr *transport.Error
	return errors.As(err, &terr) && (terr.StatusCode == http.StatusUnauthorized || terr.StatusCode == http.StatusForbidden)
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
