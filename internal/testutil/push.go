package testutil

import (
	"encoding/json"
	"runtime"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// PushImage pushes an OCI image of layers (base first) to the plain-HTTP
// registry at addr ("host:port") as repoTag ("repo:tag") and returns the
// reference "addr/repoTag".
func PushImage(t testing.TB, addr, repoTag string, layers []LayerBlob) (ref string) {
	t.Helper()
	ref, _ = PushImageWithDigest(t, addr, repoTag, layers)
	return ref
}

// PushImageWithDigest is PushImage that also returns the manifest digest
// ("sha256:…"). The manifest carries each layer's media type and
// annotations; the config is a valid linux image config for this machine's
// architecture with the layers' diff IDs.
func PushImageWithDigest(t testing.TB, addr, repoTag string, layers []LayerBlob) (ref, manifestDigest string) {
	t.Helper()
	tag, err := name.NewTag(addr+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatalf("push image: parse reference: %v", err)
	}
	opts := []remote.Option{remote.WithContext(t.Context())}

	manifest := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
	}
	config := v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		RootFS:       v1.RootFS{Type: "layers"},
		Config:       v1.Config{Cmd: []string{"/bin/sh"}},
	}
	for i, l := range layers {
		desc, err := pushBlob(tag.Repository, l.Blob, types.MediaType(l.MediaType), opts)
		if err != nil {
			t.Fatalf("push image %s: layer %d: %v", tag, i, err)
		}
		desc.Annotations = l.Annotations
		manifest.Layers = append(manifest.Layers, desc)
		diffID, err := v1.NewHash(l.DiffID)
		if err != nil {
			t.Fatalf("push image %s: layer %d diff ID: %v", tag, i, err)
		}
		config.RootFS.DiffIDs = append(config.RootFS.DiffIDs, diffID)
	}
	configJSON, err := json.Marshal(config)
	if err != nil {
		t.Fatalf("push image %s: marshal config: %v", tag, err)
	}
	if manifest.Config, err = pushBlob(tag.Repository, configJSON, types.OCIConfigJSON, opts); err != nil {
		t.Fatalf("push image %s: config: %v", tag, err)
	}
	manifestJSON, err := json.Marshal(manifest)
	if err != nil {
		t.Fatalf("push image %s: marshal manifest: %v", tag, err)
	}
	if err := remote.Put(tag, rawManifest{manifestJSON, types.OCIManifestSchema1}, opts...); err != nil {
		t.Fatalf("push image %s: manifest: %v", tag, err)
	}
	return tag.String(), sha256Digest(manifestJSON)
}

func pushBlob(repo name.Repository, b []byte, mt types.MediaType, opts []remote.Option) (v1.Descriptor, error) {
	layer := static.NewLayer(b, mt)
	if err := remote.WriteLayer(repo, layer, opts...); err != nil {
		return v1.Descriptor{}, err
	}
	d, err := layer.Digest()
	if err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{MediaType: mt, Size: int64(len(b)), Digest: d}, nil
}

// rawManifest is a remote.Taggable for a manifest we serialised ourselves,
// so the pushed bytes, and so the digest, are exactly ours.
type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.b, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mt, nil }
