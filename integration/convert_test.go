package integration

// `weightsnap convert` end to end: an image built as `docker build` builds
// one (buildah, gzip layers, no chunk table) is converted by pushing a new
// manifest only; the result is served lazily with every range checked, and
// still pulls and runs with containerd's own overlayfs snapshotter.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/weightsnap/weightsnap/annotations"
	"github.com/weightsnap/weightsnap/chunks"
	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/lazy"
)

// Where the model sits in the images built here.
const (
	convertModelDir     = "models/tiny"
	convertWeights      = convertModelDir + "/model.safetensors"
	convertConfig       = convertModelDir + "/config.json"
	convertWeightsBytes = 9 << 20 // three chunks of the table convert computes
)

// overlayfsUnpack adds an unpack entry for containerd's default
// snapshotter to the harness config, whose only entry is weightsnap's: a
// pull that names no snapshotter then unpacks with overlayfs, as it would
// on a node without weightsnap.
const overlayfsUnpack = `
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = %q
  snapshotter = "overlayfs"
`

// TestConvertBuildahImage: for a model image built by buildah in each
// manifest format `docker build` and buildah produce (Docker schema 2 and
// OCI, gzip layers both), `weightsnap convert` uploads no layer blob (the
// new config alone, into either repository), and every layer has a chunk
// table of its unchanged blob, in the config; the converted image is served lazily and a corrupting registry
// gives EIO, never a wrong byte; the original is refused lazily under the
// default policy; and the converted image still pulls and runs with
// containerd's overlayfs snapshotter.
func TestConvertBuildahImage(t *testing.T) {
	root := lazyRoot(t)
	bh := newBuildah(t)
	reg := testutil.StartRegistry(t)
	counter := startUploadCounter(t, reg.Addr)
	bin := weightsnapBinary(t)
	tool := toolBinary(t)
	// No weightsnapd: this containerd's pulls name no snapshotter, so
	// its weightsnap entries are never used.
	ctdDir := shortTempDir(t, "cv")
	ctd := startContainerdWithConfig(t, mkdir(t, filepath.Join(ctdDir, "ctd")), filepath.Join(ctdDir, "no-weightsnapd.sock"),
		mkdir(t, filepath.Join(ctdDir, "certs.d")), "", fmt.Sprintf(overlayfsUnpack, "linux/"+runtime.GOARCH))

	for _, format := range []string{"v2s2", "oci"} {
		t.Run(format, func(t *testing.T) {
			dir := filepath.Join(root, format)
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
			defer cancel()

			// 1. The image as `docker build` would make it, pushed with
			// gzip layers.
			src := counter.Addr + "/built/tiny-" + format + ":v1"
			files := writeConvertModel(t, ctx, filepath.Join(dir, "context"))
			bh.buildModelImage(t, tool, filepath.Join(dir, "context"), src, format)
			if pushed := counter.take(); pushed.bytes == 0 {
				t.Fatalf("the counting proxy saw no upload bytes of buildah's push: it cannot prove convert uploads none")
			}
			srcManifest := fetchManifest(t, src)
			requireBuiltLikeDocker(t, srcManifest, format)

			// 2. Convert to a new tag of the same repository, and into
			// another repository, where the blobs must be mounted.
			same := convertImage(t, ctx, bin, counter, src, counter.Addr+"/built/tiny-"+format+":v1-lazy")
			other := convertImage(t, ctx, bin, counter, src, counter.Addr+"/converted/tiny-"+format+":v1")
			for _, c := range []converted{same, other} {
				requireTablesOfSameBlobs(t, reg, srcManifest, c.manifest)
				if c.manifests != 1 {
					t.Errorf("convert to %s put %d manifests, want 1", c.ref, c.manifests)
				}
				for _, l := range srcManifest.m.Layers {
					if got := c.served[l.Digest.String()]; got > l.Size {
						t.Errorf("convert to %s read %d bytes of the %d-byte layer %s; want it read at most once", c.ref, got, l.Size, l.Digest)
					}
				}
			}
			if same.manifest.digest != other.manifest.digest {
				t.Errorf("converting one image twice gave two manifests, %s and %s", same.manifest.digest, other.manifest.digest)
			}
			requireOnlyConfigUploaded(t, same)
			requireOnlyConfigUploaded(t, other)
			weights := layerHolding(t, reg, other.manifest.m, convertWeights)
			weightsLayer := weights.Digest.String()

			// 3. Served lazily, every range checked against the table: a
			// proxy that inverts the whole weights layer, and a registry
			// whose copy has one byte flipped in the middle of it (which
			// gzip itself would notice only at the end), give EIO, never a
			// wrong byte; a correct registry, every byte right.
			bad := testutil.StartProxy(t, reg.Addr, testutil.Faults{CorruptDigest: weightsLayer})
			requireCorruptionIsEIO(t, bad.Addr+other.pinned, filepath.Join(dir, "inverted"), files[convertWeights], weightsLayer)
			tab, err := chunks.Find(other.manifest.annotationsOf(weights), weights.Size)
			if err != nil || tab.Len() < 3 {
				t.Fatalf("weights layer: table of %v chunks, err %v; want 3 or more, to corrupt one in the middle", tab.Len(), err)
			}
			off, n := tab.Range(1)
			restore := flipBlobByte(t, reg, weightsLayer, off+n/2)
			requireCorruptionIsEIO(t, reg.Addr+other.pinned, filepath.Join(dir, "flipped"), files[convertWeights], weightsLayer)
			restore()

			good := testutil.StartProxy(t, reg.Addr, testutil.Faults{})
			node := lazyStartNode(t, filepath.Join(dir, "cache"), nil)
			img := node.mountImage(t, good.Addr+other.pinned, filepath.Join(dir, "image"))
			for rel, want := range files {
				got, err := lazyReadFile(t, img.path(rel))
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("%s of the converted image, mounted lazily: %d bytes (sha256 %s), err %v; want %d bytes (sha256 %s)",
						rel, len(got), lazySHA256(got), err, len(want), lazySHA256(want))
				}
			}
			if good.BlobBytes(weightsLayer) == 0 {
				t.Errorf("the lazy mount read no byte of the weights layer from the registry")
			}

			// The original has no table: not served lazily, whether the
			// policy is the default or named.
			refuse := lazyStartNodeWith(t, filepath.Join(dir, "cache-refuse"), nil, lazy.WithUnverifiedLayers(lazy.UnverifiedRefuse))
			for _, c := range []struct {
				policy string
				node   *lazyNode
			}{{"default", node}, {"refuse", refuse}} {
				mnt := filepath.Join(dir, "src-"+c.policy)
				_, err := c.node.tryMountImage(t, good.Addr+"/built/tiny-"+format+":v1", mnt)
				if !errors.Is(err, lazy.ErrUnsupported) {
					t.Errorf("lazy mount of the unconverted image (policy %s): err %v, want lazy.ErrUnsupported", c.policy, err)
				}
				if left := mountsUnder(t, mnt); len(left) > 0 {
					t.Errorf("refused mount (policy %s) left mounts behind: %v", c.policy, left)
				}
			}

			// 4. A node without weightsnap: containerd pulls the
			// converted image with its default snapshotter and runs it.
			requirePullsAndRuns(t, ctx, ctd, other.ref, weightsLayer, "convert-"+format, files[convertWeights])
		})
	}
}

// buildahNamespace is the shell script buildah runs under. As root,
// buildah writes its blob-info cache to /var/lib/containers/cache and
// network state to /run/containers whatever --root and --runroot say: in
// a private mount namespace, /var/lib and /run are overlays whose writes
// land under BUILDAH_DIR and vanish from view with the namespace.
const buildahNamespace = `set -e
for d in var-lib:/var/lib run:/run; do
	mount -t overlay weightsnap-buildah \
		-o "lowerdir=${d#*:},upperdir=$BUILDAH_DIR/${d%%:*}/upper,workdir=$BUILDAH_DIR/${d%%:*}/work" "${d#*:}"
done
exec "$@"
`

// imageManifest is a manifest the registry holds, its digest and its
// config.
type imageManifest struct {
	digest v1.Hash
	m      *v1.Manifest
	config []byte
}

// annotationsOf returns the annotations of a layer of m as a node reads
// them: its descriptor's, with those the config holds for it.
func (m imageManifest) annotationsOf(l v1.Descriptor) map[string]string {
	return annotations.Merge(l.Annotations, annotations.FromConfig(m.config, []v1.Descriptor{l})[l.Digest.String()])
}

// fetchManifest fetches the manifest ref names, and its config.
func fetchManifest(t *testing.T, ref string) imageManifest {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	d, err := remote.Get(r, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatalf("fetching the manifest of %s: %v", ref, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(d.Manifest))
	if err != nil {
		t.Fatalf("manifest of %s: %v", ref, err)
	}
	img, err := d.Image()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		t.Fatalf("config of %s: %v", ref, err)
	}
	return imageManifest{digest: d.Digest, m: m, config: cfg}
}

// requireBuiltLikeDocker checks that the built image is what the test
// means to convert: two gzip layers, of the format's media types, and no
// chunk table.
func requireBuiltLikeDocker(t *testing.T, src imageManifest, format string) {
	t.Helper()
	layerType, manifestType := "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.manifest.v1+json"
	if format == "v2s2" {
		layerType, manifestType = "application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.docker.distribution.manifest.v2+json"
	}
	if string(src.m.MediaType) != manifestType {
		t.Errorf("buildah pushed a manifest of type %q, want %q", src.m.MediaType, manifestType)
	}
	if len(src.m.Layers) != 2 {
		t.Fatalf("buildah pushed %d layers, want 2 (the tool, then the model)", len(src.m.Layers))
	}
	for i, l := range src.m.Layers {
		if string(l.MediaType) != layerType {
			t.Errorf("layer %d pushed as %q, want %q", i, l.MediaType, layerType)
		}
		if _, err := chunks.Find(src.annotationsOf(l), l.Size); err == nil {
			t.Errorf("layer %d of the built image already has a chunk table", i)
		}
	}
	t.Logf("built: %s, layers %s", src.m.MediaType, layerSummary(src.m.Layers))
}

func layerSummary(ls []v1.Descriptor) string {
	var s []string
	for _, l := range ls {
		s = append(s, fmt.Sprintf("%s %d bytes %s", l.MediaType, l.Size, l.Digest))
	}
	return strings.Join(s, "; ")
}

// converted is a run of `weightsnap convert` and what it sent.
type converted struct {
	ref      string        // DST
	pinned   string        // what convert printed, less its registry host
	manifest imageManifest // DST's manifest after the run
	uploadCounts
}

// convertImage runs `weightsnap convert --plain-http src dst`, every
// request of it through counter.
func convertImage(t *testing.T, ctx context.Context, bin string, counter *uploadCounter, src, dst string) converted {
	t.Helper()
	counter.take()
	out, err := exec.CommandContext(ctx, bin, "convert", "--plain-http", src, dst).Output()
	if err != nil {
		t.Fatalf("weightsnap convert %s %s: %v\n%s", src, dst, err, stderrOf(err))
	}
	c := converted{ref: dst, uploadCounts: counter.take(), manifest: fetchManifest(t, dst)}
	c.pinned = requireConvertPrinted(t, string(out), dst, c.manifest)
	return c
}

// requireOnlyConfigUploaded checks that convert uploaded one blob, the new
// config: the layers are the source's, mounted into another repository.
func requireOnlyConfigUploaded(t *testing.T, c converted) {
	t.Helper()
	cfg := c.manifest.m.Config
	if len(c.blobs) != 1 || c.blobs[0] != cfg.Digest.String() || c.bytes != cfg.Size {
		t.Errorf("convert to %s uploaded blobs %v (%d bytes); want the config %s (%d bytes) alone", c.ref, c.blobs, c.bytes, cfg.Digest, cfg.Size)
	}
}

// requireConvertPrinted checks that convert printed one line, DST by the
// digest of the manifest DST's tag now names (DST@sha256:…, as pack prints
// its push), and returns DST's repository by that digest without its
// registry host ("/repo@sha256:…").
func requireConvertPrinted(t *testing.T, out, dst string, m imageManifest) string {
	t.Helper()
	if want := dst + "@" + m.digest.String() + "\n"; out != want {
		t.Fatalf("convert printed %q; want %q", out, want)
	}
	tag, err := name.NewTag(dst, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return "/" + tag.RepositoryStr() + "@" + m.digest.String()
}

// requireTablesOfSameBlobs checks that dst is src with a chunk table for
// every layer: the same blobs, the same config but for the tables, and
// tables that every chunk of the blob, as the registry stores it, matches.
func requireTablesOfSameBlobs(t *testing.T, reg *testutil.Registry, src, dst imageManifest) {
	t.Helper()
	if dst.m.MediaType != src.m.MediaType || dst.m.Config.MediaType != src.m.Config.MediaType {
		t.Errorf("converted manifest: type %q, config type %q; want those of the source, %q and %q",
			dst.m.MediaType, dst.m.Config.MediaType, src.m.MediaType, src.m.Config.MediaType)
	}
	// The config is the source's with the tables added, nothing else.
	var srcCfg, dstCfg map[string]any
	if err := json.Unmarshal(src.config, &srcCfg); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(dst.config, &dstCfg); err != nil {
		t.Fatal(err)
	}
	delete(dstCfg, annotations.ConfigKey)
	if !reflect.DeepEqual(srcCfg, dstCfg) {
		t.Errorf("converted config, without its layer annotations:\n%v\nwant the source's\n%v", dstCfg, srcCfg)
	}
	if len(dst.m.Layers) != len(src.m.Layers) {
		t.Fatalf("converted image has %d layers, the source %d", len(dst.m.Layers), len(src.m.Layers))
	}
	for i, l := range dst.m.Layers {
		s := src.m.Layers[i]
		if l.Digest != s.Digest || l.Size != s.Size || l.MediaType != s.MediaType {
			t.Errorf("layer %d: converted %s (%d bytes, %s), source %s (%d bytes, %s); want the same blob",
				i, l.Digest, l.Size, l.MediaType, s.Digest, s.Size, s.MediaType)
			continue
		}
		tab, err := chunks.Find(dst.annotationsOf(l), l.Size)
		if err != nil {
			t.Errorf("layer %d (%s): chunk table: %v", i, l.Digest, err)
			continue
		}
		blob, err := os.ReadFile(lazyBlobDataPath(reg.Dir, l.Digest.String()))
		if err != nil {
			t.Fatal(err)
		}
		for c := range tab.Len() {
			off, n := tab.Range(c)
			if err := tab.Check(c, blob[off:off+n]); err != nil {
				t.Errorf("layer %d (%s): %v", i, l.Digest, err)
			}
		}
		t.Logf("layer %d: %d chunks of %d bytes", i, tab.Len(), tab.ChunkSize)
	}
}

// layerHolding returns the descriptor of the layer of m whose gzip tar,
// as the registry stores it, holds the file rel.
func layerHolding(t *testing.T, reg *testutil.Registry, m *v1.Manifest, rel string) v1.Descriptor {
	t.Helper()
	for _, l := range m.Layers {
		blob, err := os.ReadFile(lazyBlobDataPath(reg.Dir, l.Digest.String()))
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatalf("layer %s: %v", l.Digest, err)
		}
		tr := tar.NewReader(zr)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %s: %v", l.Digest, err)
			}
			if strings.TrimPrefix(h.Name, "./") == rel {
				return l
			}
		}
	}
	t.Fatalf("no layer holds %s", rel)
	return v1.Descriptor{}
}

// flipBlobByte inverts the byte at off of the blob digest in the
// registry's storage, which serves it as it is; the returned restore (also
// run in t.Cleanup) inverts it back.
func flipBlobByte(t *testing.T, reg *testutil.Registry, digest string, off int64) (restore func()) {
	t.Helper()
	path := lazyBlobDataPath(reg.Dir, digest)
	flip := func() error {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		b := make([]byte, 1)
		if _, err := f.ReadAt(b, off); err != nil {
			return err
		}
		b[0] ^= 0xff
		if _, err := f.WriteAt(b, off); err != nil {
			return err
		}
		return f.Close()
	}
	if err := flip(); err != nil {
		t.Fatalf("corrupting blob %s: %v", digest, err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := flip(); err != nil {
				t.Errorf("restoring blob %s: %v", digest, err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

// requireCorruptionIsEIO mounts ref, whose weights layer the registry
// serves corrupted, on a fresh node under dir, and reads the weights:
// every byte a read returns must be the original's, and the read must fail
// with EIO. A mount that itself refuses the layer must name it and leave
// nothing mounted.
func requireCorruptionIsEIO(t *testing.T, ref, dir string, want []byte, layer string) {
	t.Helper()
	n := lazyStartNode(t, filepath.Join(dir, "cache"), nil)
	img, err := n.tryMountImage(t, ref, filepath.Join(dir, "image"))
	if err != nil {
		t.Logf("mount through the corrupting registry failed: %v", err)
		if !strings.Contains(err.Error(), layer) {
			t.Errorf("mount error does not name the corrupted layer %s: %v", layer, err)
		}
		if left := mountsUnder(t, dir); len(left) > 0 {
			t.Errorf("failed mount left mounts behind: %v", left)
		}
		return
	}
	got, err := lazyReadFile(t, img.path(convertWeights))
	lazyCheckPrefix(t, "read through a corrupting registry", got, want)
	if !lazyIsEIO(err) {
		t.Errorf("read of the weights through a corrupting registry: %d bytes, err %v; want EIO", len(got), err)
	}
	t.Logf("%s: %d correct bytes, then %v", filepath.Base(dir), len(got), err)
}

// requirePullsAndRuns pulls ref with containerd's default snapshotter and
// runs a container of it that hashes the weights.
func requirePullsAndRuns(t *testing.T, ctx context.Context, ctd *containerd, ref, weightsLayer, id string, weights []byte) {
	t.Helper()
	if _, err := ctd.ctr(t, ctx, "images", "pull", "--plain-http", ref); err != nil {
		t.Fatal(err)
	}
	content, err := ctd.ctr(t, ctx, "content", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(content, weightsLayer) {
		t.Errorf("the weights layer %s is not in containerd's content store after the pull", weightsLayer)
	}
	snaps, err := ctd.ctr(t, ctx, "snapshots", "--snapshotter", "overlayfs", "ls")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(strings.TrimSpace(snaps), "\n") < 1 {
		t.Errorf("no overlayfs snapshot after the pull:\n%s", snaps)
	}
	out, err := ctd.ctr(t, ctx, "run", "--rm", ref, id, "/tool", "sum", "/"+convertWeights)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(out), lazySHA256(weights); got != want {
		t.Errorf("sha256 of the weights read in a container = %q, want %s", got, want)
	}
}

var blobGetPath = regexp.MustCompile(`^/v2/.+/blobs/(sha256:[0-9a-f]{64})$`)
