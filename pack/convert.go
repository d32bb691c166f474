package pack

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/weightsnap/weightsnap/chunks"
)

// Convert makes the image src lazily verifiable: it adds a chunk table
// (chunks.Annotation) to every layer descriptor that lacks a valid one,
// and pushes the result as dst. Every layer blob and the config are reused
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
		if _, err := chunks.Parse(desc.Annotations[chunks.Annotation], desc.Size); err == nil {
			continue
		}
		changed = true
		t, err := layerTable(img, desc)
		if err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i, desc.Digest, err)
		}
		ann := maps.Clone(desc.Annotations)
		if ann == nil {
			ann = map[string]string{}
		}
		ann[chunks.Annotation] = t.Encode()
		m.Layers[i].Annotations = ann
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

// layerTable reads the blob of desc and returns its chunk table. The blob
// is verified against its digest as it is read, so the table is of the
// bytes the manifest names.
func layerTable(img v1.Image, desc v1.Descriptor) (*chunks.Table, error) {
	l, err := img.LayerByDigest(desc.Digest)
	if err != nil {
		return nil, err
	}
	rc, err := l.Compressed() // the blob as stored: verified against its digest at EOF
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	t, err := chunks.Compute(rc, desc.Size, chunks.DefaultChunkSize)
	if err != nil {
		return nil, err
	}
	// Reading to EOF is what makes the reader check the digest.
	if n, err := io.Copy(io.Discard, rc); err != nil || n != 0 {
		return nil, fmt.Errorf("blob longer than its descriptor's %d bytes, or corrupt: %d more, %v", desc.Size, n, err)
	}
	return t, nil
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
