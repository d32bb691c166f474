package lazy

import (
	"context"
	"encoding/json"
	"fmt"
	iofs "io/fs"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/remote"
)

// layerRecord is what the Manager remembers of a layer so that a remount
// after a restart needs no manifest from the registry.
type layerRecord struct {
	Repo        string            `json:"repo"`
	MediaType   string            `json:"mediaType"`
	Size        int64             `json:"size"`
	DiffID      digest.Digest     `json:"diffID"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

func recordName(d digest.Digest) string { return "layer/" + d.Encoded() + ".json" }

// descriptor is the layer descriptor of layer d with this record.
func (r layerRecord) descriptor(d digest.Digest) layer.Descriptor {
	return layer.Descriptor{Digest: d, Size: r.Size, MediaType: r.MediaType, DiffID: r.DiffID, Annotations: r.Annotations}
}

// describe returns the record of layer d of imageRef, resolving the image
// only when the record is not yet kept. The blob is fetched from imageRef's
// repository, whichever repository first recorded the layer.
func (m *Manager) describe(ctx context.Context, imageRef string, d digest.Digest) (layerRecord, error) {
	var rec layerRecord
	if b, err := m.store.GetMeta(recordName(d)); err == nil && json.Unmarshal(b, &rec) == nil && rec.Size > 0 {
		if ref, err := name.ParseReference(imageRef); err == nil {
			rec.Repo = ref.Context().Name()
		}
		return rec, nil
	}
	img, err := m.reg.Resolve(ctx, imageRef)
	if err != nil {
		return rec, err
	}
	for _, l := range m.record(img) {
		if l.digest == d {
			return l.layerRecord, nil
		}
	}
	return rec, fmt.Errorf("layer %s is not in image %s: %w", d, imageRef, iofs.ErrNotExist)
}

// recorded is a layer's record with its digest.
type recorded struct {
	digest digest.Digest
	layerRecord
}

// record keeps the records of img's layers and returns them.
func (m *Manager) record(img *remote.Image) []recorded {
	var recs []recorded
	for _, l := range img.Layers {
		r := layerRecord{Repo: img.Ref.Context().Name(), MediaType: l.MediaType, Size: l.Size, DiffID: l.DiffID, Annotations: l.Annotations}
		if b, err := json.Marshal(r); err == nil {
			_ = m.store.PutMeta(recordName(l.Digest), b)
		}
		recs = append(recs, recorded{l.Digest, r})
	}
	return recs
}
