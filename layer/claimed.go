package layer

// An uncompressed tar layer whose descriptor carries the tar header
// annotation (package tarheaders) is indexed from it: the same walk, over
// the header bytes the manifest claims instead of the blob, so that Open
// reads nothing of the blob. The claim is confirmed against the blob when
// first needed (Confirmation.Start, Wait), read through the Source
// (checked chunk by chunk against the chunk table of the same manifest);
// until it is, every read of a file's content waits, and a claim the blob
// contradicts fails every such read. Names and attributes are served from
// the claim meanwhile: they come from the manifest the mount's image
// digest pins, as a chunk table does.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/weightsnap/weightsnap/internal/wake"
	"github.com/weightsnap/weightsnap/tarheaders"
	"golang.org/x/sync/errgroup"
)

// errNotClaimed is the error of a read outside the claimed regions: the
// walk needs bytes the annotation does not hold.
var errNotClaimed = errors.New("not in the tar header annotation")

// claimedIndex builds the index of the tar layer d from the regions its
// annotation claims. It fails, reading nothing of the blob, when the
// annotation does not parse or does not hold what the walk needs.
func claimedIndex(ctx context.Context, d Descriptor, size int64) (*index, []tarheaders.Region, error) {
	regions, err := tarheaders.Parse(d.Annotations[tarheaders.Annotation], size)
	if err != nil {
		return nil, nil, err
	}
	x := newIndex(d.Digest.String())
	if err := walkTar(ctx, &regionReader{regions: regions, size: size}, size, x); err != nil {
		return nil, nil, err
	}
	x.finish(nil)
	return x, regions, nil
}

// regionReader is a posReader over claimed regions of a blob of size
// bytes: a read outside them fails with errNotClaimed.
type regionReader struct {
	regions []tarheaders.Region
	size    int64
	pos     int64
}

func (r *regionReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if r.pos >= r.size {
		return 0, io.EOF
	}
	i := sort.Search(len(r.regions), func(i int) bool { return r.regions[i].End() > r.pos })
	if i == len(r.regions) || r.regions[i].Off > r.pos {
		return 0, fmt.Errorf("%w: byte %d", errNotClaimed, r.pos)
	}
	n := copy(p, r.regions[i].Data[r.pos-r.regions[i].Off:])
	r.pos += int64(n)
	return n, nil
}

func (r *regionReader) Seek(off int64, whence int) (int64, error) {
	pos, err := seekPos(r.pos, off, whence)
	if err != nil {
		return 0, err
	}
	r.pos = pos
	return pos, nil
}

func (r *regionReader) position() int64 { return r.pos }

// Delays between attempts to confirm a claim whose blob could not be read.
var (
	confirmRetryMin = 100 * time.Millisecond
	confirmRetryMax = 10 * time.Second
)

// Confirmation is the background check of an index taken from a tar
// header annotation against the blob. It starts when something first
// needs it (Start, Wait), not when the layer is opened: opened during a
// pull, every layer of an image would otherwise fetch and check its
// header chunks while the pull's other layers are being prepared, and
// that traffic and hashing slowed the pull about twofold (a 4-shard 1 GiB
// model, 0.145 s to 0.079 s from PullImage to its return).
type Confirmation struct {
	layer   string
	regions []tarheaders.Region
	src     Source
	// saved runs once the claim is confirmed: the index may then be kept
	// as any index of those bytes would be.
	saved func(ctx context.Context)

	ctx     context.Context // of the check, ended by close
	cancel  context.CancelFunc
	once    sync.Once     // of the check's start, by Start or by close
	stopped chan struct{} // closed when run has returned, or close found it not started
	done    chan struct{} // closed when settled: confirmed or failed for good

	mu      sync.Mutex
	changed wake.Signal
	err     error // the failure, once settled; or the last read error while a retry waits
}

// newConfirmation returns the check of regions against src, not started.
func newConfirmation(layer string, regions []tarheaders.Region, src Source, saved func(context.Context)) *Confirmation {
	ctx, cancel := context.WithCancel(context.Background())
	return &Confirmation{layer: layer, regions: regions, src: src, saved: saved, ctx: ctx, cancel: cancel,
		stopped: make(chan struct{}), done: make(chan struct{})}
}

// Start starts the check, once; later calls do nothing.
func (c *Confirmation) Start() {
	c.once.Do(func() { go c.run(c.ctx) })
}

// Done is closed when the claim is settled: Err says how.
func (c *Confirmation) Done() <-chan struct{} { return c.done }

// Err is nil once the claim is confirmed; the reason it failed for good
// (wrapping ErrVerify when the blob contradicts it); nil before Done.
func (c *Confirmation) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Confirmed reports whether the claim is confirmed, without waiting.
func (c *Confirmation) Confirmed() bool {
	select {
	case <-c.done:
		return c.err == nil
	default:
		return false
	}
}

// Wait starts the check if it has not started and waits until the claim
// is confirmed (nil) or failed. While the blob cannot be read it fails at
// once with that error, as a read of the file would, and a later attempt
// tries again.
func (c *Confirmation) Wait(ctx context.Context) error {
	c.Start()
	for {
		select {
		case <-c.done:
			return c.err
		default:
		}
		c.mu.Lock()
		err, ch := c.err, c.changed.C()
		c.mu.Unlock()
		if err != nil {
			return fmt.Errorf("layer %s: tar headers not confirmed yet: %w", c.layer, err)
		}
		select {
		case <-ch:
		case <-c.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// close stops the check and waits for it; a check never started is
// settled as closed.
func (c *Confirmation) close() {
	c.cancel()
	c.once.Do(func() {
		c.settle(fmt.Errorf("layer %s closed before its tar headers were confirmed: %w", c.layer, context.Canceled))
		close(c.stopped)
	})
	<-c.stopped
}

// run checks the claim until it is confirmed, contradicted, or closed;
// a blob that cannot be read is tried again after a while.
func (c *Confirmation) run(ctx context.Context) {
	defer close(c.stopped)
	t0 := time.Now()
	delay := confirmRetryMin
	for {
		err := c.check(ctx)
		switch {
		case err == nil:
			slog.DebugContext(ctx, "layer: tar headers confirmed", "layer", c.layer, "regions", len(c.regions), "took", time.Since(t0))
			c.settle(nil)
			c.saved(ctx)
			return
		case ctx.Err() != nil:
			c.settle(fmt.Errorf("layer %s closed before its tar headers were confirmed: %w", c.layer, ctx.Err()))
			return
		case errors.Is(err, ErrVerify):
			c.settle(err)
			return
		}
		slog.DebugContext(ctx, "layer: confirming tar headers", "layer", c.layer, "err", err, "retry in", delay)
		c.setErr(err)
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			c.settle(fmt.Errorf("layer %s closed before its tar headers were confirmed: %w", c.layer, ctx.Err()))
			return
		}
		c.setErr(nil)
		delay = min(2*delay, confirmRetryMax)
	}
}

// check reads every claimed region from the blob and compares, a few at
// once: a model layer's regions are in its first chunk and its last, and
// fetched together the first read of the layer waits for the slower of
// the two, not for both in turn. A read error is returned as it is;
// different bytes wrap ErrVerify.
func (c *Confirmation) check(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(confirmReads)
	for _, r := range c.regions {
		g.Go(func() error { return c.checkRegion(ctx, r) })
	}
	return g.Wait()
}

// confirmReads is how many claimed regions check reads at once.
const confirmReads = 4

func (c *Confirmation) checkRegion(ctx context.Context, r tarheaders.Region) error {
	got := make([]byte, len(r.Data))
	n, err := readFull(ctx, c.src.ReadAt, got, r.Off)
	if err == io.EOF && n < len(got) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil && err != io.EOF {
		return fmt.Errorf("reading tar headers [%d,+%d): %w", r.Off, len(r.Data), err)
	}
	if !bytes.Equal(got, r.Data) {
		return fmt.Errorf("%w: layer %s: the blob's bytes [%d,+%d) are not the tar headers its annotation %s claims", ErrVerify, c.layer, r.Off, len(r.Data), tarheaders.Annotation)
	}
	return nil
}

func (c *Confirmation) setErr(err error) {
	c.mu.Lock()
	c.err = err
	c.changed.Broadcast()
	c.mu.Unlock()
}

func (c *Confirmation) settle(err error) {
	c.mu.Lock()
	c.err = err
	c.changed.Broadcast()
	c.mu.Unlock()
	close(c.done)
}
