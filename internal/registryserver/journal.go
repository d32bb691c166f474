package registryserver

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
)

// maxManifestSize bounds a manifest body, as distribution does (4 MiB);
// manifests are read into memory to be journaled.
const maxManifestSize = 4 << 20

// journal makes ggcr's in-memory manifests survive a restart: every
// manifest PUT or DELETE that ggcr accepted is appended to a file as one
// JSON line, and New replays the file through ggcr's handler.
type journal struct {
	mu   sync.Mutex
	path string
}

// journalRecord is one accepted manifest request.
type journalRecord struct {
	Method      string `json:"method"`
	Path        string `json:"path"`
	ContentType string `json:"content_type,omitempty"`
	Body        []byte `json:"body,omitempty"`
}

// openJournal replays the journal at p into h and returns it for appending.
func openJournal(p string, h http.Handler) (*journal, error) {
	if err := replay(p, h); err != nil {
		return nil, err
	}
	return &journal{path: p}, nil
}

// append adds one line. The file is opened per write, which manifest
// writes are rare enough to afford, so a handler holds no descriptor.
func (j *journal) append(line []byte) error {
	f, err := os.OpenFile(j.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(append(line, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func replay(p string, h http.Handler) error {
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("open manifest journal: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 2*maxManifestSize) // base64 grows the body by a third
	for line := 1; sc.Scan(); line++ {
		var rec journalRecord
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			// A crash mid-append leaves a torn last line; earlier lines
			// are whole, so stop here rather than fail.
			break
		}
		req, err := http.NewRequest(rec.Method, rec.Path, bytes.NewReader(rec.Body))
		if err != nil {
			return fmt.Errorf("manifest journal line %d: %w", line, err)
		}
		if rec.ContentType != "" {
			req.Header.Set("Content-Type", rec.ContentType)
		}
		w := &statusWriter{ResponseWriter: discardResponse{header: http.Header{}}}
		h.ServeHTTP(w, req)
		if w.status >= 300 {
			return fmt.Errorf("manifest journal line %d: replaying %s %s: status %d", line, rec.Method, rec.Path, w.status)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read manifest journal: %w", err)
	}
	return nil
}

// serveManifestWrite passes a manifest PUT or DELETE to ggcr and journals
// it if ggcr accepted it.
func (s *server) serveManifestWrite(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxManifestSize+1))
	if err != nil {
		errInternal(fmt.Errorf("read manifest: %w", err)).write(w)
		return
	}
	if len(body) > maxManifestSize {
		(&regError{http.StatusRequestEntityTooLarge, "MANIFEST_INVALID", "manifest larger than 4 MiB"}).write(w)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	sw := &statusWriter{ResponseWriter: w}
	// Holding the lock across ggcr's handling keeps the journal in the
	// order ggcr applied the writes.
	s.journal.mu.Lock()
	defer s.journal.mu.Unlock()
	s.ggcr.ServeHTTP(sw, r)
	if sw.status != http.StatusCreated && sw.status != http.StatusAccepted {
		return
	}
	rec := journalRecord{Method: r.Method, Path: r.URL.Path, ContentType: r.Header.Get("Content-Type"), Body: body}
	line, err := json.Marshal(rec)
	if err != nil {
		s.log.Printf("journal %s %s: %v", r.Method, r.URL.Path, err)
		return
	}
	// The client already has its answer; a failed append only loses the
	// manifest at the next restart, so it is logged, not reported.
	if err := s.journal.append(line); err != nil {
		s.log.Printf("journal %s %s: %v", r.Method, r.URL.Path, err)
	}
}

// isManifestWrite tells whether r is a PUT or DELETE of
// /v2/<name>/manifests/<reference>.
func isManifestWrite(r *http.Request) bool {
	if r.Method != http.MethodPut && r.Method != http.MethodDelete {
		return false
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v2/")
	if !ok {
		return false
	}
	elem := strings.Split(rest, "/")
	return len(elem) >= 3 && elem[len(elem)-2] == "manifests"
}

// statusWriter records the status code written through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// discardResponse is the ResponseWriter of replayed requests.
type discardResponse struct{ header http.Header }

func (d discardResponse) Header() http.Header         { return d.header }
func (d discardResponse) Write(b []byte) (int, error) { return len(b), nil }
func (d discardResponse) WriteHeader(int)             {}
