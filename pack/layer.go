package pack

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"runtime"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sync/errgroup"

	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// layer is an uncompressed tar layer streamed from files on disk. Its blob
// is the tar itself, so Digest equals DiffID and Compressed equals
// Uncompressed; nothing in ggcr will gzip it because MediaType says it is
// a plain tar.
type layer struct {
	entries     []entry
	annotations map[string]string // the descriptor's, or the config's (newImage)

	// Set by hash before the layer is handed out.
	digest v1.Hash
	size   int64
}

var _ v1.Layer = (*layer)(nil)

// Digest returns the sha256 of the tar stream.
func (l *layer) Digest() (v1.Hash, error) { return l.digest, nil }

// DiffID equals Digest: the layer is not compressed.
func (l *layer) DiffID() (v1.Hash, error) { return l.digest, nil }

// Size returns the length of the tar stream.
func (l *layer) Size() (int64, error) { return l.size, nil }

// MediaType is the OCI uncompressed layer type.
func (l *layer) MediaType() (types.MediaType, error) { return types.OCIUncompressedLayer, nil }

// Compressed returns the tar stream, the same as Uncompressed.
func (l *layer) Compressed() (io.ReadCloser, error) { return l.Uncompressed() }

// Uncompressed streams the tar from the files, re-reading them. The stream
// fails at its end if its bytes no longer match the digest computed by
// Build, so a file edited in between never reaches a registry under the old
// digest unnoticed.
func (l *layer) Uncompressed() (io.ReadCloser, error) {
	pr, pw := io.Pipe()
	go func() {
		// A reader that stops early closes pr, which fails the next write
		// here and ends the goroutine.
		pw.CloseWithError(writeTar(context.Background(), pw, l.entries))
	}()
	return &verifyingReader{r: pr, hash: sha256.New(), want: l.digest, size: l.size}, nil
}

// hash computes the layer's digest, size, chunk table and tar headers by
// writing its tar once. The table goes into the layer's annotations, so
// that a node can check every range it fetches, and so do the headers
// (unless there are too many), so that it can index the layer without
// reading it.
func (l *layer) hash(ctx context.Context) error {
	h := sha256.New()
	table, err := chunks.NewWriter(chunks.DefaultChunkSize, chunks.BLAKE3)
	if err != nil {
		return err
	}
	headers := tarheaders.NewRecorder()
	cw := &countingWriter{w: io.MultiWriter(h, table, headers)}
	err = writeTar(ctx, cw, l.entries)
	regions, herr := headers.Finish()
	if err != nil {
		return err
	}
	l.digest = v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
	l.size = cw.n
	if l.annotations == nil {
		l.annotations = map[string]string{}
	}
	t := table.Table()
	l.annotations[t.Key()] = t.Encode()
	return addTarHeaders(l.annotations, regions, herr)
}

// addTarHeaders puts the tar header annotation of regions, as a
// tarheaders.Recorder found them, into ann; a tar with too many headers
// gets none.
func addTarHeaders(ann map[string]string, regions []tarheaders.Region, err error) error {
	if errors.Is(err, tarheaders.ErrTooLarge) {
		return nil
	}
	if err != nil {
		return err
	}
	s, err := tarheaders.Encode(regions)
	if err != nil {
		return err
	}
	ann[tarheaders.Annotation] = s
	return nil
}

// hashLayers hashes the layers, a few at a time: reading and hashing each
// large file is the bulk of Build's work and the files are independent.
// The first error cancels the others and is returned.
func hashLayers(ctx context.Context, layers []*layer) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(min(runtime.GOMAXPROCS(0), 4))
	for _, l := range layers {
		if gctx.Err() != nil {
			break // a hash failed or ctx ended: start no more
		}
		g.Go(func() error { return l.hash(gctx) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// writeTar writes the tar of entries to w. It is the one source of a
// layer's bytes, for hashing and for streaming alike, so both agree.
func writeTar(ctx context.Context, w io.Writer, entries []entry) error {
	tw := tar.NewWriter(w)
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr := &tar.Header{
			Typeflag: e.typ,
			Name:     e.name,
			Linkname: e.link,
			Mode:     e.mode,
			Size:     e.size,
			ModTime:  e.mtime,
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("tar header %s: %w", e.name, err)
		}
		if e.typ == tar.TypeReg && e.size > 0 {
			if err := copyFile(ctx, tw, e); err != nil {
				return err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("close tar: %w", err)
	}
	return nil
}

// copyFile copies exactly e.size bytes of e.src into tw, checking ctx
// between chunks so cancelling a multi-GiB hash does not wait for it.
func copyFile(ctx context.Context, tw io.Writer, e entry) error {
	f, err := os.Open(e.src)
	if err != nil {
		return fmt.Errorf("open %s: %w", e.src, err)
	}
	defer f.Close()
	n, err := io.CopyBuffer(tw, &ctxReader{ctx: ctx, r: io.LimitReader(f, e.size)}, make([]byte, 1<<20))
	if err != nil {
		return fmt.Errorf("read %s: %w", e.src, err)
	}
	if n != e.size {
		return fmt.Errorf("read %s: file shrank from %d to %d bytes while packing", e.src, e.size, n)
	}
	return nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r *ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// errChanged reports a layer whose files no longer give the bytes Build saw.
var errChanged = errors.New("layer contents changed since the image was built")

// verifyingReader hashes a layer stream as it is read and turns its EOF
// into an error if the bytes do not match the layer's digest and size.
type verifyingReader struct {
	r    *io.PipeReader
	hash hash.Hash
	n    int64
	want v1.Hash
	size int64
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.hash.Write(p[:n])
	v.n += int64(n)
	if v.n > v.size {
		return n, fmt.Errorf("%w: more than %d bytes", errChanged, v.size)
	}
	if err == io.EOF {
		if got := hex.EncodeToString(v.hash.Sum(nil)); v.n != v.size || got != v.want.Hex {
			return n, fmt.Errorf("%w: got %d bytes sha256:%s, want %d bytes %s", errChanged, v.n, got, v.size, v.want)
		}
	}
	return n, err
}

func (v *verifyingReader) Close() error { return v.r.Close() }
