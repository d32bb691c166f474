package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/annotations"
)

// Limits on what is read into memory from a registry.
const (
	maxManifestSize = 4 << 20
	maxConfigSize   = 32 << 20
	// maxConfigAnnotations bounds the layer annotations taken from a
	// config over all of an image's layers (package annotations): twice
	// the largest chunk table (chunks.MaxAnnotation).
	maxConfigAnnotations = 16 << 20
)

// Image is an image manifest resolved from a reference, with its config and
// layers.
type Image struct {
	// Ref is the reference as parsed (tag or digest).
	Ref name.Reference
	// Digest is the digest of the image manifest (of the platform's
	// manifest when the reference named an index).
	Digest digest.Digest
	// Manifest is the image manifest.
	Manifest *v1.Manifest
	// Config is the image config's platform and root file system, the
	// rest left out (parseConfig); nil for an artifact whose config cannot
	// be parsed as one.
	Config *v1.ConfigFile
	// Layers are the manifest's layers, base first.
	Layers []*Layer
}

// Layer is one layer of an Image.
type Layer struct {
	// Digest is the digest of the layer blob.
	Digest digest.Digest
	// Size is the blob's size in bytes.
	Size int64
	// MediaType is the layer's media type from the manifest.
	MediaType string
	// DiffID is the digest of the uncompressed layer from the config, or
	// empty when the config does not give it.
	DiffID digest.Digest
	// Annotations are the layer descriptor's annotations, with the
	// layer's weightsnap annotations from the config (package
	// annotations) where the descriptor does not have them.
	Annotations map[string]string
	// Blob reads the layer blob.
	Blob *Blob
}

// ResolveOption tunes one Resolve.
type ResolveOption func(*resolveOptions)

type resolveOptions struct {
	heads func(v1.Descriptor) bool
	local LocalContent
}

// LocalContent returns the content of digest d that this node already
// holds (containerd's content store, say), or an error if it holds none
// or more than max bytes of it. Resolve checks it against d.
type LocalContent func(ctx context.Context, d digest.Digest, max int64) ([]byte, error)

// WithLocalContent has Resolve take a manifest named by digest, and the
// config, from local before it asks the registry: at a layer's first
// Prepare, containerd's pull has both in its content store, and each is a
// request to the registry less. What local lacks, or gives wrong (not
// matching its digest), comes from the registry as without it. The reads
// of one Resolve share a deadline (localBudget), and after one fails the
// rest go to the registry at once: a hung content store delays a resolve
// by localBudget at most.
func WithLocalContent(local LocalContent) ResolveOption {
	return func(o *resolveOptions) { o.local = local }
}

// WithLayerHeads has Resolve ask the registry for the size of each layer
// blob that want selects while it fetches the config, for the OpenBlob of
// the layer that follows (within 30 s): the round trip of its HEAD is then
// not one more after the config's.
func WithLayerHeads(want func(v1.Descriptor) bool) ResolveOption {
	return func(o *resolveOptions) { o.heads = want }
}

var manifestAccept = strings.Join([]string{
	string(types.OCIManifestSchema1),
	string(types.DockerManifestSchema2),
	string(types.OCIImageIndex),
	string(types.DockerManifestList),
}, ", ")

// Resolve resolves ref (a tag or a digest reference) to an image manifest,
// choosing the platform's manifest when ref names an index, and fetches its
// config. Manifests and config are verified against their digests.
func (c *Client) Resolve(ctx context.Context, ref string, opts ...ResolveOption) (*Image, error) {
	var o resolveOptions
	for _, opt := range opts {
		opt(&o)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	src, err := c.source(r.Context())
	if err != nil {
		return nil, err
	}
	// The manifest and config may come from this node's content store; the
	// layers' blobs always from the registry.
	lsrc := src.withLocal(o.local)
	dgst, m, err := lsrc.imageManifest(ctx, r, c.o.platform)
	if err != nil {
		return nil, err
	}
	if o.heads != nil {
		c.startHeads(ctx, src, m.Layers, o.heads)
	}
	img := &Image{Ref: r, Digest: dgst, Manifest: m}
	var rawCfg []byte
	if img.Config, rawCfg, err = lsrc.config(ctx, m.Config); err != nil {
		return nil, fmt.Errorf("image %s: %w", r, err)
	}
	if img.Layers, err = src.layers(m, img.Config, rawCfg); err != nil {
		return nil, fmt.Errorf("image %s: %w", r, err)
	}
	return img, nil
}

// maxResolveHeads bounds the HEADs one Resolve starts: a manifest may
// list thousands of layers, and each HEAD is a request and a goroutine
// in the process serving every mount. Layers past it are asked for by
// their OpenBlob, one at a time as before.
const maxResolveHeads = 16

// startHeads starts the HEADs of the distinct layers of ls that want
// selects, at most maxResolveHeads.
func (c *Client) startHeads(ctx context.Context, src *source, ls []v1.Descriptor, want func(v1.Descriptor) bool) {
	started := map[digest.Digest]bool{}
	for _, l := range ls {
		d, err := digest.Parse(l.Digest.String())
		if err != nil || started[d] || !want(l) {
			continue
		}
		if len(started) == maxResolveHeads {
			return
		}
		started[d] = true
		c.heads.start(ctx, &Blob{src: src, digest: d})
	}
}

// imageManifest fetches the image manifest r names, through an index to
// the manifest for platform p if r names one.
func (s *source) imageManifest(ctx context.Context, r name.Reference, p v1.Platform) (digest.Digest, *v1.Manifest, error) {
	raw, mt, dgst, err := s.manifest(ctx, r.Identifier(), r.String())
	if err != nil {
		return "", nil, err
	}
	if mt.IsIndex() {
		idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
		if err != nil {
			return "", nil, fmt.Errorf("%w: index %s: %v", ErrBadResponse, r, err)
		}
		child, err := pickPlatform(idx, p)
		if err != nil {
			return "", nil, fmt.Errorf("image %s: %w", r, err)
		}
		what := r.Context().Name() + "@" + child.Digest.String()
		if raw, mt, dgst, err = s.manifest(ctx, child.Digest.String(), what); err != nil {
			return "", nil, err
		}
		if mt.IsIndex() {
			return "", nil, fmt.Errorf("%w: image %s: nested index %s for platform %s", ErrBadResponse, r, child.Digest, platformString(p))
		}
	}
	if !mt.IsImage() {
		return "", nil, fmt.Errorf("%w: image %s: unsupported manifest media type %q", ErrBadResponse, r, mt)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return "", nil, fmt.Errorf("%w: manifest of %s: %v", ErrBadResponse, r, err)
	}
	return dgst, m, nil
}

// layers lists the layers of m, each with a Blob of s and, when cfg gives
// them, its DiffID, and with the annotations rawCfg, the config as
// fetched, holds for it.
func (s *source) layers(m *v1.Manifest, cfg *v1.ConfigFile, rawCfg []byte) ([]*Layer, error) {
	inConfig := annotations.FromConfig(rawCfg, m.Layers)
	var layers []*Layer
	taken := 0 // bytes of config annotations given to layers so far
	for i, l := range m.Layers {
		ld, err := digest.Parse(l.Digest.String())
		if err != nil {
			return nil, fmt.Errorf("%w: layer %d digest: %v", ErrBadResponse, i, err)
		}
		// A manifest may name one blob many times; each use gets its
		// config entry, so they are counted per use.
		for k, v := range inConfig[ld.String()] {
			taken += len(k) + len(v)
		}
		if taken > maxConfigAnnotations {
			return nil, fmt.Errorf("%w: more than %d bytes of layer annotations from the config", ErrBadResponse, maxConfigAnnotations)
		}
		layer := &Layer{
			Digest:      ld,
			Size:        l.Size,
			MediaType:   string(l.MediaType),
			Annotations: annotations.Merge(l.Annotations, inConfig[ld.String()]),
			Blob:        &Blob{src: s, digest: ld, size: l.Size},
		}
		if cfg != nil && len(cfg.RootFS.DiffIDs) == len(m.Layers) {
			layer.DiffID, _ = digest.Parse(cfg.RootFS.DiffIDs[i].String())
		}
		layers = append(layers, layer)
	}
	return layers, nil
}

// manifest fetches the manifest named by id (a tag or digest), from the
// source's local content if it holds it by digest, and returns it with
// its media type and digest; what names it in errors.
func (s *source) manifest(ctx context.Context, id, what string) ([]byte, types.MediaType, digest.Digest, error) {
	var contentType string
	raw := s.fromLocal(ctx, id, maxManifestSize)
	if raw == nil {
		var err error
		if raw, contentType, err = s.fetchManifest(ctx, id, what); err != nil {
			return nil, "", "", err
		}
	}

	dgst := digest.FromBytes(raw)
	if want, err := digest.Parse(id); err == nil {
		if !want.Algorithm().Available() {
			return nil, "", "", fmt.Errorf("%w: manifest %s: unsupported digest algorithm", ErrBadResponse, what)
		}
		if got := want.Algorithm().FromBytes(raw); got != want {
			return nil, "", "", fmt.Errorf("%w: manifest %s has digest %s", ErrBadResponse, what, got)
		}
		dgst = want
	}

	// The body's own mediaType is authoritative; some registries send
	// application/json or nothing as Content-Type.
	var probe struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
		Config    json.RawMessage `json:"config"`
	}
	if err := json.Unmarshal(raw, &probe); err != nil {
		return nil, "", "", fmt.Errorf("%w: manifest %s: %v", ErrBadResponse, what, err)
	}
	mt := types.MediaType(probe.MediaType)
	if mt == "" {
		if ct, _, err := mime.ParseMediaType(contentType); err == nil {
			mt = types.MediaType(ct)
		}
	}
	if !mt.IsIndex() && !mt.IsImage() {
		switch {
		case probe.Manifests != nil:
			mt = types.OCIImageIndex
		case probe.Config != nil:
			mt = types.OCIManifestSchema1
		}
	}
	return raw, mt, dgst, nil
}

// config fetches and parses an image config blob, and returns it parsed
// (nil for an artifact config that is not an image config) and as
// fetched, checked against its digest.
func (s *source) config(ctx context.Context, desc v1.Descriptor) (*v1.ConfigFile, []byte, error) {
	if desc.Size > maxConfigSize || desc.Size < 0 {
		return nil, nil, fmt.Errorf("%w: config of %d bytes", ErrBadResponse, desc.Size)
	}
	cd, err := digest.Parse(desc.Digest.String())
	if err != nil {
		return nil, nil, fmt.Errorf("%w: config digest: %v", ErrBadResponse, err)
	}
	raw := s.fromLocal(ctx, cd.String(), desc.Size)
	if int64(len(raw)) != desc.Size {
		raw = make([]byte, desc.Size)
		b := &Blob{src: s, digest: cd, size: desc.Size}
		if _, err := b.ReadAt(ctx, raw, 0); err != nil && err != io.EOF {
			return nil, nil, fmt.Errorf("config: %w", err)
		}
	}
	if got := cd.Algorithm().FromBytes(raw); got != cd {
		return nil, nil, fmt.Errorf("%w: config %s has digest %s", ErrBadResponse, cd, got)
	}
	cfg, err := parseConfig(raw)
	if err != nil {
		if desc.MediaType.IsConfig() {
			return nil, nil, fmt.Errorf("%w: config %s: %v", ErrBadResponse, cd, err)
		}
		// An artifact's config need not be an image config; it may still
		// hold layer annotations.
		return nil, raw, nil
	}
	return cfg, raw, nil
}

// parseConfig parses what this package uses of an image config: its
// platform and root file system. The rest (history, environment, labels)
// is skipped unread: a config is untrusted input of up to maxConfigSize,
// and go-containerregistry's full parse of 31 MiB of empty history entries
// took 1.7 GiB.
func parseConfig(raw []byte) (*v1.ConfigFile, error) {
	var c struct {
		Architecture string    `json:"architecture"`
		OS           string    `json:"os"`
		OSVersion    string    `json:"os.version,omitempty"`
		Variant      string    `json:"variant,omitempty"`
		RootFS       v1.RootFS `json:"rootfs"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	return &v1.ConfigFile{Architecture: c.Architecture, OS: c.OS, OSVersion: c.OSVersion, Variant: c.Variant, RootFS: c.RootFS}, nil
}

// pickPlatform returns the first manifest of idx whose platform satisfies p.
func pickPlatform(idx *v1.IndexManifest, p v1.Platform) (v1.Descriptor, error) {
	var have []string
	for _, d := range idx.Manifests {
		if d.Platform == nil {
			continue
		}
		if d.Platform.Satisfies(p) {
			return d, nil
		}
		have = append(have, platformString(*d.Platform))
	}
	return v1.Descriptor{}, fmt.Errorf("%w: no manifest for platform %s (index has: %s)", ErrImageNotFound, platformString(p), strings.Join(have, ", "))
}

func platformString(p v1.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// localBudget bounds the time one Resolve spends reading local content,
// all its reads together: a unix socket on the node answers in
// milliseconds, and a content store that does not is skipped.
var localBudget = time.Second

// localReads is one Resolve's use of local content.
type localReads struct {
	get      LocalContent
	deadline time.Time
	off      bool // a read failed: the rest go to the registry
}

// withLocal returns s reading local content through local first, for
// one Resolve.
func (s *source) withLocal(local LocalContent) *source {
	if local == nil {
		return s
	}
	c := *s
	c.local = &localReads{get: local, deadline: time.Now().Add(localBudget)}
	return &c
}

// fromLocal returns the content id names if id is a digest and s's local
// content holds it, at most max bytes and matching the digest; nil
// otherwise.
func (s *source) fromLocal(ctx context.Context, id string, max int64) []byte {
	d, err := digest.Parse(id)
	l := s.local
	if l == nil || l.off || err != nil || !d.Algorithm().Available() {
		return nil
	}
	ctx, cancel := context.WithDeadline(ctx, l.deadline)
	defer cancel()
	raw, err := l.get(ctx, d, max)
	switch {
	case err != nil:
		l.off = true
		log.G(ctx).WithError(err).WithField("digest", d).Debug("content not read locally; asking the registry")
		return nil
	case int64(len(raw)) > max:
		l.off = true
		return nil
	case d.Algorithm().FromBytes(raw) != d:
		log.G(ctx).WithField("digest", d).Warn("local content does not match its digest; asking the registry")
		return nil
	}
	return raw
}

// fetchManifest GETs the manifest named by id from the registry, and
// returns it with the Content-Type the registry gave it.
func (s *source) fetchManifest(ctx context.Context, id, what string) ([]byte, string, error) {
	var raw []byte
	var contentType string
	err := s.do(ctx, func(ctx context.Context, e *endpoint) (bool, error) {
		hdr := http.Header{"Accept": {manifestAccept}}
		resp, body, err := e.roundTrip(ctx, http.MethodGet, e.url("manifests", id), hdr)
		if err != nil {
			return false, err
		}
		defer body.Close()
		if err := checkStatus(resp, what, ErrImageNotFound, http.StatusOK); err != nil {
			return false, err
		}
		if raw, err = io.ReadAll(io.LimitReader(body, maxManifestSize+1)); err != nil {
			return false, err
		}
		if len(raw) > maxManifestSize {
			return false, permanent(fmt.Errorf("%w: manifest %s larger than %d bytes", ErrBadResponse, what, maxManifestSize))
		}
		contentType = resp.Header.Get("Content-Type")
		return false, nil
	})
	return raw, contentType, err
}
