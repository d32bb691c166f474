package testutil

import (
	"bytes"
	"encoding/json"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
)

// WithConfig returns img with its config replaced by rawCfg and its
// manifest by m (img's own when nil), m's config descriptor set to name
// rawCfg. The layers are img's.
func WithConfig(img v1.Image, m *v1.Manifest, rawCfg []byte) (v1.Image, error) {
	if m == nil {
		var err error
		if m, err = img.Manifest(); err != nil {
			return nil, err
		}
	}
	m = m.DeepCopy()
	var err error
	if m.Config.Digest, m.Config.Size, err = v1.SHA256(bytes.NewReader(rawCfg)); err != nil {
		return nil, err
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return &editedImage{Image: img, raw: raw, m: m, rawCfg: rawCfg}, nil
}

// editedImage is an image with its manifest and config replaced, naming
// the same layers; the blobs come from the embedded image.
type editedImage struct {
	v1.Image
	raw    []byte
	m      *v1.Manifest
	rawCfg []byte
}

func (i *editedImage) RawManifest() ([]byte, error)    { return i.raw, nil }
func (i *editedImage) Manifest() (*v1.Manifest, error) { return i.m.DeepCopy(), nil }
func (i *editedImage) Size() (int64, error)            { return int64(len(i.raw)), nil }
func (i *editedImage) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(i.raw))
	return h, err
}
func (i *editedImage) RawConfigFile() ([]byte, error) { return i.rawCfg, nil }
func (i *editedImage) ConfigName() (v1.Hash, error)   { return i.m.Config.Digest, nil }
func (i *editedImage) ConfigFile() (*v1.ConfigFile, error) {
	return v1.ParseConfigFile(bytes.NewReader(i.rawCfg))
}

// ConfigLayer is the new config, to upload.
func (i *editedImage) ConfigLayer() (v1.Layer, error) {
	return static.NewLayer(i.rawCfg, i.m.Config.MediaType), nil
}

// LayerByDigest is img's, except for the new config.
func (i *editedImage) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	if h == i.m.Config.Digest {
		return i.ConfigLayer()
	}
	return i.Image.LayerByDigest(h)
}
