package layer

import (
	"fmt"
	"hash"
	"io"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/chunks"
)

// checkedReader passes on a blob's bytes read from r only as far as they
// are checked: with a chunk table, a chunk at a time once it matched its
// digest (so nothing unchecked is ever decompressed and served); the
// whole against the blob's digest at the end, with or without one.
type checkedReader struct {
	r     io.Reader
	table *chunks.Table // nil: only the whole is checked
	want  digest.Digest
	h     hash.Hash

	buf     []byte // the current checked chunk
	pending []byte // what of buf is not yet passed on
	next    int    // the next chunk
	n       int64  // bytes read from r
}

func newCheckedReader(r io.Reader, want digest.Digest, table *chunks.Table) *checkedReader {
	return &checkedReader{r: r, table: table, want: want, h: want.Algorithm().Hash()}
}

func (c *checkedReader) Read(p []byte) (int, error) {
	if c.table == nil {
		n, err := c.r.Read(p)
		c.h.Write(p[:n])
		c.n += int64(n)
		if err == io.EOF {
			err = c.end()
		}
		return n, err
	}
	if len(c.pending) == 0 {
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// fill reads and checks the next chunk of the table.
func (c *checkedReader) fill() error {
	if c.next >= c.table.Len() {
		if extra, _ := c.r.Read(make([]byte, 1)); extra > 0 {
			return fmt.Errorf("%w: blob longer than its %d bytes", ErrCorrupt, c.table.Size)
		}
		return c.end()
	}
	_, size := c.table.Range(c.next)
	if int64(cap(c.buf)) < size {
		c.buf = make([]byte, size)
	}
	c.buf = c.buf[:size]
	if _, err := io.ReadFull(c.r, c.buf); err != nil {
		return fmt.Errorf("%w: reading chunk %d: %v", ErrCorrupt, c.next, err)
	}
	if err := c.table.Check(c.next, c.buf); err != nil {
		return fmt.Errorf("%w: %w", ErrVerify, err)
	}
	c.h.Write(c.buf)
	c.n += size
	c.next++
	c.pending = c.buf
	return nil
}

// end checks the whole blob at its end.
func (c *checkedReader) end() error {
	if got := digest.NewDigest(c.want.Algorithm(), c.h); got != c.want {
		return fmt.Errorf("%w: blob of %d bytes has digest %s, want %s", ErrVerify, c.n, got, c.want)
	}
	return io.EOF
}
