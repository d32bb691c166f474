package pack

import (
	"bytes"
	"encoding/json"
	"fmt"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// image is a built image: its manifest and config are fixed bytes, its
// layers stream from disk.
type image struct {
	layers   []*layer
	config   []byte
	manifest []byte
	digest   v1.Hash
	configH  v1.Hash
}

var _ v1.Image = (*image)(nil)

// newImage writes the config and manifest of hashed layers.
func newImage(layers []*layer, plat v1.Platform) (*image, error) {
	cfg := v1.ConfigFile{
		Architecture: plat.Architecture,
		OS:           plat.OS,
		OSVersion:    plat.OSVersion,
		Variant:      plat.Variant,
		OSFeatures:   plat.OSFeatures,
		Created:      v1.Time{Time: epoch},
		RootFS:       v1.RootFS{Type: "layers"},
	}
	man := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
	}
	for i, l := range layers {
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.digest)
		by := "weightsnap pack: directories and small files"
		if i > 0 {
			by = "weightsnap pack: " + l.entries[0].name
		}
		cfg.History = append(cfg.History, v1.History{Created: v1.Time{Time: epoch}, CreatedBy: by})
		man.Layers = append(man.Layers, v1.Descriptor{
			MediaType:   types.OCIUncompressedLayer,
			Size:        l.size,
			Digest:      l.digest,
			Annotations: l.annotations,
		})
	}
	rawCfg, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	cfgH, cfgSize, err := v1.SHA256(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, err
	}
	man.Config = v1.Descriptor{MediaType: types.OCIConfigJSON, Size: cfgSize, Digest: cfgH}
	rawMan, err := json.Marshal(man)
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	manH, _, err := v1.SHA256(bytes.NewReader(rawMan))
	if err != nil {
		return nil, err
	}
	return &image{layers: layers, config: rawCfg, manifest: rawMan, digest: manH, configH: cfgH}, nil
}

// Layers returns the layers in order: small files first, then one per
// large file.
func (i *image) Layers() ([]v1.Layer, error) {
	ls := make([]v1.Layer, len(i.layers))
	for n, l := range i.layers {
		ls[n] = l
	}
	return ls, nil
}

// MediaType is the OCI image manifest type.
func (i *image) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

// Size is the size of the manifest.
func (i *image) Size() (int64, error) { return int64(len(i.manifest)), nil }

// ConfigName is the digest of the config blob.
func (i *image) ConfigName() (v1.Hash, error) { return i.configH, nil }

// ConfigFile returns a fresh parsed copy of the config.
func (i *image) ConfigFile() (*v1.ConfigFile, error) {
	return v1.ParseConfigFile(bytes.NewReader(i.config))
}

// RawConfigFile returns the config blob.
func (i *image) RawConfigFile() ([]byte, error) { return i.config, nil }

// Digest is the digest of the manifest, the image's identity.
func (i *image) Digest() (v1.Hash, error) { return i.digest, nil }

// Manifest returns a fresh parsed copy of the manifest.
func (i *image) Manifest() (*v1.Manifest, error) {
	return v1.ParseManifest(bytes.NewReader(i.manifest))
}

// RawManifest returns the manifest blob.
func (i *image) RawManifest() ([]byte, error) { return i.manifest, nil }

// LayerByDigest returns a layer, or the config blob as a layer, which is
// how ggcr's writers ask for it.
func (i *image) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	if h == i.configH {
		return static.NewLayer(i.config, types.OCIConfigJSON), nil
	}
	for _, l := range i.layers {
		if l.digest == h {
			return l, nil
		}
	}
	return nil, fmt.Errorf("image has no layer %s", h)
}

// LayerByDiffID returns a layer; diff IDs equal digests here.
func (i *image) LayerByDiffID(h v1.Hash) (v1.Layer, error) { return i.LayerByDigest(h) }
