package registryserver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// store keeps blobs as files named by digest under dir/blobs/sha256 and
// in-progress uploads under dir/uploads. It is also handed to ggcr as its
// registry.BlobHandler, so no path of the stock registry holds blob bytes
// in memory or re-hashes a blob to answer a HEAD.
type store struct {
	blobDir   string // dir/blobs/sha256
	uploadDir string // dir/uploads
}

var (
	_ registry.BlobHandler       = (*store)(nil)
	_ registry.BlobStatHandler   = (*store)(nil)
	_ registry.BlobPutHandler    = (*store)(nil)
	_ registry.BlobDeleteHandler = (*store)(nil)
)

// errDigestMismatch is returned when uploaded bytes do not hash to the
// digest the client named.
var errDigestMismatch = errors.New("digest mismatch")

// errUnsupportedDigest is returned for digests other than sha256, the only
// algorithm blobs are stored under.
var errUnsupportedDigest = errors.New("unsupported digest algorithm")

func newStore(dir string) (*store, error) {
	s := &store{
		blobDir:   filepath.Join(dir, "blobs", "sha256"),
		uploadDir: filepath.Join(dir, "uploads"),
	}
	if err := os.MkdirAll(s.blobDir, 0o755); err != nil {
		return nil, fmt.Errorf("create blob dir: %w", err)
	}
	// Upload sessions live in memory, so files of a previous process can
	// never be resumed: start from an empty upload dir.
	if err := os.RemoveAll(s.uploadDir); err != nil {
		return nil, fmt.Errorf("clear upload dir: %w", err)
	}
	if err := os.MkdirAll(s.uploadDir, 0o755); err != nil {
		return nil, fmt.Errorf("create upload dir: %w", err)
	}
	return s, nil
}

// blobPath returns the file of a blob. The hex part was validated by
// v1.NewHash (hex digits only), so it cannot escape the blob dir.
func (s *store) blobPath(h v1.Hash) (string, error) {
	if h.Algorithm != "sha256" {
		return "", fmt.Errorf("%w: %s", errUnsupportedDigest, h.Algorithm)
	}
	return filepath.Join(s.blobDir, h.Hex), nil
}

// open opens a blob for reading, or returns registry.ErrNotFound.
func (s *store) open(h v1.Hash) (*os.File, error) {
	p, err := s.blobPath(h)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", registry.ErrNotFound, err)
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, registry.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", h, err)
	}
	return f, nil
}

// Stat returns the size of a blob from the file system; the blob was
// verified when it was stored, so it is not hashed again.
func (s *store) Stat(_ context.Context, _ string, h v1.Hash) (int64, error) {
	p, err := s.blobPath(h)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", registry.ErrNotFound, err)
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return 0, registry.ErrNotFound
	}
	if err != nil {
		return 0, fmt.Errorf("stat blob %s: %w", h, err)
	}
	return fi.Size(), nil
}

// Get opens a blob. The returned *os.File is an io.ReaderAt, which lets
// ggcr's handler serve ranges without reading up to the start.
func (s *store) Get(_ context.Context, _ string, h v1.Hash) (io.ReadCloser, error) {
	return s.open(h)
}

// Put stores a blob from rc, hashing while it streams to a temporary file,
// and moves it into place only if the digest matches.
func (s *store) Put(_ context.Context, _ string, h v1.Hash, rc io.ReadCloser) error {
	defer rc.Close()
	u, err := s.newUpload()
	if err != nil {
		return err
	}
	defer u.abort()
	if _, err := u.append(rc); err != nil {
		return err
	}
	return s.commit(u, h)
}

// Delete removes a blob.
func (s *store) Delete(_ context.Context, _ string, h v1.Hash) error {
	p, err := s.blobPath(h)
	if err != nil {
		return fmt.Errorf("%w: %w", registry.ErrNotFound, err)
	}
	if err := os.Remove(p); errors.Is(err, os.ErrNotExist) {
		return registry.ErrNotFound
	} else if err != nil {
		return fmt.Errorf("delete blob %s: %w", h, err)
	}
	return nil
}

// upload is one blob being written: a temporary file and the running hash
// of what was appended, so finishing an upload never re-reads the file.
type upload struct {
	f         *os.File
	hash      hash.Hash
	size      int64
	committed bool // the file was renamed into the blob dir
}

func (s *store) newUpload() (*upload, error) {
	f, err := os.CreateTemp(s.uploadDir, "upload-*")
	if err != nil {
		return nil, fmt.Errorf("create upload file: %w", err)
	}
	return &upload{f: f, hash: sha256.New()}, nil
}

// append copies r to the end of the upload and returns the bytes added.
func (u *upload) append(r io.Reader) (int64, error) {
	n, err := io.Copy(io.MultiWriter(u.f, u.hash), r)
	u.size += n
	if err != nil {
		return n, fmt.Errorf("write upload: %w", err)
	}
	return n, nil
}

// abort drops the upload's file; a no-op once commit moved it.
func (u *upload) abort() {
	if u.committed {
		return
	}
	u.f.Close()
	os.Remove(u.f.Name())
}

// commit verifies the upload against want and renames it into the blob dir.
func (s *store) commit(u *upload, want v1.Hash) error {
	p, err := s.blobPath(want)
	if err != nil {
		return err
	}
	if got := hex.EncodeToString(u.hash.Sum(nil)); got != want.Hex {
		return fmt.Errorf("%w: want %s, got sha256:%s", errDigestMismatch, want, got)
	}
	if err := u.f.Close(); err != nil {
		return fmt.Errorf("close upload: %w", err)
	}
	// Same file system (both under dir), so the blob appears atomically.
	if err := os.Rename(u.f.Name(), p); err != nil {
		return fmt.Errorf("store blob %s: %w", want, err)
	}
	u.committed = true
	return nil
}
