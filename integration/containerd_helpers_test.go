package integration

// The containerd harness: a real containerd (pinned, from .bin) with
// Debian's runc, weightsnapd as its proxy snapshotter, and a registry,
// each with its own temporary root, state and socket.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

var (
	buildMu    sync.Mutex
	buildCache = map[string]string{}
)

// goBuild builds the main package pkg in dir into out, once per test
// binary while out exists; env is added to the build's environment.
func goBuild(t testing.TB, dir, pkg, out string, env ...string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	key := dir + "|" + pkg
	if p, ok := buildCache[key]; ok {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "GOWORK=off"), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	buildCache[key] = out
	return out
}

// weightsnapdBinary builds cmd/weightsnapd into a temp dir of the test.
func weightsnapdBinary(t testing.TB) string {
	t.Helper()
	root, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return goBuild(t, root, "./cmd/weightsnapd", filepath.Join(t.TempDir(), "weightsnapd"))
}

// tarLayer is an uncompressed tar layer with the given regular files.
func tarLayer(t testing.TB, files map[string][]byte, mode map[string]int64) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range files {
			if !yield(n) {
				return
			}
		}
	})
	dirs := map[string]bool{}
	for _, n := range names {
		for d := filepath.Dir(n); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	for _, d := range slices.Sorted(func(yield func(string) bool) {
		for d := range dirs {
			if !yield(d) {
				return
			}
		}
	}) {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: time.Unix(1700000000, 0)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range names {
		m := int64(0o644)
		if v, ok := mode[n]; ok {
			m = v
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: m, Size: int64(len(files[n])), ModTime: time.Unix(1700000000, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(files[n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// randomBytes returns n pseudo-random bytes (seeded; fast, incompressible).
func randomBytes(n int, seed uint64) []byte {
	var s [32]byte
	s[0] = byte(seed)
	s[1] = byte(seed >> 8)
	r := rand.NewChaCha8(s)
	b := make([]byte, n)
	_, _ = r.Read(b)
	return b
}

func sha256Hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// image is an image pushed by pushImage.
type image struct {
	Ref    string          // registry/repo:tag
	Layers []v1.Descriptor // manifest order
	// Manifest and Config are the digests of its manifest and config.
	Manifest, Config string
}

// pushImage pushes an OCI image of uncompressed tar layers with the given
// entrypoint to the registry at addr.
// tarDataOffset returns the offset in the tar layer of the first byte of
// the regular file name.
func tarDataOffset(t testing.TB, layer []byte, name string) int64 {
	t.Helper()
	r := bytes.NewReader(layer)
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("tar layer: no %s: %v", name, err)
		}
		if h.Name == name {
			// The reader has consumed the headers and no data: it
			// reads whole blocks, never ahead.
			return r.Size() - int64(r.Len())
		}
	}
}

func pushImage(t testing.TB, addr, repoTag string, entrypoint []string, layers ...[]byte) image {
	t.Helper()
	ref, err := name.NewTag(addr+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		// With a chunk table and the tar headers, as pack makes layers:
		// served lazily under weightsnapd's default unverified_layers =
		// "full", and mounted without reading the blob.
		var err error
		img, err = mutate.Append(img, mutate.Addendum{
			Layer:       static.NewLayer(l, types.OCIUncompressedLayer),
			Annotations: testutil.EncodeLayers(t, [][]byte{l}, testutil.FormatTar)[0].Annotations,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Entrypoint = entrypoint
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(t.Context())); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	md, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return image{Ref: ref.String(), Layers: m.Layers, Manifest: md.String(), Config: m.Config.Digest.String()}
}

// weightsnapd is a running weightsnapd.
type weightsnapd struct {
	bin, root, sock, config, log string
	metrics                      string // host:port of /metrics
	proc                         *process
	env                          []string // added to the next start's environment
}

// startWeightsnapd starts weightsnapd with its state in root, reading
// registry hosts from hostsDir.
func startWeightsnapd(t testing.TB, root, hostsDir string) *weightsnapd {
	t.Helper()
	return startWeightsnapdWithConfig(t, root, hostsDir, "")
}

// startWeightsnapdWithConfig is startWeightsnapd with extra appended to
// weightsnapd's config (after its [registry] table).
func startWeightsnapdWithConfig(t testing.TB, root, hostsDir, extra string) *weightsnapd {
	t.Helper()
	mkdir(t, root)
	w := &weightsnapd{
		bin:    weightsnapdBinary(t),
		root:   filepath.Join(root, "state"),
		sock:   filepath.Join(root, "ws.sock"),
		config: filepath.Join(root, "weightsnapd.toml"),
		log:    filepath.Join(root, "weightsnapd.log"),
	}
	w.metrics = freeLoopbackAddr(t)
	// The containerd a test starts beside weightsnapd, whose content
	// store weightsnapd reads manifests and configs from, serves
	// <dir>/ctd/c.sock where root is <dir>/wsd (newStack, startBenchStack).
	ctdSock := filepath.Join(filepath.Dir(root), "ctd", "c.sock")
	cfg := fmt.Sprintf("log_level = \"debug\"\nmetrics_address = %q\n[registry]\nconfig_path = %q\ncontainerd_address = %q\n", w.metrics, hostsDir, ctdSock) + extra
	if err := os.WriteFile(w.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after weightsnapd has been stopped
	// (SIGTERM, which leaves the FUSE manager serving) and after
	// containerd and the pods: `weightsnapd shutdown` then stops the
	// manager and the holder, taking every mount with them.
	t.Cleanup(func() { w.shutdown(t) })
	// One cleanup for every incarnation, so that a restarted weightsnapd
	// is still stopped after containerd and the pods.
	t.Cleanup(func() {
		if w.proc != nil {
			w.proc.stopAndReport(t)
		}
	})
	w.start(t)
	return w
}

// waitVerified waits until weightsnapd reports every layer in digests
// cached whole and verified (weightsnap_layer_verified).
func (w *weightsnapd) waitVerified(ctx context.Context, digests []string) error {
	if len(digests) == 0 {
		return errors.New("waiting for weightsnapd to verify layers: no layers named")
	}
	for _, d := range digests {
		for {
			v, err := w.metric(ctx, fmt.Sprintf("weightsnap_layer_verified{layer=%q}", d))
			if err == nil && v == 1 {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("waiting for weightsnapd to verify layer %s: %w (last scrape error: %v)", d, ctx.Err(), err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// metric returns the value of the sample named series (name and labels,
// as in the text format) from weightsnapd's /metrics; 0 if absent.
func (w *weightsnapd) metric(ctx context.Context, series string) (float64, error) {
	body, err := httpGet(ctx, "http://"+w.metrics+"/metrics")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, nil
}

// readerContainer is the container of a reader pod: the tools image
// running command, with modelRef mounted read-only at /models-volume as
// an image volume.
func readerContainer(sandboxID string, cfg *criapi.PodSandboxConfig, toolsRef, modelRef string, command []string) *criapi.CreateContainerRequest {
	return &criapi.CreateContainerRequest{
		PodSandboxId:  sandboxID,
		SandboxConfig: cfg,
		Config: &criapi.ContainerConfig{
			Metadata: &criapi.ContainerMetadata{Name: "reader"},
			Image:    &criapi.ImageSpec{Image: toolsRef},
			Command:  command,
			LogPath:  "reader.log",
			Mounts: []*criapi.Mount{{
				ContainerPath: "/models-volume",
				Image:         &criapi.ImageSpec{Image: modelRef},
				Readonly:      true,
			}},
		},
	}
}

// httpGet returns the body of a GET of url.
func httpGet(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), err
}

// managerPID returns the pid of weightsnapd's FUSE manager, or 0.
func (w *weightsnapd) managerPID() int { return pidFile(filepath.Join(w.root, "fusemanager.pid")) }

func (w *weightsnapd) start(t testing.TB) {
	t.Helper()
	w.proc = spawn(t, "weightsnapd", w.log, w.env, w.bin, "--config", w.config, "--root", w.root, "--address", w.sock)
	waitSocket(t, w.proc, w.sock)
}

// killAndRestart kills weightsnapd with SIGKILL and starts it again.
func (w *weightsnapd) killAndRestart(t testing.TB) {
	t.Helper()
	w.proc.kill(t)
	w.start(t)
}

// holderPID returns the pid of weightsnapd's holder, or 0.
func (w *weightsnapd) holderPID() int { return pidFile(filepath.Join(w.root, "holder.pid")) }

func pidFile(p string) int {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// shutdown runs `weightsnapd shutdown`, and checks that it stopped the
// FUSE manager and the holder and left no mount.
func (w *weightsnapd) shutdown(t testing.TB) {
	t.Helper()
	pids := []int{w.managerPID(), w.holderPID()}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, w.bin, "shutdown", "--root", w.root).CombinedOutput(); err != nil {
		t.Errorf("weightsnapd shutdown: %v\n%s", err, out)
	}
	for _, pid := range pids {
		if pid > 0 && !waitExit(pid, stopGrace) {
			t.Errorf("process %d of weightsnapd outlived weightsnapd shutdown", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if left := mountsUnder(t, w.root); len(left) > 0 {
		t.Errorf("mounts left after weightsnapd shutdown: %v", left)
	}
}

// restart stops weightsnapd with SIGTERM, checks that it exited cleanly
// and left its FUSE manager serving, and starts it again: the new one
// adopts the manager.
func (w *weightsnapd) restart(t testing.TB) {
	t.Helper()
	pid := w.managerPID()
	w.proc.stop(t)
	if !w.proc.exitedCleanly() {
		t.Errorf("weightsnapd exited with %v after SIGTERM\n%s", w.proc.err, tailFile(w.log, 20))
	}
	w.start(t)
	if got := w.managerPID(); pid <= 0 || got != pid || !alive(pid) {
		t.Errorf("after a restart of weightsnapd the FUSE manager is pid %d, want the same %d, running", got, pid)
	}
}

// upgrade stops weightsnapd with SIGTERM and starts a new binary (a copy
// of it, another file): the new weightsnapd has the running FUSE manager
// hand its mounts over to a manager of the new binary.
func (w *weightsnapd) upgrade(t testing.TB) {
	t.Helper()
	old := w.managerPID()
	w.proc.stop(t)
	b, err := os.ReadFile(w.bin)
	if err != nil {
		t.Fatal(err)
	}
	w.bin = filepath.Join(t.TempDir(), "weightsnapd")
	if err := os.WriteFile(w.bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	w.start(t)
	if !waitExit(old, stopGrace) {
		t.Fatalf("the old FUSE manager (pid %d) still runs after the upgrade", old)
	}
	if got := w.managerPID(); got <= 0 || got == old || !alive(got) {
		t.Fatalf("after the upgrade the FUSE manager is pid %d, want a new one", got)
	}
}

// killManager kills the FUSE manager with SIGKILL and waits until
// weightsnapd has started another.
func (w *weightsnapd) killManager(t testing.TB) {
	t.Helper()
	old := w.managerPID()
	if old <= 0 {
		t.Fatal("no FUSE manager pid")
	}
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !waitExit(old, stopGrace) {
		t.Fatalf("the FUSE manager (pid %d) survived SIGKILL", old)
	}
	w.awaitManager(t, old)
}

// killBoth kills weightsnapd and its FUSE manager with SIGKILL, and starts
// weightsnapd again, which starts a new manager.
func (w *weightsnapd) killBoth(t testing.TB) {
	t.Helper()
	old := w.managerPID()
	w.proc.kill(t)
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !waitExit(old, stopGrace) {
		t.Fatalf("the FUSE manager (pid %d) survived SIGKILL", old)
	}
	w.start(t)
	w.awaitManager(t, old)
}

// awaitManager waits until a FUSE manager other than old runs and answers.
func (w *weightsnapd) awaitManager(t testing.TB, old int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if pid := w.managerPID(); pid > 0 && pid != old && alive(pid) {
			if _, err := w.health(t); err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new FUSE manager a minute after pid %d died\n%s", old, tailFile(w.log, 30))
		}
		time.Sleep(50 * time.Millisecond) // polling a condition, with a deadline
	}
}

// alive reports whether process pid exists.
func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// containerd is a running containerd with weightsnap as its snapshotter.
type containerd struct {
	dir, root, state, sock, log string
	proc                        *process
	ctrBin                      string
}

// containerdConfig is containerd's config (version 3) with weightsnap as
// the CRI snapshotter. For layers to reach weightsnap with the
// remote-snapshot labels, the CRI images plugin keeps snapshot annotations
// on (disable_snapshot_annotations = false, which also makes CRI pull with
// its own client rather than the transfer service), and the proxy plugin
// exports enable_remote_snapshot_annotations = "true", which the transfer
// service (ctr transfer, unpack_config) checks before adding them.
const containerdConfig = `version = 3
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[debug]
  level = "debug"

[proxy_plugins.weightsnap]
  type = "snapshot"
  address = %[5]q
  [proxy_plugins.weightsnap.exports]
    enable_remote_snapshot_annotations = "true"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "weightsnap"
  disable_snapshot_annotations = false
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[6]q
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = %[7]q

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    BinaryName = %[8]q

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = %[9]q
  snapshotter = "weightsnap"
`

// startContainerd starts containerd in dir using weightsnapd's socket,
// with sandboxImage pinned as the pod sandbox image.
func startContainerd(t testing.TB, dir, wsSock, hostsDir, sandboxImage string) *containerd {
	t.Helper()
	return startContainerdWithConfig(t, dir, wsSock, hostsDir, sandboxImage, "")
}

// startContainerdWithConfig is startContainerd with extra appended to
// containerd's config.
func startContainerdWithConfig(t testing.TB, dir, wsSock, hostsDir, sandboxImage, extra string) *containerd {
	t.Helper()
	bin := testutil.RequireBinary(t, "containerd")
	testutil.RequireBinary(t, "containerd-shim-runc-v2")
	runc := testutil.RequireBinary(t, "runc")
	c := &containerd{
		dir:    dir,
		root:   filepath.Join(dir, "root"),
		state:  filepath.Join(dir, "state"),
		sock:   filepath.Join(dir, "c.sock"),
		log:    filepath.Join(dir, "containerd.log"),
		ctrBin: testutil.RequireBinary(t, "ctr"),
	}
	cfg := fmt.Sprintf(containerdConfig, c.root, c.state, c.sock, c.sock+".ttrpc", wsSock,
		sandboxImage, hostsDir, runc, "linux/"+runtime.GOARCH) + extra
	cfgPath := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// containerd finds the shim in PATH.
	path := "PATH=" + filepath.Dir(bin) + ":" + os.Getenv("PATH")
	c.proc = startProcess(t, "containerd", c.log, []string{path}, bin, "--config", cfgPath)
	t.Cleanup(func() { c.reapShims(t) }) // after containerd stopped (cleanups run LIFO)
	waitSocket(t, c.proc, c.sock)
	return c
}

// reapShims kills the shims (and so their containers) this containerd
// started, found by the shim.pid files in its state directory.
func (c *containerd) reapShims(t testing.TB) {
	t.Helper()
	_ = filepath.WalkDir(c.state, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || (d.Name() != "shim.pid" && d.Name() != "init.pid") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		return nil
	})
}

// ctr runs ctr against this containerd and returns its stdout.
func (c *containerd) ctr(t testing.TB, ctx context.Context, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(ctx, c.ctrBin, append([]string{"--address", c.sock}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// cri connects to containerd's CRI services.
func (c *containerd) cri(t testing.TB) (criapi.RuntimeServiceClient, criapi.ImageServiceClient) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+c.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return criapi.NewRuntimeServiceClient(conn), criapi.NewImageServiceClient(conn)
}

// writeHostsToml writes <dir>/<host>/hosts.toml: plain HTTP to host,
// through the given mirrors (plain-HTTP host:ports) first.
func writeHostsToml(t testing.TB, dir, host string, mirrors ...string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "server = \"http://%s\"\n", host)
	for _, m := range mirrors {
		fmt.Fprintf(&b, "\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", m)
	}
	hd := filepath.Join(dir, host)
	if err := os.MkdirAll(hd, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(hd, "hosts.toml"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// logHas reports whether a line of the file contains every one of subs.
func logHas(path string, subs ...string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		ok := true
		for _, s := range subs {
			if !strings.Contains(sc.Text(), s) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}
