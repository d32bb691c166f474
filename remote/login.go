package remote

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// login is the authenticated HTTP client of one repository on one host,
// made on first use (ping, token exchange with the repository's pull
// scope) and shared by every request to it after. The bearer transport
// fetches a new token when the registry refuses the old one, so a login
// outlives its first token. A failed login is not kept: the next request
// tries again.
type login struct {
	reg  name.Registry
	repo name.Repository
	o    *options
	// rt carries the login's requests, checkRedirect judges their redirects.
	rt            http.RoundTripper
	checkRedirect func(*http.Request, []*http.Request) error

	mu      sync.Mutex
	client  *http.Client
	pending *loginAttempt // the login in progress, if any
}

// loginAttempt is one login in progress; done is closed when client and
// err are set.
type loginAttempt struct {
	done   chan struct{}
	client *http.Client
	err    error
}

// httpClient returns the authenticated client, logging in if no one has.
// Callers that arrive during a login wait for it (single flight) and stay
// cancellable; they share its error unless it is only the cancellation of
// the caller who logged in, in which case they try themselves.
func (l *login) httpClient(ctx context.Context) (*http.Client, error) {
	for {
		l.mu.Lock()
		if c := l.client; c != nil {
			l.mu.Unlock()
			return c, nil
		}
		a := l.pending
		if a == nil {
			a = &loginAttempt{done: make(chan struct{})}
			l.pending = a
			l.mu.Unlock()
			return l.run(ctx, a)
		}
		l.mu.Unlock()
		select {
		case <-a.done:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
		if a.err == nil {
			return a.client, nil
		}
		if isContextErr(a.err) && ctx.Err() == nil {
			continue
		}
		return nil, a.err
	}
}

// run performs attempt a and publishes its outcome.
func (l *login) run(ctx context.Context, a *loginAttempt) (*http.Client, error) {
	a.client, a.err = l.authenticate(ctx)
	l.mu.Lock()
	l.client = a.client
	l.pending = nil
	l.mu.Unlock()
	close(a.done)
	return a.client, a.err
}

func (l *login) authenticate(ctx context.Context) (*http.Client, error) {
	host := l.reg.RegistryStr()
	// The repository, not only its host: a keychain may hold credentials
	// for one repository (kubelet's, from a CRI PullImage), and the docker
	// config.json may too.
	auth, err := authn.Resolve(ctx, l.o.keychain, l.repo)
	if err != nil {
		return nil, permanent(fmt.Errorf("credentials for %s: %w", host, err))
	}
	rt, err := transport.NewWithContext(ctx, l.reg, auth, l.rt, []string{l.repo.Scope(transport.PullScope)})
	if err != nil {
		var terr *transport.Error
		if errors.As(err, &terr) && (terr.StatusCode == http.StatusUnauthorized || terr.StatusCode == http.StatusForbidden) {
			return nil, permanent(fmt.Errorf("%w: login to %s: %v", ErrUnauthorized, host, err))
		}
		return nil, fmt.Errorf("login to %s: %w", host, err)
	}
	// The transport adds credentials only for the registry's own host, and
	// http.Client follows redirects above it, so redirected requests (blob
	// storage) never carry the registry's Authorization.
	return &http.Client{Transport: rt, CheckRedirect: l.checkRedirect}, nil
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
