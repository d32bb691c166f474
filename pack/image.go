package pack

import (
	"bytes"
	"encoding/json"
	"fmt"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/weightsnap/weightsnap/annotations"
)

// imageCore is a built image reduced to what partial.CompressedToImage
// derives every other v1.Image method from: the manifest and config are
// fixed bytes, the layers stream from disk. A layer's blob is its tar, so
// "compressed" is ggcr's name for the blob as stored, not a claim of
// compression.
type imageCore struct {
	layers   []*layer
	config   []byte
	configH  v1.Hash
	manifest []byte
}

var _ partial.CompressedImageCore = (*imageCore)(nil)

// newImage writes the config and manifest of hashed layers.
func newImage(layers []*layer, plat v1.Platform) (v1.Image, error) {
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
	inConfig := map[string]map[string]string{}
	for i, l := range layers {
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.digest)
		by := "weightsnap pack: directories and small files"
		if i > 0 {
			by = "weightsnap pack: " + l.entries[0].name
		}
		cfg.History = append(cfg.History, v1.History{Created: v1.Time{Time: epoch}, CreatedBy: by})
		// The chunk table and tar headers go into the config, so that the
		// manifest's size does not grow with the layer's.
		ann, ws := annotations.Split(l.annotations)
		if ws != nil {
			inConfig[l.digest.String()] = ws
		}
		man.Layers = append(man.Layers, v1.Descriptor{
			MediaType:   types.OCIUncompressedLayer,
			Size:        l.size,
			Digest:      l.digest,
			Annotations: ann,
		})
	}
	rawCfg, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	if rawCfg, err = annotations.SetInConfig(rawCfg, inConfig); err != nil {
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
	return partial.CompressedToImage(&imageCore{layers: layers, config: rawCfg, configH: cfgH, manifest: rawMan})
}

// MediaType is the OCI image manifest type.
func (i *imageCore) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

// RawManifest returns the manifest blob.
func (i *imageCore) RawManifest() ([]byte, error) { return i.manifest, nil }

// RawConfigFile returns the config blob.
func (i *imageCore) RawConfigFile() ([]byte, error) { return i.config, nil }

// LayerByDigest returns a layer, or the config blob as a layer, which is
// how ggcr's writers may ask for it. Layers and LayerByDiffID (diff IDs
// equal digests here) come through it.
func (i *imageCore) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if h == i.configH {
		return partial.ConfigLayer(i)
	}
	for _, l := range i.layers {
		if l.digest == h {
			return l, nil
		}
	}
	return nil, fmt.Errorf("image has no layer %s", h)
}
