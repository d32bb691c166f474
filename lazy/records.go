package lazy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"maps"
	"slices"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/remote"
)

// A layer's facts (media type, size, DiffID, annotations) come from the
// manifest and config of the image being mounted, never from another
// image that named the same blob: an image is resolved by digest (the CRI
// passes the manifest digest), and what the Manager keeps of it is kept
// under the digest its manifest bytes hashed to. A remount after a restart
// then needs no registry.

// imageRecord is what the Manager keeps of one image manifest.
type imageRecord struct {
	// Version is recordVersion. A record of an earlier version is used
	// only when the image cannot be resolved again.
	Version int           `json:"version,omitempty"`
	Layers  []layerRecord `json:"layers"`
}

// recordVersion 2: layer annotations include those of the image config
// (package annotations). A record an earlier version wrote of an image
// made by pack or convert now lacks its chunk tables.
const recordVersion = 2

// layerRecord is one layer of an imageRecord.
type layerRecord struct {
	Digest      digest.Digest     `json:"digest"`
	MediaType   string            `json:"mediaType"`
	Size        int64             `json:"size"`
	DiffID      digest.Digest     `json:"diffID"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

func imageRecordName(manifest digest.Digest) string {
	return "image/" + manifest.Algorithm().String() + "-" + manifest.Encoded() + ".json"
}

// described is a layer of a resolved image: where to fetch it and what
// its manifest says of it.
type described struct {
	image string // the image, pinned by its manifest digest
	repo  string // where the blob is fetched: the image's repository
	desc  layer.Descriptor
	// opened says a former process opened the layer, checking its size
	// with the registry: it is opened again without asking (Resume).
	opened bool
	// What desc's annotations say of its verification, and the key: made
	// once, by newDescribed.
	v     verification
	table *chunks.Table
	k     layerKey
}

func newDescribed(image, repo string, desc layer.Descriptor) described {
	dl := described{image: image, repo: repo, desc: desc}
	dl.v, dl.table = verificationOf(desc)
	dl.k = dl.computeKey()
	return dl
}

// key is what layers are shared by: the blob, every fact of the manifest
// that changes how the blob is read, and for a blob nothing but its digest
// covers, the repository it is fetched from. Two images that say the
// same of a blob share its opened layer; one that says otherwise gets one
// of its own, and cannot change what the other's pods read.
func (d described) key() layerKey { return d.k }

func (d described) computeKey() layerKey {
	facts := []any{d.desc.MediaType, d.desc.Size, d.desc.DiffID, sortedAnnotations(d.desc.Annotations)}
	if d.v == byBlob {
		// Served before it verified, if at all, from its repository
		// only (trust.go).
		facts = append(facts, d.repo)
	}
	b, _ := json.Marshal(facts)
	sum := sha256.Sum256(b)
	return layerKey{digest: d.desc.Digest, facts: hex.EncodeToString(sum[:8])}
}

// layerKey names a shared opened layer.
type layerKey struct {
	digest digest.Digest
	facts  string
}

func sortedAnnotations(a map[string]string) [][2]string {
	var kv [][2]string
	for _, k := range slices.Sorted(maps.Keys(a)) {
		kv = append(kv, [2]string{k, a[k]})
	}
	return kv
}

// describe returns layer d of imageRef as that image's manifest describes
// it. An image named by digest is looked up in what the Manager knows,
// then in the records; any other is resolved (tags move).
func (m *Manager) describe(ctx context.Context, imageRef string, d digest.Digest) (described, error) {
	ki, err := m.knownImage(ctx, imageRef)
	if err != nil {
		return described{}, err
	}
	return ki.describe(d)
}

// knownImage returns the image imageRef names.
func (m *Manager) knownImage(ctx context.Context, imageRef string) (*knownImage, error) {
	var stale *knownImage // from an earlier version's record
	if r, err := name.NewDigest(imageRef); err == nil {
		if ki := m.images.get(r.String()); ki != nil {
			return ki, nil
		}
		var rec imageRecord
		if b, err := m.store.GetMeta(imageRecordName(digest.Digest(r.DigestStr()))); err == nil && json.Unmarshal(b, &rec) == nil {
			if rec.Version == recordVersion {
				return m.images.add(newKnownImage(r, rec, len(b))), nil
			}
			stale = newKnownImage(r, rec, len(b))
		}
	}
	ref, err := m.resolves.Acquire(ctx, imageRef, func(ctx context.Context) (*knownImage, error) {
		opts := []remote.ResolveOption{remote.WithLayerHeads(mayOpen)}
		if m.opt.local != nil {
			opts = append(opts, remote.WithLocalContent(m.opt.local))
		}
		img, err := m.reg.Resolve(ctx, imageRef, opts...)
		if err != nil {
			return nil, err
		}
		rec, size := m.record(img)
		return m.images.add(newKnownImage(img.Ref.Context().Digest(img.Digest.String()), rec, size)), nil
	})
	if err != nil {
		if stale != nil {
			// What the earlier version served it with: a mount it held
			// is resumed without the registry, as before the upgrade.
			return stale, nil
		}
		return nil, err
	}
	defer ref.Release()
	return ref.Value(), nil
}

// mayOpen reports whether a layer, as its manifest describes it, may be
// opened at its first Prepare (see Warm), which asks the registry for its
// size: Resolve asks for it while it fetches the config.
func mayOpen(d v1.Descriptor) bool {
	return layer.MayBeRandomAccess(layer.Descriptor{MediaType: string(d.MediaType), Annotations: d.Annotations})
}

// pinnedRef is img's reference by the digest of its manifest.
func pinnedRef(img *remote.Image) string {
	return img.Ref.Context().Name() + "@" + img.Digest.String()
}

// record keeps what img's manifest and config say of its layers, under
// the manifest's digest, and returns it with its encoded size.
func (m *Manager) record(img *remote.Image) (imageRecord, int) {
	rec := imageRecord{Version: recordVersion}
	for _, l := range img.Layers {
		rec.Layers = append(rec.Layers, layerRecord{Digest: l.Digest, MediaType: l.MediaType, Size: l.Size, DiffID: l.DiffID, Annotations: l.Annotations})
	}
	b, err := json.Marshal(rec)
	if err == nil {
		_ = m.store.PutMeta(imageRecordName(img.Digest), b)
	}
	return rec, len(b)
}
