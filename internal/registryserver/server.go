// Package registryserver is an in-process OCI registry for demos and tests,
// able to hold multi-GiB blobs.
//
// It is go-containerregistry's pkg/registry (manifests, tags, catalog, in
// memory) with every blob route taken over by a disk store: blobs are files
// named by digest, HEAD and GET never re-hash them, GET serves HTTP Range
// requests properly (206 for "bytes=a-b" and "bytes=a-", Accept-Ranges,
// 416 when unsatisfiable), and uploads stream to a temporary file while being
// hashed instead of being held in memory.
//
// Blobs are shared by all repositories: a blob pushed to one is found (and
// mountable) in every other. Manifests live in ggcr's memory and in a
// journal of the manifest writes in dir, replayed by New, so a new server on
// an old dir serves the same images and tags.
package registryserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Option configures a server built by New or Start.
type Option func(*config)

type config struct {
	logger *log.Logger
}

// WithLogger logs one line per request to l. The default discards them.
func WithLogger(l *log.Logger) Option {
	return func(c *config) { c.logger = l }
}

// New returns an http.Handler serving the OCI distribution API at the site
// root, with blobs stored under dir (created if missing). Blobs already in
// dir from an earlier server are served; unfinished uploads are discarded.
func New(dir string, opts ...Option) (http.Handler, error) {
	c := config{logger: log.New(io.Discard, "", 0)}
	for _, o := range opts {
		o(&c)
	}
	s, err := newStore(dir)
	if err != nil {
		return nil, fmt.Errorf("registry dir %s: %w", dir, err)
	}
	ggcr := registry.New(registry.WithBlobHandler(s), registry.Logger(c.logger))
	j, err := openJournal(filepath.Join(dir, "manifests.jsonl"), ggcr)
	if err != nil {
		return nil, fmt.Errorf("registry dir %s: %w", dir, err)
	}
	return &server{
		store:   s,
		log:     c.logger,
		uploads: map[string]*session{},
		ggcr:    ggcr,
		journal: j,
	}, nil
}

// Start serves a registry for dir on 127.0.0.1 at a free port and returns
// its "host:port". stop closes the listener and every connection and waits
// for the server to finish; cancelling ctx closes it too, but stop must
// still be called to wait and release it.
func Start(ctx context.Context, dir string, opts ...Option) (addr string, stop func() error, err error) {
	h, err := New(dir, opts...)
	if err != nil {
		return "", nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	stopped := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			srv.Close()
		case <-stopped:
		}
	}()

	var once sync.Once
	var stopErr error
	stop = func() error {
		once.Do(func() {
			close(stopped)
			if err := srv.Close(); err != nil {
				stopErr = fmt.Errorf("close registry server: %w", err)
			}
			if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) && stopErr == nil {
				stopErr = fmt.Errorf("registry server: %w", err)
			}
		})
		return stopErr
	}
	return ln.Addr().String(), stop, nil
}

// server routes blob requests to the disk store and the rest to ggcr.
type server struct {
	store   *store
	log     *log.Logger
	ggcr    http.Handler
	journal *journal

	mu      sync.Mutex
	uploads map[string]*session // by upload id
}

// session is an upload in progress. Its mutex orders the chunks of one
// upload; different uploads proceed in parallel.
type session struct {
	mu   sync.Mutex
	repo string
	up   *upload
	done bool // committed or cancelled; the id is gone from server.uploads
}

// Route kinds of a /v2/ path that the server handles itself.
const (
	routeOther       = iota
	routeBlob        // /v2/<name>/blobs/<digest>
	routeUploadStart // /v2/<name>/blobs/uploads/
	routeUpload      // /v2/<name>/blobs/uploads/<id>
)

// parseRoute classifies a request path; repo is the repository name and arg
// the digest or upload id.
func parseRoute(p string) (kind int, repo, arg string) {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return routeOther, "", ""
	}
	elem := strings.Split(strings.TrimSuffix(rest, "/"), "/")
	n := len(elem)
	switch {
	case n >= 3 && elem[n-2] == "blobs" && elem[n-1] == "uploads":
		return routeUploadStart, path.Join(elem[:n-2]...), ""
	case n >= 4 && elem[n-3] == "blobs" && elem[n-2] == "uploads":
		return routeUpload, path.Join(elem[:n-3]...), elem[n-1]
	case n >= 3 && elem[n-2] == "blobs":
		return routeBlob, path.Join(elem[:n-2]...), elem[n-1]
	}
	return routeOther, "", ""
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	kind, repo, arg := parseRoute(r.URL.Path)
	var err *regError
	switch {
	case kind == routeBlob && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		err = s.getBlob(w, r, arg)
	case kind == routeBlob && r.Method == http.MethodDelete:
		err = s.deleteBlob(w, r, arg)
	case kind == routeUploadStart && r.Method == http.MethodPost:
		err = s.startUpload(w, r, repo)
	case kind == routeUpload:
		err = s.handleUpload(w, r, repo, arg)
	case isManifestWrite(r):
		s.serveManifestWrite(w, r)
		return
	default:
		s.ggcr.ServeHTTP(w, r)
		return
	}
	if err != nil {
		s.log.Printf("%s %s %d %s %s", r.Method, r.URL, err.status, err.code, err.message)
		err.write(w)
		return
	}
	s.log.Printf("%s %s", r.Method, r.URL)
}

// getBlob answers GET and HEAD of a blob from its file. http.ServeContent
// does the Range work: single and multiple ranges, open-ended ranges,
// suffix ranges, If-Range against the ETag, and 416 with "bytes */size".
func (s *server) getBlob(w http.ResponseWriter, r *http.Request, digest string) *regError {
	h, err := v1.NewHash(digest)
	if err != nil {
		return errDigestInvalid(err)
	}
	f, err := s.store.open(h)
	if errors.Is(err, registry.ErrNotFound) {
		return errBlobUnknown
	} else if err != nil {
		return errInternal(err)
	}
	defer f.Close()
	hdr := w.Header()
	hdr.Set("Content-Type", "application/octet-stream")
	hdr.Set("Docker-Content-Digest", h.String())
	hdr.Set("ETag", `"`+h.String()+`"`)
	// Content is immutable: a zero modtime keeps ServeContent from sending
	// a Last-Modified that would only reflect when the push happened.
	http.ServeContent(w, r, "", time.Time{}, f)
	return nil
}

func (s *server) deleteBlob(w http.ResponseWriter, r *http.Request, digest string) *regError {
	h, err := v1.NewHash(digest)
	if err != nil {
		return errDigestInvalid(err)
	}
	if err := s.store.Delete(r.Context(), "", h); errors.Is(err, registry.ErrNotFound) {
		return errBlobUnknown
	} else if err != nil {
		return errInternal(err)
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// startUpload handles POST /v2/<name>/blobs/uploads/: a cross-repository
// mount of a blob the store has (blobs are shared by all repositories), a
// monolithic upload with ?digest=, or the start of a chunked upload.
func (s *server) startUpload(w http.ResponseWriter, r *http.Request, repo string) *regError {
	q := r.URL.Query()
	if m := q.Get("mount"); m != "" {
		if h, err := v1.NewHash(m); err == nil {
			if _, err := s.store.Stat(r.Context(), repo, h); err == nil {
				w.Header().Set("Location", "/"+path.Join("v2", repo, "blobs", h.String()))
				w.Header().Set("Docker-Content-Digest", h.String())
				w.WriteHeader(http.StatusCreated)
				return nil
			}
		}
		// Not mountable: fall through to an ordinary upload, as the
		// distribution spec asks.
	}
	if d := q.Get("digest"); d != "" {
		h, err := v1.NewHash(d)
		if err != nil {
			return errDigestInvalid(err)
		}
		up, err := s.store.newUpload()
		if err != nil {
			return errInternal(err)
		}
		defer up.abort()
		if _, err := up.append(r.Body); err != nil {
			return errInternal(err)
		}
		return s.finish(w, repo, up, h)
	}

	up, err := s.store.newUpload()
	if err != nil {
		return errInternal(err)
	}
	id, err := newUploadID()
	if err != nil {
		up.abort()
		return errInternal(err)
	}
	s.mu.Lock()
	s.uploads[id] = &session{repo: repo, up: up}
	s.mu.Unlock()
	s.uploadStatus(w, repo, id, 0, http.StatusAccepted)
	return nil
}

// handleUpload serves the requests on an upload session: PATCH appends a
// chunk, PUT appends the last (possibly empty) chunk and commits, GET
// reports progress, DELETE cancels.
func (s *server) handleUpload(w http.ResponseWriter, r *http.Request, repo, id string) *regError {
	s.mu.Lock()
	sess := s.uploads[id]
	s.mu.Unlock()
	if sess == nil || sess.repo != repo {
		return errUploadUnknown
	}
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if sess.done {
		return errUploadUnknown
	}

	switch r.Method {
	case http.MethodGet:
		s.uploadStatus(w, repo, id, sess.up.size, http.StatusNoContent)
		return nil

	case http.MethodDelete:
		s.endSession(id, sess)
		w.WriteHeader(http.StatusNoContent)
		return nil

	case http.MethodPatch:
		if rerr := checkContentRange(r.Header.Get("Content-Range"), sess.up.size); rerr != nil {
			return rerr
		}
		if _, err := sess.up.append(r.Body); err != nil {
			// The chunk is partly written: the upload can't continue.
			s.endSession(id, sess)
			return errInternal(err)
		}
		s.uploadStatus(w, repo, id, sess.up.size, http.StatusAccepted)
		return nil

	case http.MethodPut:
		d := r.URL.Query().Get("digest")
		if d == "" {
			return &regError{http.StatusBadRequest, "DIGEST_INVALID", "digest not specified"}
		}
		h, err := v1.NewHash(d)
		if err != nil {
			return errDigestInvalid(err)
		}
		// Whatever happens, this session is over: a failed commit can't be
		// retried with the same bytes because the hash state moved on.
		defer s.endSession(id, sess)
		if r.ContentLength != 0 {
			if rerr := checkContentRange(r.Header.Get("Content-Range"), sess.up.size); rerr != nil {
				return rerr
			}
			if _, err := sess.up.append(r.Body); err != nil {
				return errInternal(err)
			}
		}
		return s.finish(w, repo, sess.up, h)
	}
	return &regError{http.StatusMethodNotAllowed, "UNSUPPORTED", "method not allowed on an upload"}
}

// finish commits an upload as blob h and writes the 201.
func (s *server) finish(w http.ResponseWriter, repo string, up *upload, h v1.Hash) *regError {
	if err := s.store.commit(up, h); errors.Is(err, errDigestMismatch) {
		return &regError{http.StatusBadRequest, "DIGEST_INVALID", err.Error()}
	} else if errors.Is(err, errUnsupportedDigest) {
		return errDigestInvalid(err)
	} else if err != nil {
		return errInternal(err)
	}
	w.Header().Set("Location", "/"+path.Join("v2", repo, "blobs", h.String()))
	w.Header().Set("Docker-Content-Digest", h.String())
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
	return nil
}

// endSession forgets an upload and removes its file. sess.mu is held.
func (s *server) endSession(id string, sess *session) {
	sess.done = true
	sess.up.abort()
	s.mu.Lock()
	delete(s.uploads, id)
	s.mu.Unlock()
}

func (s *server) uploadStatus(w http.ResponseWriter, repo, id string, size int64, status int) {
	hdr := w.Header()
	hdr.Set("Location", "/"+path.Join("v2", repo, "blobs", "uploads", id))
	hdr.Set("Docker-Upload-UUID", id)
	// "0-0" for an empty upload is what distribution and ggcr send.
	hdr.Set("Range", fmt.Sprintf("0-%d", max(size-1, 0)))
	hdr.Set("Content-Length", "0")
	w.WriteHeader(status)
}

// checkContentRange accepts a missing Content-Range (a streamed chunk) or
// one that starts where the upload ends.
func checkContentRange(cr string, size int64) *regError {
	if cr == "" {
		return nil
	}
	var start, end int64
	if _, err := fmt.Sscanf(strings.TrimPrefix(cr, "bytes "), "%d-%d", &start, &end); err != nil {
		return &regError{http.StatusRequestedRangeNotSatisfiable, "BLOB_UPLOAD_INVALID", "malformed Content-Range " + cr}
	}
	if start != size || end < start {
		return &regError{http.StatusRequestedRangeNotSatisfiable, "BLOB_UPLOAD_INVALID",
			fmt.Sprintf("Content-Range %s does not continue the upload at %d", cr, size)}
	}
	return nil
}

func newUploadID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("upload id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// regError is an error response in the distribution spec's JSON shape.
type regError struct {
	status  int
	code    string
	message string
}

var (
	errBlobUnknown   = &regError{http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown to registry"}
	errUploadUnknown = &regError{http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry"}
)

func errDigestInvalid(err error) *regError {
	return &regError{http.StatusBadRequest, "DIGEST_INVALID", err.Error()}
}

func errInternal(err error) *regError {
	return &regError{http.StatusInternalServerError, "UNKNOWN", err.Error()}
}

func (e *regError) write(w http.ResponseWriter) {
	type detail struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.status)
	json.NewEncoder(w).Encode(struct {
		Errors []detail `json:"errors"`
	}{[]detail{{e.code, e.message}}})
}
