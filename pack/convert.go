package pack

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// Convert makes the image src lazily verifiable: it adds a chunk table
// (chunks.Annotation) to every layer descriptor that lacks a valid one,
// and the tar header annotation (tarheaders.Annotation) to every
// uncompressed tar layer that lacks one and has few enough headers, and
// pushes the result as dst. Every layer blob and the config are reused
// as they are, mounted across repositories of the same registry, so only
// a new manifest is uploaded; each blob is read once to compute its table.
// It returns dst by digest.
func Convert(ctx context.Context, src, dst string, plainHTTP bool) (name.Digest, error) {
	var nopts []name.Option
	if plainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	srcRef, err := name.ParseReference(src, nopts...)
	if err != nil {
		return name.Digest{}, fmt.Errorf("convert: %w", err)
	}
	dstRef, err := name.ParseReference(dst, nopts...)
	if err != nil {
		return name.Digest{}, fmt.Errorf("convert: %w", err)
	}
	opts := []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)}
	img, err := remote.Image(srcRef, opts...)
	if err != nil {
		return name.Digest{}, fmt.Errorf("convert %s: %w", src, err)
	}
	out, err := withChunkTables(img, srcRef)
	if err != nil {
		return name.Digest{}, fmt.Errorf("convert %s: %w", src, err)
	}
	if err := remote.Write(dstRef, out, opts...); err != nil {
		return name.Digest{}, fmt.Errorf("convert: push %s: %w", dst, err)
	}
	d, err := out.Digest()
	if err != nil {
		return name.Digest{}, err
	}
	return dstRef.Context().Digest(d.String()), nil
}

// withChunkTables returns img, read from src, with a chunk table on every
// layer descriptor of its manifest; nothing else changes.
func withChunkTables(img v1.Image, src name.Reference) (v1.Image, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	m = m.DeepCopy()
	changed := false
	for i, desc := range m.Layers {
		_, err := chunks.Find(desc.Annotations, desc.Size)
		needTable := err != nil
		needHeaders := isTar(string(desc.MediaType)) && !hasTarHeaders(desc)
		if !needTable && !needHeaders {
			continue
		}
		t, regions, herr, err := readBlob(img, desc, needHeaders)
		if err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i, desc.Digest, err)
		}
		ann := maps.Clone(desc.Annotations)
		if ann == nil {
			ann = map[string]string{}
		}
		if needTable {
			ann[t.Key()] = t.Encode()
		}
		if needHeaders {
			if herr != nil && !errors.Is(herr, tarheaders.ErrTooLarge) {
				// The node walks it, and says what is wrong with it.
				herr = tarheaders.ErrTooLarge
			}
			if err := addTarHeaders(ann, regions, herr); err != nil {
				return nil, fmt.Errorf("layer %d (%s): %w", i, desc.Digest, err)
			}
		}
		if !maps.Equal(ann, desc.Annotations) {
			changed = true
			m.Layers[i].Annotations = ann
		}
	}
	if !changed {
		return img, nil // the same manifest bytes, so the same digest
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return &manifestImage{Image: img, src: src, raw: raw, m: m}, nil
}

// isTar reports whether a layer of media type mt is an uncompressed tar,
// as package layer decides.
func isTar(mt string) bool { return strings.HasSuffix(mt, ".tar") }

// hasTarHeaders reports whether desc has a tar header annotation that
// parses.
func hasTarHeaders(desc v1.Descriptor) bool {
	s, ok := desc.Annotations[tarheaders.Annotation]
	if !ok {
		return false
	}
	_, err := tarheaders.Parse(s, desc.Size)
	return err == nil
}

// readBlob reads the blob of desc once and returns its chunk table and,
// with headers, its tar header regions (and why there are none: herr).
// The blob is verified against its digest as it is read, so both are of
// the bytes the manifest names.
func readBlob(img v1.Image, desc v1.Descriptor, headers bool) (t *chunks.Table, regions []tarheaders.Region, herr, err error) {
	l, err := img.LayerByDigest(desc.Digest)
	if err != nil {
		return nil, nil, nil, err
	}
	rc, err := l.Compressed() // the blob as stored: verified against its digest at EOF
	if err != nil {
		return nil, nil, nil, err
	}
	defer rc.Close()
	var r io.Reader = rc
	if headers {
		rec := tarheaders.NewRecorder()
		defer func() {
			regions, herr = rec.Finish()
			if err != nil {
				regions, herr = nil, nil
			}
		}()
		r = io.TeeReader(rc, rec)
	}
	t, err = chunks.Compute(r, desc.Size, chunks.DefaultChunkSize, chunks.BLAKE3)
	if err != nil {
		return nil, nil, nil, err
	}
	// Reading to EOF is what makes the reader check the digest.
	if n, err := io.Copy(io.Discard, r); err != nil || n != 0 {
		return nil, nil, nil, fmt.Errorf("blob longer than its descriptor's %d bytes, or corrupt: %d more, %v", desc.Size, n, err)
	}
	return t, nil, nil, nil
}

// manifestImage is an image with its manifest replaced.
type manifestImage struct {
	v1.Image
	src name.Reference // where its blobs are, to mount them from
	raw []byte
	m   *v1.Manifest
}

// ConfigLayer is the config as a blob to mount from the source, not to
// upload again: go-containerregistry mounts a layer across repositories
// only when it knows where it came from.
func (i *manifestImage) ConfigLayer() (v1.Layer, error) {
	l, err := partial.ConfigLayer(i.Image)
	if err != nil {
		return nil, err
	}
	return &remote.MountableLayer{Layer: l, Reference: i.src}, nil
}

func (i *manifestImage) RawManifest() ([]byte, error) { return i.raw, nil }
func (i *manifestImage) Manifest() (*v1.Manifest, error) {
	return i.m.DeepCopy(), nil
}
func (i *manifestImage) Size() (int64, error) { return int64(len(i.raw)), nil }
func (i *manifestImage) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(i.raw))
	return h, err
}
