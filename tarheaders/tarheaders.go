// Package tarheaders is weightsnap's tar header annotation: the bytes of an
// uncompressed tar layer blob that a walk of its headers reads, with their
// offsets, carried in an annotation on the layer's descriptor. With it a
// node builds the layer's index without reading the blob (package layer),
// and confirms the claim against the blob, checked chunk by chunk against
// the chunk table of the same manifest, off the path of a Prepare.
//
// The regions are what archive/tar reads when it walks the tar with a
// reader that can seek: every entry's header block(s) (the 512-byte header
// and any PAX or GNU long-name blocks before it), the last byte of every
// entry's padded data (archive/tar reads it after seeking over the data, to
// notice a tar cut short), and the end of the archive, from the end of the
// last entry's padded data to the end of the blob.
//
// Encoding: base64 of gzip of a sequence of (uvarint offset, uvarint
// length, bytes), sorted by offset, not overlapping. A layer with many
// small files has too many headers to be worth it: above MaxBytes of
// header bytes no annotation is written and the node walks the tar.
package tarheaders

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Annotation is the layer annotation holding the regions: on the layer
// descriptor, or in the image config (package annotations).
const Annotation = "dev.weightsnap.tarheaders.v1"

const (
	// MaxBytes bounds the header bytes of one annotation: room for about
	// 500 entries, far more than a layer of a few weight files has, and
	// small enough that an image of a few such layers stays well under the
	// 4 MiB registries accept for a manifest.
	MaxBytes = 256 << 10
	// maxRegions bounds the regions a decoder accepts. An honest walk
	// reads at least one 512-byte header per region.
	maxRegions = MaxBytes/512 + 1
	// maxEncoded bounds the decompressed encoding: the bytes plus two
	// varints per region.
	maxEncoded = MaxBytes + maxRegions*2*binary.MaxVarintLen64
	// MaxAnnotation bounds the annotation's length before it is decoded:
	// gzip never grows its input by more than a little, base64 by 4/3.
	MaxAnnotation = 2 * maxEncoded
)

var (
	// ErrTooLarge is returned by Record for a tar whose header bytes are
	// more than MaxBytes: it gets no annotation.
	ErrTooLarge = errors.New("tar headers: more than the annotation may hold")
	// ErrInvalid is wrapped by Parse's errors about an annotation that
	// cannot be used.
	ErrInvalid = errors.New("invalid tar header annotation")
)

// Region is bytes of a blob at an offset.
type Region struct {
	Off  int64
	Data []byte
}

// End is the offset just past the region.
func (r Region) End() int64 { return r.Off + int64(len(r.Data)) }

// Size is the number of bytes of regions.
func Size(regions []Region) int64 {
	n := int64(0)
	for _, r := range regions {
		n += int64(len(r.Data))
	}
	return n
}

// Encode returns the annotation value of regions, which must be sorted
// and not overlap (as Record returns them).
func Encode(regions []Region) (string, error) {
	var buf bytes.Buffer
	b64 := base64.NewEncoder(base64.StdEncoding, &buf)
	zw := gzip.NewWriter(b64)
	var v [binary.MaxVarintLen64]byte
	for _, r := range regions {
		zw.Write(v[:binary.PutUvarint(v[:], uint64(r.Off))])
		zw.Write(v[:binary.PutUvarint(v[:], uint64(len(r.Data)))])
		zw.Write(r.Data)
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	if err := b64.Close(); err != nil {
		return "", err
	}
	return buf.String(), nil
}

// Parse decodes the annotation value s of a blob of blobSize bytes,
// refusing one that is too large, malformed, out of order, overlapping,
// or past the end of the blob.
func Parse(s string, blobSize int64) ([]Region, error) {
	if len(s) > MaxAnnotation {
		return nil, fmt.Errorf("%w: %d bytes", ErrInvalid, len(s))
	}
	zr, err := gzip.NewReader(base64.NewDecoder(base64.StdEncoding, bytes.NewReader([]byte(s))))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	raw, err := io.ReadAll(io.LimitReader(zr, maxEncoded+1))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if len(raw) > maxEncoded {
		return nil, fmt.Errorf("%w: decompresses to more than %d bytes", ErrInvalid, maxEncoded)
	}
	var regions []Region
	end, total := int64(0), int64(0)
	for rd := bytes.NewReader(raw); rd.Len() > 0; {
		off, err1 := binary.ReadUvarint(rd)
		n, err2 := binary.ReadUvarint(rd)
		switch {
		case err1 != nil || err2 != nil:
			return nil, fmt.Errorf("%w: truncated region %d", ErrInvalid, len(regions))
		case len(regions) >= maxRegions:
			return nil, fmt.Errorf("%w: more than %d regions", ErrInvalid, maxRegions)
		case n == 0 || n > uint64(rd.Len()):
			return nil, fmt.Errorf("%w: region %d has %d bytes", ErrInvalid, len(regions), n)
		case off > uint64(blobSize) || n > uint64(blobSize)-off:
			return nil, fmt.Errorf("%w: region [%d,+%d) past the end of a %d byte blob", ErrInvalid, off, n, blobSize)
		case int64(off) < end:
			return nil, fmt.Errorf("%w: region at %d overlaps or precedes the one ending at %d", ErrInvalid, off, end)
		}
		data := make([]byte, n)
		io.ReadFull(rd, data) // n ≤ rd.Len()
		regions = append(regions, Region{Off: int64(off), Data: data})
		end = int64(off + n)
		total += int64(n)
	}
	if total > MaxBytes {
		return nil, fmt.Errorf("%w: %d bytes of headers", ErrInvalid, total)
	}
	return regions, nil
}

// Recorder finds the regions of a tar stream written to it (package
// comment): a layer's writer, or a reader of its blob, tees the blob into
// it. Writes never fail; a tar it cannot walk, or whose header bytes are
// more than MaxBytes, ends in an error from Finish.
type Recorder struct {
	pw      *io.PipeWriter
	done    chan struct{}
	regions []Region
	err     error
}

// NewRecorder starts a Recorder; Finish must be called.
func NewRecorder() *Recorder {
	pr, pw := io.Pipe()
	r := &Recorder{pw: pw, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.regions, r.err = record(pr)
		io.Copy(io.Discard, pr) // what follows the walk, or after it failed
	}()
	return r
}

// Write passes p to the walk.
func (r *Recorder) Write(p []byte) (int, error) {
	r.pw.Write(p) // fails only after Finish
	return len(p), nil
}

// Finish ends the stream and returns its regions.
func (r *Recorder) Finish() ([]Region, error) {
	r.pw.Close()
	<-r.done
	return r.regions, r.err
}

// record walks the tar read from r the way a node walks it (seeking over
// file data) and returns the bytes archive/tar read, and the rest of the
// blob after the last of them.
func record(r io.Reader) ([]Region, error) {
	s := &recordingReader{r: bufio.NewReaderSize(r, 64<<10)}
	tr := tar.NewReader(s)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
			err = nil // the node's index refuses such names itself
		}
		if s.tooLarge {
			return nil, ErrTooLarge
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("tar headers: %w", err)
		}
	}
	// The end of the archive, to the end of the blob.
	_, err := io.Copy(io.Discard, s)
	if s.tooLarge {
		return nil, ErrTooLarge
	}
	if err != nil {
		return nil, fmt.Errorf("tar headers: %w", err)
	}
	return s.regions, nil
}

// recordingReader is a stream that archive/tar may seek forward on; it
// keeps what is read, merging adjacent reads into one region.
type recordingReader struct {
	r        io.Reader
	pos      int64 // of the reader archive/tar sees
	consumed int64 // of r
	regions  []Region
	recorded int64
	tooLarge bool
}

func (s *recordingReader) Read(p []byte) (int, error) {
	if s.pos > s.consumed {
		n, err := io.CopyN(io.Discard, s.r, s.pos-s.consumed)
		s.consumed += n
		if err != nil {
			return 0, err
		}
	}
	if s.recorded+int64(len(p)) > MaxBytes {
		p = p[:max(0, MaxBytes+1-s.recorded)]
	}
	n, err := s.r.Read(p)
	s.keep(p[:n])
	s.pos += int64(n)
	s.consumed += int64(n)
	if s.recorded > MaxBytes {
		s.tooLarge = true
		return n, ErrTooLarge
	}
	return n, err
}

func (s *recordingReader) keep(p []byte) {
	if len(p) == 0 {
		return
	}
	s.recorded += int64(len(p))
	if k := len(s.regions) - 1; k >= 0 && s.regions[k].End() == s.pos {
		s.regions[k].Data = append(s.regions[k].Data, p...)
		return
	}
	s.regions = append(s.regions, Region{Off: s.pos, Data: bytes.Clone(p)})
}

// Seek moves forward only; the bytes skipped are discarded at the next
// Read.
func (s *recordingReader) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += s.pos
	default:
		return 0, errors.New("tar headers: unsupported whence")
	}
	if off < s.consumed {
		return 0, errors.New("tar headers: seek backwards")
	}
	s.pos = off
	return off, nil
}
