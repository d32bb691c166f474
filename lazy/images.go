package lazy

import (
	"fmt"
	iofs "io/fs"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/layer"
)

// knownImage is an image as the Manager describes its layers: its record,
// parsed once, and each layer described (its chunk table decoded, its key
// computed) once. Every Prepare of a layer describes it, and so does the
// warm-up of its image; the record and the tables grow with the image (a
// 16 GiB layer's table is 171 KiB of base64, which took milliseconds to
// parse each time), and what a Prepare costs should not.
type knownImage struct {
	pinned string // the image, by its manifest digest
	repo   string // where its blobs are fetched
	rec    imageRecord
	size   int // the record's encoded bytes: what knownImages counts

	mu     sync.Mutex
	layers map[digest.Digest]described
}

func newKnownImage(pinned name.Digest, rec imageRecord, size int) *knownImage {
	return &knownImage{pinned: pinned.String(), repo: pinned.Context().Name(), rec: rec, size: size,
		layers: make(map[digest.Digest]described)}
}

// describe returns layer d as the image's manifest describes it.
func (ki *knownImage) describe(d digest.Digest) (described, error) {
	ki.mu.Lock()
	defer ki.mu.Unlock()
	if dl, ok := ki.layers[d]; ok {
		return dl, nil
	}
	for _, l := range ki.rec.Layers {
		if l.Digest == d {
			desc := layer.Descriptor{Digest: d, Size: l.Size, MediaType: l.MediaType, DiffID: l.DiffID, Annotations: l.Annotations}
			dl := newDescribed(ki.pinned, ki.repo, desc)
			ki.layers[d] = dl
			return dl, nil
		}
	}
	return described{}, fmt.Errorf("layer %s is not in image %s: %w", d, ki.pinned, iofs.ErrNotExist)
}

// maxKnownBytes bounds the records the Manager keeps parsed: about fifty
// images of 16 GiB, many more of the usual size.
const maxKnownBytes = 8 << 20

// knownImages are the images the Manager has described, by pinned
// reference, the oldest forgotten first once their records pass
// maxKnownBytes. What a record says of an image never changes (its
// manifest's digest pins it), so a parsed one serves as long as it is
// kept.
type knownImages struct {
	mu    sync.Mutex
	byRef map[string]*knownImage
	order []string // oldest first
	bytes int
}

func (c *knownImages) get(ref string) *knownImage {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byRef[ref]
}

// add keeps ki, unless an image of its reference is kept already: that
// one is returned, so that its layers are described once.
func (c *knownImages) add(ki *knownImage) *knownImage {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byRef == nil {
		c.byRef = make(map[string]*knownImage)
	}
	if kept := c.byRef[ki.pinned]; kept != nil {
		return kept
	}
	c.byRef[ki.pinned] = ki
	c.order = append(c.order, ki.pinned)
	c.bytes += ki.size
	for c.bytes > maxKnownBytes && len(c.order) > 1 {
		old := c.byRef[c.order[0]]
		delete(c.byRef, c.order[0])
		c.order = c.order[1:]
		c.bytes -= old.size
	}
	return ki
}
