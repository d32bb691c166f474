package remote

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/weightsnap/weightsnap/metrics"
)

var (
	// ErrImageNotFound is returned when a registry has no manifest for a
	// reference.
	ErrImageNotFound = errors.New("image not found")
	// ErrBlobNotFound is returned when a registry has no such blob.
	ErrBlobNotFound = errors.New("blob not found")
	// ErrUnauthorized is returned when a registry refuses access (401 or
	// 403) with the credentials the keychain gave.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrBadResponse is returned when a registry answers with something
	// that cannot be right (a Content-Range other than the one asked for, a
	// digest mismatch, an unparsable manifest). It is not retried.
	ErrBadResponse = errors.New("bad registry response")
	// ErrRedirectRefused is returned when a registry sends a request (a
	// redirect, or to its token server) from HTTPS to plain HTTP, or to a
	// loopback, link-local or instance-metadata address that the registry
	// is not on itself. It is not retried.
	ErrRedirectRefused = errors.New("redirect refused")

	// errStalled is the cause of an attempt aborted by the stall watchdog.
	errStalled = errors.New("registry response stalled")
	// errTooSlow is the cause of an attempt aborted because it moved fewer
	// bytes than the minimum rate asks (WithMinRate).
	errTooSlow = errors.New("registry response slower than the minimum rate")
)

// httpError is an unexpected HTTP status, with the registry's own error
// text when it sent one.
type httpError struct {
	status     int
	retryAfter time.Duration // < 0 when the response had none
	err        error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err} }

// checkStatus accepts a response whose status is one of ok, and otherwise
// closes its body and turns it into an error; a 404 wraps notFound and
// names what was not found.
func checkStatus(resp *http.Response, what string, notFound error, ok ...int) error {
	for _, code := range ok {
		if resp.StatusCode == code {
			metrics.RegistryRequests.WithLabelValues("ok").Inc()
			return nil
		}
	}
	defer resp.Body.Close()
	// CheckError reads a bounded prefix of the body for the registry's
	// structured error message; it names the method and URL.
	rerr := transport.CheckError(resp)
	switch resp.StatusCode {
	case http.StatusNotFound:
		return permanent(fmt.Errorf("%w: %s (%v)", notFound, what, rerr))
	case http.StatusUnauthorized, http.StatusForbidden:
		return permanent(fmt.Errorf("%w: %s (%v)", ErrUnauthorized, what, rerr))
	}
	return &httpError{status: resp.StatusCode, retryAfter: retryAfter(resp.Header.Get("Retry-After")), err: rerr}
}

// retryAfter parses a Retry-After header (seconds or an HTTP date); -1 when
// absent or unparsable.
func retryAfter(v string) time.Duration {
	if v == "" {
		return -1
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return min(time.Duration(s)*time.Second, maxBackoff)
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(time.Until(t), 0), maxBackoff)
	}
	return -1
}

// classify says whether err is worth retrying, how long a registry asked to
// wait (-1: no wish), and whether the host could not be reached at all.
func classify(err error) (transient bool, wait time.Duration, unreachable bool) {
	var perm *permanentError
	var herr *httpError
	var terr *transport.Error
	var cverr *tls.CertificateVerificationError
	var uaerr x509.UnknownAuthorityError
	var hnerr x509.HostnameError
	var operr *net.OpError
	switch {
	case errors.Is(err, errStalled):
		return true, -1, false
	case errors.As(err, &perm):
		return false, -1, false
	case errors.As(err, &herr):
		return statusTransient(herr.status), herr.retryAfter, false
	case errors.As(err, &terr):
		// From the ping or the token exchange.
		return terr.Temporary() || statusTransient(terr.StatusCode), -1, false
	case errors.As(err, &cverr), errors.As(err, &uaerr), errors.As(err, &hnerr):
		return false, -1, false
	case errors.As(err, &operr) && operr.Op == "dial":
		return true, -1, true
	}
	// Resets, EOFs, timeouts and the like.
	return true, -1, false
}

func statusTransient(code int) bool {
	switch code {
	case http.StatusRequestTimeout, http.StatusTooManyRequests:
		return true
	case http.StatusNotImplemented, http.StatusHTTPVersionNotSupported:
		return false
	}
	return code >= 500
}

// backoff is the wait before retry number attempt+1: exponential from
// base, with jitter over its upper half so that parallel readers spread out.
func (o *options) backoff(attempt int) time.Duration {
	d := o.base << min(attempt, 20)
	if d <= 0 || d > maxBackoff {
		d = maxBackoff
	}
	if o.base == 0 {
		return 0
	}
	half := d / 2
	return half + rand.N(half+1)
}

// retry runs fn until it succeeds, fails permanently, ctx ends, or the
// attempts are used up. fn reports whether it made progress before failing,
// which restarts the count. With failFast, a host that cannot be reached at
// all is given up at once (so that a dead mirror costs no backoff).
func (o *options) retry(ctx context.Context, failFast bool, fn func(context.Context) (progress bool, err error)) error {
	attempt := 0
	for {
		progress, err := fn(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		transient, wait, unreachable := classify(err)
		// A dribble is not progress: it would restart the count for ever.
		if progress && !errors.Is(err, errTooSlow) {
			attempt = 0
		}
		if !transient || attempt+1 >= o.attempts || (failFast && unreachable) {
			metrics.RegistryRequests.WithLabelValues("error").Inc()
			return err
		}
		metrics.RegistryRequests.WithLabelValues("retry").Inc()
		if wait < 0 {
			wait = o.backoff(attempt)
		}
		attempt++
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return context.Cause(ctx)
			case <-t.C:
			}
		}
	}
}
