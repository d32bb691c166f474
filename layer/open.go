package layer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"

	"github.com/weightsnap/weightsnap/chunks"
)

// Opened is an open layer and what it can do beyond the Layer methods;
// callers look here rather than probe the Layer's type.
type Opened struct {
	Layer
	// Ranges is set when every regular file is a contiguous range of the
	// blob (uncompressed tar): read-ahead, background fill and passthrough
	// then work in blob offsets.
	Ranges Contiguous
	// Files is set when a read can be answered with the local file
	// holding its bytes (the Source is a FileSource), for FUSE to splice.
	Files FileReader
	// Streamed is set when the layer reads its whole blob once, from the
	// start, by itself (plain gzip or zstd): filling the Source ahead of
	// readers would only fetch the blob twice.
	Streamed bool
	// Confirm is set when the index was taken from the descriptor's tar
	// header annotation (WithTarHeaders) and is being checked against the
	// blob. Reads of file content wait for it by themselves; what else
	// works from the index's file ranges (read-ahead, passthrough,
	// segments) should too.
	Confirm *Confirmation
}

// Option configures Open.
type Option func(*options)

type options struct {
	open      func(ctx context.Context) (io.ReadCloser, error)
	streams   StreamStore
	meta      MetaStore
	expansion expansion
	table     *chunks.Table
	verified  bool
	claimed   bool
}

// WithStreams lets Open stream a compressed layer it cannot read by range:
// open reads the blob from its start, and streams keeps the decompressed
// tar. Without it such a layer is ErrUnsupported.
func WithStreams(open func(ctx context.Context) (io.ReadCloser, error), streams StreamStore) Option {
	return func(o *options) { o.open, o.streams = open, streams }
}

// WithMaxExpansion bounds what a streamed layer (WithStreams) may
// decompress to: ratio times the size of its blob, and limit bytes in all.
// A blob that goes past either is a decompression bomb: its Stream is
// aborted with an ErrCorrupt error before it fills the cache. A value of
// 0 or less keeps the default, DefaultMaxExpansion or
// DefaultMaxStreamSize.
func WithMaxExpansion(ratio, limit int64) Option {
	return func(o *options) {
		if ratio > 0 {
			o.expansion.ratio = ratio
		}
		if limit > 0 {
			o.expansion.limit = limit
		}
	}
}

// WithTable gives the chunk table of the blob (see package chunks), which
// a streamed layer checks each chunk against before decompressing it. A
// layer read by range is checked by its Source instead.
func WithTable(t *chunks.Table) Option {
	return func(o *options) { o.table = t }
}

// WithMeta keeps built indexes in meta, so that the next open of the same
// blob does not build them again. Only indexes of verified bytes are kept
// and reused: a streamed layer's once its stream verified, a tar or TOC
// index only WithVerifiedSource. Otherwise an image could plant, under a
// blob's digest, the index of other bytes for every later mount of it.
func WithMeta(meta MetaStore) Option {
	return func(o *options) { o.meta = meta }
}

// WithVerifiedSource says that the Source's bytes were verified against
// the blob digest (the whole blob is cached and checked), so that indexes
// read from it may be kept and reused (WithMeta).
func WithVerifiedSource() Option {
	return func(o *options) { o.verified = true }
}

// WithTarHeaders lets Open index an uncompressed tar from its
// descriptor's tar header annotation (package tarheaders) without reading
// the blob, and confirm it against the blob in the background
// (Opened.Confirm). Give it only when the Source's bytes are checked
// against a digest the same manifest pins (a chunk table): the claim is
// then as good as a walk of those bytes once it is confirmed, and until
// then no file content is served.
func WithTarHeaders() Option {
	return func(o *options) { o.claimed = true }
}

// rangeMeta is the MetaStore of a layer read by range: none unless its
// Source is verified.
func (o options) rangeMeta() MetaStore {
	if o.verified {
		return o.meta
	}
	return nil
}

// Open opens a layer in the format its media type names, looking at the
// blob's first bytes when the media type is generic:
//   - uncompressed tar → indexed by its headers (tar.go);
//   - gzip or zstd with an eStargz/zstd:chunked TOC (announced by the TOC
//     digest or zstd:chunked manifest annotation; for a blob of generic
//     media type, found by its footer) → indexed by its TOC (stargz.go);
//     a TOC without chunk digests (legacy stargz) falls back to a stream;
//   - other gzip or zstd → streamed whole (stream.go, WithStreams).
//
// src may be nil when only a sequential read of the blob is possible;
// every format is then streamed.
func Open(ctx context.Context, d Descriptor, src Source, opts ...Option) (*Opened, error) {
	o := options{expansion: defaultExpansion}
	for _, opt := range opts {
		opt(&o)
	}
	if err := checkSize(d, src); err != nil {
		return nil, err
	}
	kind, err := detect(ctx, d, src)
	if err != nil {
		return nil, err
	}
	if src != nil {
		switch kind {
		case "tar":
			l, err := openTar(ctx, d, src, o.rangeMeta(), o.claimed)
			if err != nil {
				return nil, err
			}
			op := &Opened{Layer: l, Ranges: l, Confirm: l.confirm}
			if fsrc, ok := src.(FileSource); ok {
				op.Files = tarFiles{l, fsrc}
			}
			return op, nil
		case "compressed":
			if mayHaveTOC(d) && hasTOCFooter(ctx, src) {
				l, err := openStargz(ctx, d, src, o.rangeMeta())
				if err == nil {
					return &Opened{Layer: l}, nil
				}
				if !errors.Is(err, errNoTOC) && !errors.Is(err, errUnverifiable) {
					return nil, err
				}
			}
		}
	}
	if o.streams == nil {
		return nil, fmt.Errorf("layer %s (%s): %w: needs a stream store", d.Digest, d.MediaType, ErrUnsupported)
	}
	l, err := openStream(ctx, d, o)
	if err != nil {
		return nil, err
	}
	return &Opened{Layer: l, Streamed: true}, nil
}

// checkSize refuses a descriptor whose size is not the Source's, before
// anything is read or allocated: the index would describe other bytes,
// and a size is what a hostile manifest would lie about. A size of 0 is
// unknown; a streamed blob is checked against it as it is read.
func checkSize(d Descriptor, src Source) error {
	switch {
	case d.Size < 0:
		return fmt.Errorf("%w: layer %s: descriptor says %d bytes", ErrCorrupt, d.Digest, d.Size)
	case src != nil && d.Size > 0 && src.Size() != d.Size:
		return fmt.Errorf("%w: layer %s: blob is %d bytes, descriptor says %d", ErrCorrupt, d.Digest, src.Size(), d.Size)
	}
	return nil
}

// detect says "tar" or "compressed".
func detect(ctx context.Context, d Descriptor, src Source) (string, error) {
	mt := d.MediaType
	switch {
	case strings.HasSuffix(mt, ".tar"):
		return "tar", nil
	case strings.HasSuffix(mt, "gzip") || strings.HasSuffix(mt, "zstd"):
		return "compressed", nil
	}
	if src == nil {
		// A stream detects the compression from its first bytes too.
		return "compressed", nil
	}
	head := make([]byte, 512)
	n, err := readFull(ctx, src.ReadAt, head[:min(int64(len(head)), src.Size())], 0)
	if err != nil && err != io.EOF {
		return "", fmt.Errorf("layer %s: reading magic: %w", d.Digest, err)
	}
	head = head[:n]
	switch {
	case bytes.HasPrefix(head, gzipMagic), bytes.HasPrefix(head, zstdMagic):
		return "compressed", nil
	case len(head) == 512 && (bytes.HasPrefix(head[257:], []byte("ustar"))):
		return "tar", nil
	}
	return "", fmt.Errorf("layer %s (%s): %w: not a tar, gzip or zstd blob", d.Digest, mt, ErrUnsupported)
}

// mayHaveTOC reports whether d may be an eStargz or zstd:chunked blob: it
// says so in its annotations, or its media type says nothing. A layer
// typed plain gzip or zstd with neither annotation is streamed without
// probing its footer: the probe would fetch the end of the blob once more
// for the most common kind of layer.
func mayHaveTOC(d Descriptor) bool {
	if d.Annotations[estargz.TOCJSONDigestAnnotation] != "" || d.Annotations[zstdchunked.ManifestChecksumAnnotation] != "" {
		return true
	}
	mt := d.MediaType
	return !strings.HasSuffix(mt, "gzip") && !strings.HasSuffix(mt, "zstd")
}

// MayBeRandomAccess reports whether Open may serve d by range (an
// uncompressed tar, or a blob that may carry a TOC), rather than stream
// the whole blob as soon as it is opened.
func MayBeRandomAccess(d Descriptor) bool {
	return strings.HasSuffix(d.MediaType, ".tar") || mayHaveTOC(d)
}

// hasTOCFooter reports whether src ends with an eStargz or zstd:chunked
// footer.
func hasTOCFooter(ctx context.Context, src Source) bool {
	size := src.Size()
	for _, dc := range tocDecompressors() {
		fs := dc.FooterSize()
		if fs > size {
			continue
		}
		b := make([]byte, fs)
		if _, err := readFull(ctx, src.ReadAt, b, size-fs); err != nil {
			return false
		}
		if _, off, _, err := dc.ParseFooter(b); err == nil && off >= 0 {
			return true
		}
	}
	return false
}
