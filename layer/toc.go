package layer

// Reading an eStargz or zstd:chunked TOC: the footer says where the TOC is,
// the TOC is decompressed and decoded an entry at a time, within bounds,
// because a small blob can hold a TOC that inflates to gigabytes.

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

const (
	// tocReadSize is how much of the compressed TOC one Source read asks.
	tocReadSize = 1 << 20
)

func tocDecompressors() []estargz.Decompressor {
	return []estargz.Decompressor{new(estargz.GzipDecompressor), new(estargz.LegacyGzipDecompressor), new(zstdchunked.Decompressor)}
}

// readTOC finds the footer at the end of src and reads the TOC it points
// to. A blob without a footer is errNoTOC; a footer pointing to a bad or
// oversized TOC is ErrCorrupt; a TOC that d's annotations do not match
// (eStargz's TOC digest, of the JSON; zstd:chunked's manifest checksum, of
// the TOC as stored) is ErrVerify.
func readTOC(ctx context.Context, d Descriptor, src Source) (*estargz.JTOC, int64, error) {
	size := src.Size()
	decs := tocDecompressors()
	var fsize int64
	for _, dc := range decs {
		if s := dc.FooterSize(); s <= size {
			fsize = max(fsize, s)
		}
	}
	if fsize == 0 {
		return nil, 0, errNoTOC
	}
	footer := make([]byte, fsize)
	if _, err := readFull(ctx, src.ReadAt, footer, size-fsize); err != nil {
		return nil, 0, fmt.Errorf("reading footer: %w", err)
	}
	var errs []error
	for _, dc := range decs {
		fs := dc.FooterSize()
		if fs > fsize {
			continue
		}
		_, tocOff, tocSize, err := dc.ParseFooter(footer[fsize-fs:])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if tocOff < 0 {
			errs = append(errs, fmt.Errorf("%w: external TOC", ErrUnsupported))
			continue
		}
		if tocSize <= 0 {
			tocSize = size - tocOff - fs
		}
		if tocOff > size || tocSize <= 0 || tocSize > size-tocOff || tocSize > maxTOCSize {
			return nil, 0, fmt.Errorf("%w: TOC at %d size %d in a %d byte blob", ErrCorrupt, tocOff, tocSize, size)
		}
		stored, err := manifestChecksum(d, dc)
		if err != nil {
			return nil, 0, err
		}
		toc, tocDgst, err := decodeTOC(ctx, dc, src, tocOff, tocSize, stored)
		if err != nil {
			return nil, 0, err
		}
		if want := d.Annotations[estargz.TOCJSONDigestAnnotation]; want != "" && want != tocDgst.String() {
			return nil, 0, fmt.Errorf("%w: TOC digest %s, annotation says %s", ErrVerify, tocDgst, want)
		}
		return toc, tocOff, nil
	}
	return nil, 0, fmt.Errorf("%w: %v", errNoTOC, errors.Join(errs...))
}

// manifestChecksum is the digest that d's zstd:chunked manifest checksum
// annotation gives for the TOC as stored: its compressed bytes, where the
// footer says they are. It is "" without the annotation. On a blob whose
// footer is not zstd:chunked's the annotation could not be checked, so
// the blob is refused rather than served as if it had been.
func manifestChecksum(d Descriptor, dc estargz.Decompressor) (digest.Digest, error) {
	s := d.Annotations[zstdchunked.ManifestChecksumAnnotation]
	if s == "" {
		return "", nil
	}
	if _, ok := dc.(*zstdchunked.Decompressor); !ok {
		return "", fmt.Errorf("%w: zstd:chunked manifest checksum annotation on a blob with an eStargz footer", ErrVerify)
	}
	want, err := digest.Parse(s)
	if err != nil {
		return "", fmt.Errorf("%w: zstd:chunked manifest checksum annotation %q: %v", ErrVerify, s, err)
	}
	return want, nil
}

// decodeTOC decompresses and decodes the TOC at [off, off+n) of src and
// returns it with the digest of its JSON. The JSON is read through a
// bound and decoded an entry at a time, so that an oversized TOC fails
// before its size is held in memory. When stored is not "", the n bytes
// as read, the ones decompressed and any after them, must have that
// digest, or the TOC is refused (ErrVerify): reading them again could
// give other bytes than the ones decoded.
func decodeTOC(ctx context.Context, dc estargz.Decompressor, src Source, off, n int64, stored digest.Digest) (*estargz.JTOC, digest.Digest, error) {
	r := &seekReader{ctx: ctx, readAt: src.ReadAt, size: off + n, pos: off, step: tocReadSize}
	var in io.Reader = r
	var h hash.Hash
	if stored != "" {
		h = stored.Algorithm().Hash()
		in = io.TeeReader(r, h)
	}
	toc, dgst, err := decodeTOCFrom(dc, in)
	if err == nil && h != nil {
		// The decompressor may stop short of the end; r stops at it.
		if _, err = io.Copy(h, r); err == nil {
			if got := digest.NewDigest(stored.Algorithm(), h); got != stored {
				err = fmt.Errorf("%w: TOC as stored is %s, zstd:chunked manifest checksum annotation says %s", ErrVerify, got, stored)
			}
		}
	}
	if err != nil && r.err != nil {
		// A read error of the Source, not a corrupt TOC, although it
		// reached us through the decompressor.
		return nil, "", fmt.Errorf("reading TOC: %w", r.err)
	}
	return toc, dgst, err
}

func decodeTOCFrom(dc estargz.Decompressor, r io.Reader) (*estargz.JTOC, digest.Digest, error) {
	raw, err := tocJSON(dc, r)
	if err != nil {
		return nil, "", fmt.Errorf("%w: TOC: %v", ErrCorrupt, err)
	}
	defer raw.Close()
	tooLarge := fmt.Errorf("%w: TOC larger than %d bytes decompressed", ErrCorrupt, maxTOCJSON)
	bounded := &boundedReader{r: raw, max: func() int64 { return maxTOCJSON }, err: tooLarge}
	h := sha256.New()
	tee := io.TeeReader(bounded, h)
	toc, err := decodeJTOC(json.NewDecoder(&spaceSqueezer{r: tee}))
	if err != nil {
		if errors.Is(err, ErrCorrupt) {
			return nil, "", err
		}
		return nil, "", fmt.Errorf("%w: TOC JSON: %v", ErrCorrupt, err)
	}
	// The digest covers the whole JSON, also what follows the object.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		if errors.Is(err, ErrCorrupt) {
			return nil, "", err
		}
		return nil, "", fmt.Errorf("%w: TOC: %v", ErrCorrupt, err)
	}
	return toc, digest.NewDigest(digest.SHA256, h), nil
}

// tocJSON returns the decompressed TOC JSON, the way estargz's
// decompressors find it but with the zstd window bounded.
func tocJSON(dc estargz.Decompressor, r io.Reader) (io.ReadCloser, error) {
	if _, ok := dc.(*zstdchunked.Decompressor); ok {
		// A window larger than the TOC is never needed; the decoder
		// allocates the window a frame declares.
		zd, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxTOCJSON))
		if err != nil {
			return nil, err
		}
		return zd.IOReadCloser(), nil
	}
	gz, err := gzip.NewReader(r)
	if err != nil {
		return nil, err
	}
	gz.Multistream(false)
	tr := tar.NewReader(gz)
	h, err := tr.Next()
	if err != nil {
		gz.Close()
		return nil, fmt.Errorf("no tar header in the TOC stream: %v", err)
	}
	if h.Name != estargz.TOCTarName {
		gz.Close()
		return nil, fmt.Errorf("TOC tar entry named %q, want %q", h.Name, estargz.TOCTarName)
	}
	return struct {
		io.Reader
		io.Closer
	}{tr, gz}, nil
}

// decodeJTOC decodes {"version": …, "entries": […]} an entry at a time,
// counting them, so that a TOC of too many entries fails before they are
// held.
func decodeJTOC(dec *json.Decoder) (*estargz.JTOC, error) {
	toc := new(estargz.JTOC)
	if err := expectDelim(dec, '{'); err != nil {
		return nil, err
	}
	seen := false
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := t.(string)
		switch {
		// encoding/json matches keys without regard to case.
		case strings.EqualFold(key, "version"):
			err = dec.Decode(&toc.Version)
		case strings.EqualFold(key, "entries"):
			if seen {
				return nil, errors.New("entries given twice")
			}
			seen = true
			toc.Entries, err = decodeEntries(dec)
		default:
			var skip json.RawMessage
			err = dec.Decode(&skip)
		}
		if err != nil {
			return nil, err
		}
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, err
	}
	return toc, nil
}

func decodeEntries(dec *json.Decoder) ([]*estargz.TOCEntry, error) {
	if err := expectDelim(dec, '['); err != nil {
		return nil, err
	}
	var entries []*estargz.TOCEntry
	for dec.More() {
		if len(entries) == maxTOCEntries {
			return nil, fmt.Errorf("%w: TOC has more than %d entries", ErrCorrupt, maxTOCEntries)
		}
		var te *estargz.TOCEntry
		if err := dec.Decode(&te); err != nil {
			return nil, err
		}
		entries = append(entries, te)
	}
	return entries, expectDelim(dec, ']')
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	t, err := dec.Token()
	if err != nil {
		return err
	}
	if t != want {
		return fmt.Errorf("got %v, want %v", t, want)
	}
	return nil
}

// spaceSqueezer turns each run of whitespace outside JSON strings into one
// space: encoding/json buffers the whitespace within a value it reads, so
// a TOC padded with gigabytes of it would cost that much memory. One space
// keeps tokens apart as before ("[1 2]" stays invalid).
type spaceSqueezer struct {
	r                 io.Reader
	inString, escaped bool
	space             bool // the last byte passed on is a space outside a string
}

func (s *spaceSqueezer) Read(p []byte) (int, error) {
	for {
		n, err := s.r.Read(p)
		k := 0
		for _, c := range p[:n] {
			switch {
			case s.inString:
				switch {
				case s.escaped:
					s.escaped = false
				case c == '\\':
					s.escaped = true
				case c == '"':
					s.inString = false
				}
			case c == ' ' || c == '\t' || c == '\n' || c == '\r':
				if s.space {
					continue
				}
				c = ' '
			case c == '"':
				s.inString = true
			}
			s.space = c == ' ' && !s.inString
			p[k] = c
			k++
		}
		if k > 0 || n == 0 || err != nil {
			return k, err
		}
	}
}
