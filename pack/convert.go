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
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"

	"github.com/weightsnap/weightsnap/annotations"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/tarheaders"
)

// Convert makes the image src lazily verifiable: it adds a chunk table
// (chunks.Annotation) for every layer that lacks a valid one, and the tar
// header annotation (tarheaders.Annotation) for every uncompressed tar
// layer that lacks one and has few enough headers, to the image config
// (package annotations), and pushes the result as dst. Every layer blob is
// reused as it is, mounted across repositories of the same registry, so
// only a new config and manifest are uploaded; each blob is read once to
// compute its table. It returns dst by digest.
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
	out, err := withChunkTables(img)
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

// withChunkTables returns img with a chunk table for every layer and tar
// headers for every tar layer that lacks them. They go into the config
// (package annotations), and so do those an earlier version put on the
// layer descriptors, so that the manifest's size does not grow with the
// model's; the layers and the manifest's other annotations do not change.
func withChunkTables(img v1.Image) (v1.Image, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, err
	}
	inConfig := annotations.FromConfig(rawCfg, m.Layers)
	if inConfig == nil {
		inConfig = map[string]map[string]string{}
	}
	// An artifact whose config is not a JSON object cannot hold them: its
	// layer descriptors do, as before.
	_, cfgErr := annotations.SetInConfig(rawCfg, nil)
	m = m.DeepCopy()
	changed := false
	for i := range m.Layers {
		desc := &m.Layers[i]
		key := desc.Digest.String()
		ann := annotations.Merge(desc.Annotations, inConfig[key]) // as a node reads them
		added, err := missingAnnotations(img, *desc, ann)
		if err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i, desc.Digest, err)
		}
		if cfgErr != nil {
			if len(added) > 0 {
				changed = true
				withAdded := maps.Clone(desc.Annotations)
				if withAdded == nil {
					withAdded = map[string]string{}
				}
				maps.Copy(withAdded, added)
				desc.Annotations = withAdded
			}
			continue
		}
		keep, moved := annotations.Split(desc.Annotations)
		if len(moved) == 0 && len(added) == 0 {
			continue
		}
		changed = true
		_, ws := annotations.Split(ann)
		if ws == nil {
			ws = map[string]string{}
		}
		if _, ok := added[chunks.Annotation]; ok {
			// The table it replaces was invalid, of either hash.
			for _, k := range chunks.Annotations {
				delete(ws, k)
			}
		}
		maps.Copy(ws, added)
		inConfig[key] = ws
		desc.Annotations = keep
	}
	if !changed {
		return img, nil // the same manifest bytes, so the same digest
	}
	if cfgErr == nil {
		if rawCfg, err = annotations.SetInConfig(rawCfg, inConfig); err != nil {
			return nil, err
		}
		if m.Config.Digest, m.Config.Size, err = v1.SHA256(bytes.NewReader(rawCfg)); err != nil {
			return nil, err
		}
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return &convertedImage{Image: img, raw: raw, m: m, rawCfg: rawCfg}, nil
}

// missingAnnotations returns the chunk table and tar headers that desc, a
// layer of img with annotations ann, lacks or has invalid, reading its
// blob once; none if it has both.
func missingAnnotations(img v1.Image, desc v1.Descriptor, ann map[string]string) (map[string]string, error) {
	_, err := chunks.Find(ann, desc.Size)
	needTable := err != nil
	needHeaders := isTar(string(desc.MediaType)) && !hasTarHeaders(ann, desc.Size)
	if !needTable && !needHeaders {
		return nil, nil
	}
	t, regions, herr, err := readBlob(img, desc, needHeaders)
	if err != nil {
		return nil, err
	}
	added := map[string]string{}
	if needTable {
		added[t.Key()] = t.Encode()
	}
	if needHeaders {
		if herr != nil && !errors.Is(herr, tarheaders.ErrTooLarge) {
			// The node walks it, and says what is wrong with it.
			herr = tarheaders.ErrTooLarge
		}
		if err := addTarHeaders(added, regions, herr); err != nil {
			return nil, err
		}
	}
	return added, nil
}

// isTar reports whether a layer of media type mt is an uncompressed tar,
// as package layer decides.
func isTar(mt string) bool { return strings.HasSuffix(mt, ".tar") }

// hasTarHeaders reports whether ann, of a blob of size bytes, has a tar
// header annotation that parses.
func hasTarHeaders(ann map[string]string, size int64) bool {
	s, ok := ann[tarheaders.Annotation]
	if !ok {
		return false
	}
	_, err := tarheaders.Parse(s, size)
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

// convertedImage is an image with its manifest and config replaced; its
// layers are the source's, which go-containerregistry mounts from the
// source's repository rather than upload, as they know where they came
// from.
type convertedImage struct {
	v1.Image
	raw    []byte
	m      *v1.Manifest
	rawCfg []byte
}

// LayerByDigest is the source's, except for the new config.
func (i *convertedImage) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	if h == i.m.Config.Digest {
		return i.ConfigLayer()
	}
	return i.Image.LayerByDigest(h)
}

// ConfigLayer is the new config, uploaded, not mounted: the source does
// not have it.
func (i *convertedImage) ConfigLayer() (v1.Layer, error) {
	return static.NewLayer(i.rawCfg, i.m.Config.MediaType), nil
}

func (i *convertedImage) RawConfigFile() ([]byte, error) { return i.rawCfg, nil }
func (i *convertedImage) ConfigName() (v1.Hash, error)   { return i.m.Config.Digest, nil }
func (i *convertedImage) ConfigFile() (*v1.ConfigFile, error) {
	return v1.ParseConfigFile(bytes.NewReader(i.rawCfg))
}
func (i *convertedImage) RawManifest() ([]byte, error) { return i.raw, nil }
func (i *convertedImage) Manifest() (*v1.Manifest, error) {
	return i.m.DeepCopy(), nil
}
func (i *convertedImage) Size() (int64, error) { return int64(len(i.raw)), nil }
func (i *convertedImage) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(i.raw))
	return h, err
}
