package lazy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
	"github.com/weightsnap/weightsnap/remote"
)

// How a layer's bytes are checked before they are served. Every check is
// pinned by the manifest of the image being mounted, which the pod named
// (by digest, or by a tag containerd resolved to one).
type verification string

const (
	// byChunks: the layer carries a chunk table (chunks.Annotations); every
	// range is checked against it before it is cached or served.
	byChunks verification = "chunks"
	// byTOC: an eStargz or zstd:chunked layer whose TOC digest the
	// manifest gives; every file chunk is checked against the TOC.
	byTOC verification = "toc"
	// byBlob: nothing but the blob's digest, known once the whole blob has
	// been read. What is served before that is the Unverified policy's.
	byBlob verification = "blob"
)

// verificationOf says how the layer desc describes can be checked, with
// its chunk table when it has one. A table that does not parse or does not
// fit the blob counts as none.
func verificationOf(desc layer.Descriptor) (verification, *chunks.Table) {
	if t, err := chunks.Find(desc.Annotations, desc.Size); err == nil {
		return byChunks, t
	}
	// layer.Open checks the TOC against either annotation before using it
	// (the JSON's digest; zstd:chunked's, of the TOC as stored).
	if desc.Annotations[estargz.TOCJSONDigestAnnotation] != "" || desc.Annotations[zstdchunked.ManifestChecksumAnnotation] != "" {
		return byTOC, nil
	}
	return byBlob, nil
}

// Unverified says what the Manager does with a layer that only its blob
// digest covers (no chunk table, no TOC digest): that digest can be
// checked only once the whole blob has been read.
type Unverified int

const (
	// UnverifiedRefuse does not serve such a layer lazily: Mount fails
	// with ErrUnsupported, and the caller downloads and verifies it as it
	// would without weightsnap (containerd pulls it). The default.
	UnverifiedRefuse Unverified = iota
	// UnverifiedFetch fetches such a layer whole and verifies it before it
	// is mounted: no wait is saved, but every byte served is checked.
	UnverifiedFetch
	// UnverifiedLazy serves such a layer before it is verified. Its bytes
	// are kept apart per registry repository until the blob verified, are
	// not served again after a restart before that, and background fill
	// reads and checks the whole blob; a mismatch turns every read of the
	// layer into EIO and drops what the kernel cached of it.
	UnverifiedLazy
)

func (u Unverified) String() string {
	switch u {
	case UnverifiedFetch:
		return "fetch"
	case UnverifiedLazy:
		return "lazy"
	}
	return "refuse"
}

// trust is how one opened layer is checked: decided at open from its
// image's manifest and the Manager's policy.
type trust struct {
	v      verification
	table  *chunks.Table
	policy Unverified
	desc   layer.Descriptor
	// key is where the blob is cached: its digest, or for bytes served
	// unverified a key of their repository's, so that they reach no other
	// repository's pods before the blob verified.
	key       digest.Digest
	namespace string
}

// trustOf decides how the layer dl describes is checked, refusing it when
// only its blob digest covers it and the policy is UnverifiedRefuse.
func (m *Manager) trustOf(dl described) (trust, error) {
	tr := trust{v: dl.v, table: dl.table, policy: m.opt.unverified, desc: dl.desc, key: dl.desc.Digest}
	switch {
	case tr.v == byBlob && tr.policy == UnverifiedRefuse:
		return tr, fmt.Errorf("%w: layer %s of %s has no chunk table and no TOC digest, so no range of it can be checked before the whole blob is read; it is downloaded and verified whole (unverified_layers = full)", ErrUnsupported, dl.desc.Digest, dl.image)
	case tr.lazy():
		tr.namespace = "unverified " + dl.repo
		tr.key = digest.FromString(tr.namespace + "@" + dl.desc.Digest.String())
	}
	return tr, nil
}

// lazy reports whether the layer's bytes are served before they verify.
func (tr trust) lazy() bool { return tr.v == byBlob && tr.policy == UnverifiedLazy }

// label names the layer's verification in metrics and logs.
func (tr trust) label() string {
	switch {
	case tr.v != byBlob:
		return string(tr.v)
	case tr.policy == UnverifiedFetch:
		return "blob-fetched"
	}
	return "blob-lazy"
}

func (tr trust) blobOptions() []cache.BlobOption {
	switch {
	case tr.v == byChunks:
		return []cache.BlobOption{cache.WithTable(tr.table)}
	case tr.lazy():
		return []cache.BlobOption{cache.WithContentDigest(tr.desc.Digest), cache.WithReuseAfterVerify()}
	}
	return nil
}

// before runs before anything of the blob is served: a layer the policy
// fetches first is fetched whole and verified.
func (tr trust) before(ctx context.Context, blob *cache.Blob) error {
	if tr.v != byBlob || tr.policy != UnverifiedFetch {
		return nil
	}
	if err := blob.Fetch(remote.WithReason(ctx, "ondemand"), 0, blob.Size()); err != nil {
		return fmt.Errorf("fetching the whole blob to verify it: %w", err)
	}
	return blob.Verify(ctx)
}

// opener is how a streamed layer reads its blob: from the registry, or
// from the cache when it was fetched and verified first.
func (tr trust) opener(rb *remote.Blob, blob *cache.Blob) func(context.Context) (io.ReadCloser, error) {
	if tr.v == byBlob && tr.policy == UnverifiedFetch {
		return func(ctx context.Context) (io.ReadCloser, error) {
			return io.NopCloser(io.NewSectionReader(blobReaderAt{ctx, blob}, 0, blob.Size())), nil
		}
	}
	return func(ctx context.Context) (io.ReadCloser, error) {
		return rb.Open(remote.WithReason(ctx, "stream"), 0)
	}
}

type blobReaderAt struct {
	ctx  context.Context
	blob *cache.Blob
}

func (r blobReaderAt) ReadAt(p []byte, off int64) (int, error) { return r.blob.ReadAt(r.ctx, p, off) }

func (tr trust) layerOptions(opener func(context.Context) (io.ReadCloser, error), store *cache.Store, stream *atomic.Pointer[cache.Stream], blob *cache.Blob, o options) []layer.Option {
	limit := o.streamMax
	if limit <= 0 {
		limit = store.Capacity() / 2
	}
	opts := []layer.Option{
		layer.WithStreams(opener, streamStore{s: store, namespace: tr.namespace, opened: stream}),
		layer.WithMeta(store),
		layer.WithMaxExpansion(o.expansion, limit),
	}
	if tr.v == byChunks {
		// Every byte the claim is confirmed against is checked against
		// the table the same manifest pins.
		opts = append(opts, layer.WithTable(tr.table), layer.WithTarHeaders())
	}
	if blob.Complete() {
		opts = append(opts, layer.WithVerifiedSource())
	}
	return opts
}

// guard returns l failing every lookup and read once sl is found wrong.
func (sl *sharedLayer) guard(l *layer.Opened) *layer.Opened {
	g := *l
	g.Layer = guardedLayer{Layer: l.Layer, sl: sl}
	if l.Files != nil {
		g.Files = guardedFiles{FileReader: l.Files, sl: sl}
	}
	return &g
}

func (sl *sharedLayer) failure() error {
	if p := sl.failed.Load(); p != nil {
		return *p
	}
	return nil
}

type guardedLayer struct {
	layer.Layer
	sl *sharedLayer
}

func (g guardedLayer) Lookup(ctx context.Context, name string) (*layer.Entry, error) {
	if err := g.sl.failure(); err != nil {
		return nil, err
	}
	return g.Layer.Lookup(ctx, name)
}

func (g guardedLayer) ReadDir(ctx context.Context, dir string) ([]*layer.Entry, error) {
	if err := g.sl.failure(); err != nil {
		return nil, err
	}
	return g.Layer.ReadDir(ctx, dir)
}

func (g guardedLayer) ReadAt(ctx context.Context, e *layer.Entry, p []byte, off int64) (int, error) {
	if err := g.sl.failure(); err != nil {
		return 0, err
	}
	if err := g.sl.waitReady(ctx); err != nil {
		return 0, err
	}
	return g.Layer.ReadAt(ctx, e, p, off)
}

type guardedFiles struct {
	layer.FileReader
	sl *sharedLayer
}

func (g guardedFiles) ReadFile(ctx context.Context, e *layer.Entry, off int64, n int) (*os.File, int64, int, func(), error) {
	if err := g.sl.failure(); err != nil {
		return nil, 0, 0, nil, err
	}
	if err := g.sl.waitReady(ctx); err != nil {
		return nil, 0, 0, nil, err
	}
	return g.FileReader.ReadFile(ctx, e, off, n)
}

// failLayer marks sl, served before it verified, as wrong (its blob did
// not match its digest, or its stream ended before it could be checked):
// every later lookup and read of it fails, and the kernel drops what it
// cached of every mount of it. Said once, with the image and the blob.
func (m *Manager) failLayer(sl *sharedLayer, err error) {
	err = fmt.Errorf("%w: layer %s of %s was served before it verified, and did not verify: %v", layer.ErrVerify, sl.desc.Digest, sl.image, err)
	if m.fail(sl, err, "unverified layer did not verify: every read of it fails from now on") {
		metrics.UnverifiedLayerMismatches.Inc()
	}
}

// failClaimedLayer marks sl, indexed from its tar header annotation, as
// wrong (claimContradicted) and has the kernel drop what it cached of
// every mount of it.
func (m *Manager) failClaimedLayer(sl *sharedLayer, err error) {
	sl.claimContradicted(err)
	m.invalidate(sl)
}

// claimContradicted marks sl wrong, once, logged and counted: its blob
// does not hold the headers its annotation claims, so the names and file
// ranges served from them are not the layer's. No file content was served
// from them (it waits for the confirmation). It makes no call into the
// kernel: a FUSE read calls it before it answers, and a notification to
// drop the pages that read is filling would wait for that read.
func (sl *sharedLayer) claimContradicted(err error) {
	err = fmt.Errorf("%w (image %s)", err, sl.image) // err names the layer and wraps layer.ErrVerify
	if sl.markFailed(err, "tar header annotation did not match the blob: every read of the layer fails from now on") {
		metrics.TarHeaderMismatches.Inc()
	}
}

// fail marks sl wrong with err, once: every later lookup and read of it
// fails, the kernel drops what it cached of every mount of it, and msg is
// logged with the image and the blob. It reports whether it was the
// first.
func (m *Manager) fail(sl *sharedLayer, err error, msg string) bool {
	if !sl.markFailed(err, msg) {
		return false
	}
	m.invalidate(sl)
	return true
}

// markFailed makes err sl's failure if it has none yet, and logs msg; it
// reports whether it did.
func (sl *sharedLayer) markFailed(err error, msg string) bool {
	if !sl.failed.CompareAndSwap(nil, &err) {
		return false
	}
	slog.Error(msg, "layer", sl.desc.Digest, "image", sl.image, "err", err)
	return true
}

// invalidate has the kernel drop the pages and names it cached of every
// mount of sl.
func (m *Manager) invalidate(sl *sharedLayer) {
	for _, mnt := range m.mountsOf(sl) {
		mnt.Invalidate()
	}
}

// mountsOf returns the mounts serving sl.
func (m *Manager) mountsOf(sl *sharedLayer) []mount {
	m.mu.Lock()
	defer m.mu.Unlock()
	var mounts []mount
	for _, lm := range m.mounts {
		if lm.ref.Value() == sl {
			mounts = append(mounts, lm.mount)
		}
	}
	return mounts
}
