package integration

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// criNamespace is the containerd namespace of the CRI plugin.
const criNamespace = "k8s.io"

// Where the weights files sit in model images: the main one, and a
// smaller second one.
const (
	modelPath = "models/model.bin"
	extraPath = "models/extra.bin"
)

// stack is a registry (behind a counting proxy), weightsnapd and a
// containerd using it, and the tools image (the pod sandbox, and the
// program that hashes a file).
type stack struct {
	dir      string
	registry *testutil.Registry
	origin   *testutil.Proxy // every client reaches the registry through it
	hosts    string          // containerd/weightsnapd hosts directory
	ws       *weightsnapd
	ctd      *containerd
	tool     []byte // the tools image's only layer
	tools    image
}

// newStack starts everything; mirrors (host:ports) are written into the
// registry's hosts.toml before the daemons start.
func newStack(t *testing.T, mirrorsFor func(origin string) []string) *stack {
	t.Helper()
	return newStackWithConfig(t, mirrorsFor, nil)
}

// newStackWithConfig is newStack with wsExtra(dir, containerd's socket)
// appended to weightsnapd's config; nil adds nothing.
func newStackWithConfig(t *testing.T, mirrorsFor func(origin string) []string, wsExtra func(dir, containerdSock string) string) *stack {
	t.Helper()
	testutil.RequireFUSE(t)
	testutil.RequireBinary(t, "containerd")
	s := &stack{dir: shortTempDir(t, "ws")}
	s.registry = testutil.StartRegistry(t)
	s.origin = testutil.StartProxy(t, s.registry.URL(), testutil.Faults{})
	s.hosts = filepath.Join(s.dir, "certs.d")
	var mirrors []string
	if mirrorsFor != nil {
		mirrors = mirrorsFor(s.origin.Addr)
	}
	writeHostsToml(t, s.hosts, s.origin.Addr, mirrors...)

	tool, err := os.ReadFile(toolBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	s.tool = tarLayer(t, map[string][]byte{"tool": tool}, map[string]int64{"tool": 0o755})
	s.tools = pushImage(t, s.origin.Addr, "tools:v1", []string{"/tool", "sleep"}, s.tool)

	ctdDir := filepath.Join(s.dir, "ctd")
	var extra string
	if wsExtra != nil {
		extra = wsExtra(s.dir, filepath.Join(ctdDir, "c.sock"))
	}
	s.ws = startWeightsnapdWithConfig(t, filepath.Join(s.dir, "wsd"), s.hosts, extra)
	s.ctd = startContainerd(t, mkdir(t, ctdDir), s.ws.sock, s.hosts, s.tools.Ref)
	return s
}

func mkdir(t testing.TB, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// model is a model image: its weights layer is the last one.
type model struct {
	image
	sum      string // sha256 of the weights file at modelPath
	extraSum string // sha256 of the file at extraPath
	weight   string // digest of the weights layer
	size     int64  // size of the weights layer blob
	// weightOff is where the weights file's bytes start in that blob
	// (an uncompressed tar).
	weightOff int64
}

// pushModel pushes repoTag with a weights file of size bytes (and one of
// size/4), on top of the given base layers.
func (s *stack) pushModel(t *testing.T, addr, repoTag string, size int, seed uint64, base ...[]byte) model {
	t.Helper()
	w, x := randomBytes(size, seed), randomBytes(size/4, seed+1000)
	layer := tarLayer(t, map[string][]byte{modelPath: w, extraPath: x}, nil)
	img := pushImage(t, addr, repoTag, []string{"/tool", "sleep"}, append(base, layer)...)
	last := img.Layers[len(img.Layers)-1]
	off := tarDataOffset(t, layer, modelPath)
	if !bytes.Equal(layer[off:off+int64(len(w))], w) {
		t.Fatalf("the weights are not at offset %d of their layer", off)
	}
	return model{image: img, sum: sha256Hex(w), extraSum: sha256Hex(x), weight: last.Digest.String(), size: last.Size, weightOff: off}
}

// requireFetchedOnce fails if the registry served more than one copy of
// the weights layer (a little slack for index reads and retried ranges).
func requireFetchedOnce(t *testing.T, p *testutil.Proxy, m model, when string) {
	t.Helper()
	if got := p.BlobBytes(m.weight); got > m.size+m.size/20 {
		t.Errorf("%s: the registry served %d bytes of the %d-byte weights layer, want it fetched at most once", when, got, m.size)
	}
}

// requireLazy fails unless the pull left the weights layer to
// weightsnap: the blob is not in containerd's content store (containerd
// skipped it) and weightsnapd mounted the layer lazily. (Registry bytes
// say nothing here: weightsnap fills its cache in the background as soon
// as a layer is mounted.)
func (s *stack) requireLazy(t *testing.T, ctx context.Context, namespace string, m model) {
	t.Helper()
	content, err := s.ctd.ctr(t, ctx, "--namespace", namespace, "content", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(content, m.weight) {
		t.Errorf("the weights layer %s is in containerd's content store after the pull", m.weight)
	}
	if !logHas(s.ws.log, "mounting layer lazily", m.weight) {
		t.Errorf("weightsnapd did not mount the weights layer %s lazily", m.weight)
	}
}

func TestCtrPullIsLazyAndContainerReadsWeights(t *testing.T) {
	s := newStack(t, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	m := s.pushModel(t, s.origin.Addr, "model:v1", 256<<20, 1, s.tool)

	if _, err := s.ctd.ctr(t, ctx, "images", "pull", "--snapshotter", "weightsnap", "--plain-http", "--hosts-dir", s.hosts, m.Ref); err != nil {
		t.Fatal(err)
	}
	s.requireLazy(t, ctx, "default", m)
	// weightsnapd read the manifest and config containerd had just
	// fetched from its content store: the registry served each once.
	if n := s.origin.Gets("/manifests/" + m.Manifest); n != 1 {
		t.Errorf("the registry served the manifest %d times by digest; want once (containerd's GET)", n)
	}
	if n := s.origin.Gets("/blobs/" + m.Config); n != 1 {
		t.Errorf("the registry served the config %d times; want once (containerd's GET)", n)
	}
	// containerd resolves the tag with a HEAD; weightsnapd asks for the
	// manifest by digest only.
	if n := s.origin.Gets("/manifests/v1"); n != 0 {
		t.Errorf("the registry served the manifest %d times by tag; want none", n)
	}

	out, err := s.ctd.ctr(t, ctx, "run", "--rm", "--snapshotter", "weightsnap", m.Ref, "ws-ctr-run", "/tool", "sum", "/"+modelPath)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != m.sum {
		t.Errorf("sha256 read in the container = %q, want %q", got, m.sum)
	}
}

// pod is a pod sandbox with one container whose image volume is a model.
type pod struct {
	sandbox, container string
}

// runPod runs a pod (host network) in namespace ns whose container (the
// tools image) mounts modelRef read-only at /models-volume.
func (s *stack) runPod(t *testing.T, ctx context.Context, rt criapi.RuntimeServiceClient, ns, name, modelRef string) pod {
	t.Helper()
	cfg := &criapi.PodSandboxConfig{
		Metadata:     &criapi.PodSandboxMetadata{Name: name, Namespace: ns, Uid: ns + "-" + name},
		LogDirectory: mkdir(t, filepath.Join(s.dir, "logs", ns, name)),
		Linux: &criapi.LinuxPodSandboxConfig{SecurityContext: &criapi.LinuxSandboxSecurityContext{
			NamespaceOptions: &criapi.NamespaceOption{Network: criapi.NamespaceMode_NODE},
		}},
	}
	sb, err := rt.RunPodSandbox(ctx, &criapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		t.Fatalf("RunPodSandbox %s/%s: %v", ns, name, err)
	}
	p := pod{sandbox: sb.PodSandboxId}
	t.Cleanup(func() { removePod(t, rt, p) })
	cc, err := rt.CreateContainer(ctx, readerContainer(sb.PodSandboxId, cfg, s.tools.Ref, modelRef, []string{"/tool", "sleep"}))
	if err != nil {
		t.Fatalf("CreateContainer with image volume %s: %v", modelRef, err)
	}
	p.container = cc.ContainerId
	if _, err := rt.StartContainer(ctx, &criapi.StartContainerRequest{ContainerId: cc.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	return p
}

// removePod stops and removes the pod; harmless if already removed.
func removePod(t testing.TB, rt criapi.RuntimeServiceClient, p pod) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := rt.StopPodSandbox(ctx, &criapi.StopPodSandboxRequest{PodSandboxId: p.sandbox}); err != nil {
		t.Errorf("StopPodSandbox: %v", err)
	}
	if _, err := rt.RemovePodSandbox(ctx, &criapi.RemovePodSandboxRequest{PodSandboxId: p.sandbox}); err != nil {
		t.Errorf("RemovePodSandbox: %v", err)
	}
}

// sumInPod hashes the model file inside the pod's container.
func sumInPod(t *testing.T, ctx context.Context, rt criapi.RuntimeServiceClient, p pod) string {
	t.Helper()
	return sumFileInPod(t, ctx, rt, p, modelPath)
}

// sumFileInPod hashes the file at path of the image volume in the pod.
func sumFileInPod(t *testing.T, ctx context.Context, rt criapi.RuntimeServiceClient, p pod, path string) string {
	t.Helper()
	r, err := rt.ExecSync(ctx, &criapi.ExecSyncRequest{
		ContainerId: p.container,
		Cmd:         []string{"/tool", "sum", "/models-volume/" + path},
		Timeout:     120,
	})
	if err != nil {
		t.Fatalf("ExecSync: %v", err)
	}
	if r.ExitCode != 0 {
		t.Fatalf("hashing the model in the pod: exit %d: %s", r.ExitCode, r.Stderr)
	}
	return strings.TrimSpace(string(r.Stdout))
}

func pullImage(t *testing.T, ctx context.Context, is criapi.ImageServiceClient, ref string) {
	t.Helper()
	if _, err := is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: ref}}); err != nil {
		t.Fatalf("CRI PullImage %s: %v", ref, err)
	}
}

// awaitSnapshotter waits until containerd reaches weightsnapd again after
// a restart: its proxy connection retries with a backoff of up to 3 s and
// fails calls meanwhile (kubelet would retry them).
func (s *stack) awaitSnapshotter(t *testing.T, ctx context.Context) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := s.ctd.ctr(t, ctx, "--namespace", criNamespace, "snapshots", "--snapshotter", "weightsnap", "ls")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd does not reach weightsnapd after its restart: %v", err)
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(200 * time.Millisecond): // no event for a reconnected gRPC channel
		}
	}
}

// imageVolumeSnapshots lists weightsnap's snapshots held for image volumes.
func (s *stack) imageVolumeSnapshots(t *testing.T, ctx context.Context) []string {
	t.Helper()
	out, err := s.ctd.ctr(t, ctx, "--namespace", criNamespace, "snapshots", "--snapshotter", "weightsnap", "ls")
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for line := range strings.SplitSeq(out, "\n") {
		if strings.Contains(line, "image-volumes") {
			keys = append(keys, line)
		}
	}
	return keys
}

func TestCRIImageVolumeSharedAcrossNamespaces(t *testing.T) {
	s := newStack(t, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	rt, is := s.ctd.cri(t)
	m := s.pushModel(t, s.origin.Addr, "model:v1", 32<<20, 2)

	pullImage(t, ctx, is, m.Ref)
	s.requireLazy(t, ctx, criNamespace, m)
	pullImage(t, ctx, is, s.tools.Ref)

	a := s.runPod(t, ctx, rt, "team-a", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, a); got != m.sum {
		t.Fatalf("pod in team-a read sha256 %s, want %s", got, m.sum)
	}
	b := s.runPod(t, ctx, rt, "team-b", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, b); got != m.sum {
		t.Fatalf("pod in team-b read sha256 %s, want %s", got, m.sum)
	}
	requireFetchedOnce(t, s.origin, m, "two pods in two namespaces")

	// The checks below would pass vacuously if they could not see the
	// volumes: they must see them while the pods run.
	if got := s.imageVolumeSnapshots(t, ctx); len(got) != 2 {
		t.Errorf("image-volume snapshots while two pods run: %v, want 2", got)
	}
	if len(mountsUnder(t, s.ctd.dir)) == 0 {
		t.Errorf("no mounts under containerd's directories while two pods run")
	}

	for _, p := range []pod{a, b} {
		removePod(t, rt, p)
	}
	if left := mountsUnder(t, s.ctd.dir); len(left) > 0 {
		t.Errorf("mounts left under containerd after the pods were removed: %v", left)
	}
	if left := s.imageVolumeSnapshots(t, ctx); len(left) > 0 {
		t.Errorf("image-volume snapshots left after the pods were removed: %v", left)
	}
}

func TestCRIImageVolumeSurvivesRestarts(t *testing.T) {
	s := newStack(t, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	rt, is := s.ctd.cri(t)
	m := s.pushModel(t, s.origin.Addr, "model:v1", 32<<20, 3)
	pullImage(t, ctx, is, m.Ref)
	pullImage(t, ctx, is, s.tools.Ref)

	a := s.runPod(t, ctx, rt, "team-a", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, a); got != m.sum {
		t.Fatalf("before the kill: sha256 %s, want %s", got, m.sum)
	}

	s.ws.killAndRestart(t)
	s.awaitSnapshotter(t, ctx)
	// A file the pod has not read yet cannot come from the page cache:
	// the lazy mount itself must still serve.
	if got := sumFileInPod(t, ctx, rt, a, extraPath); got != m.extraSum {
		t.Errorf("running pod after kill -9 and restart: sha256 of %s %s, want %s", extraPath, got, m.extraSum)
	}
	b := s.runPod(t, ctx, rt, "team-b", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, b); got != m.sum {
		t.Errorf("new pod after kill -9 and restart: sha256 %s, want %s", got, m.sum)
	}
	removePod(t, rt, a)
	removePod(t, rt, b)

	// A clean restart unmounts everything; the next start mounts the
	// layers again from what the cache kept.
	s.ws.restart(t)
	s.awaitSnapshotter(t, ctx)
	c := s.runPod(t, ctx, rt, "team-c", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, c); got != m.sum {
		t.Errorf("new pod after a clean restart: sha256 %s, want %s", got, m.sum)
	}
	if got := sumFileInPod(t, ctx, rt, c, extraPath); got != m.extraSum {
		t.Errorf("new pod after a clean restart: sha256 of %s %s, want %s", extraPath, got, m.extraSum)
	}
	requireFetchedOnce(t, s.origin, m, "after a kill -9 and a clean restart")
}

func TestCRIMirrorAndFallbackToOrigin(t *testing.T) {
	var mirror *testutil.Registry
	var mirrorProxy *testutil.Proxy
	s := newStack(t, func(origin string) []string {
		mirror = testutil.StartRegistry(t, testutil.WithPullThrough("http://"+origin))
		mirrorProxy = testutil.StartProxy(t, mirror.URL(), testutil.Faults{})
		return []string{mirrorProxy.Addr}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	rt, is := s.ctd.cri(t)
	pullImage(t, ctx, is, s.tools.Ref)

	m1 := s.pushModel(t, s.origin.Addr, "model:one", 16<<20, 4)
	pullImage(t, ctx, is, m1.Ref)
	p1 := s.runPod(t, ctx, rt, "team-a", "one", m1.Ref)
	if got := sumInPod(t, ctx, rt, p1); got != m1.sum {
		t.Fatalf("through the mirror: sha256 %s, want %s", got, m1.sum)
	}
	if got := mirrorProxy.BlobBytes(m1.weight); got == 0 {
		t.Errorf("the mirror served no bytes of the weights layer")
	}

	mirror.Stop()
	m2 := s.pushModel(t, s.origin.Addr, "model:two", 16<<20, 5)
	pullImage(t, ctx, is, m2.Ref)
	p2 := s.runPod(t, ctx, rt, "team-a", "two", m2.Ref)
	if got := sumInPod(t, ctx, rt, p2); got != m2.sum {
		t.Fatalf("with the mirror stopped: sha256 %s, want %s", got, m2.sum)
	}
	if got := s.origin.BlobBytes(m2.weight); got == 0 {
		t.Errorf("with the mirror stopped, the origin served no bytes of the weights layer")
	}
}
