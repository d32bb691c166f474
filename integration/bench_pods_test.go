package integration

// The benchmark's reader pods, run through the CRI as kubelet would.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/weightsnap/weightsnap/internal/testutil"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// readerPod is a pod whose container reads the model from an image
// volume and exits, with the times of each CRI step.
type readerPod struct {
	pod
	sandboxStart, sandboxReady, created, started time.Time
	trace                                        readTrace
}

// runReaderPod runs a pod (host network) in namespace ns whose container,
// the tools image, mounts modelRef read-only at /models-volume and runs
// "tool read" on files (paths in that volume), and waits for it to exit.
// The pod is removed in tb.Cleanup (callers may remove it earlier). It
// returns errors rather than failing, so that pods can run in parallel.
func runReaderPod(tb testing.TB, ctx context.Context, rt criapi.RuntimeServiceClient, logDir, toolsRef, ns, name, modelRef string, files []string) (readerPod, error) {
	return runReaderPodPulling(tb, ctx, rt, logDir, toolsRef, ns, name, modelRef, append([]string{"read"}, files...), nil)
}

// runReaderPodPulling is runReaderPod running the tool with toolArgs ("read
// FILE...", "load -threads 4 FILE...") and with pull, if not nil, called
// between RunPodSandbox and CreateContainer: kubelet's order, which pulls a
// pod's image volumes after creating its sandbox.
func runReaderPodPulling(tb testing.TB, ctx context.Context, rt criapi.RuntimeServiceClient, logDir, toolsRef, ns, name, modelRef string, toolArgs []string, pull func() error) (readerPod, error) {
	return runReaderPodEdited(tb, ctx, rt, logDir, toolsRef, ns, name, modelRef, toolArgs, pull, nil)
}

// runReaderPodEdited is runReaderPodPulling with edit, if not nil, called
// on the container's config before CreateContainer.
func runReaderPodEdited(tb testing.TB, ctx context.Context, rt criapi.RuntimeServiceClient, logDir, toolsRef, ns, name, modelRef string, toolArgs []string, pull func() error, edit func(*criapi.ContainerConfig)) (readerPod, error) {
	rp := readerPod{sandboxStart: time.Now()}
	cfg, id, err := runSandbox(tb, ctx, rt, logDir, ns, name)
	if err != nil {
		return rp, err
	}
	rp.sandboxReady = time.Now()
	rp.sandbox = id
	if pull != nil {
		if err := pull(); err != nil {
			return rp, err
		}
	}
	req := readerContainer(id, cfg, toolsRef, modelRef, append([]string{"/tool"}, toolArgs...))
	if edit != nil {
		edit(req.Config)
	}
	cc, err := rt.CreateContainer(ctx, req)
	if err != nil {
		return rp, fmt.Errorf("CreateContainer %s/%s with image volume %s: %w", ns, name, modelRef, err)
	}
	rp.created = time.Now()
	rp.container = cc.ContainerId
	if _, err := rt.StartContainer(ctx, &criapi.StartContainerRequest{ContainerId: cc.ContainerId}); err != nil {
		return rp, fmt.Errorf("StartContainer %s/%s: %w", ns, name, err)
	}
	rp.started = time.Now()
	exit, err := waitContainerExit(ctx, rt, cc.ContainerId)
	if err != nil {
		return rp, err
	}
	logPath := filepath.Join(cfg.LogDirectory, "reader.log")
	if exit != 0 {
		lines, _ := criLogLines(logPath)
		return rp, fmt.Errorf("reader in %s/%s exited %d:\n%s", ns, name, exit, strings.Join(lines, "\n"))
	}
	// containerd may write the last lines just after it reports the exit.
	for deadline := time.Now().Add(10 * time.Second); ; {
		lines, err := criLogLines(logPath)
		if err == nil {
			if rp.trace, err = parseToolOutput(lines); err == nil {
				return rp, nil
			}
		}
		if time.Now().After(deadline) {
			return rp, fmt.Errorf("reader log of %s/%s: %w", ns, name, err)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return rp, err
		}
	}
}

// coldReader is a reader pod of an image it pulled.
type coldReader struct {
	readerPod
	pullStart, pulled time.Time
	// opened is how many layers weightsnapd opened with the verification
	// asked for ("chunks", "blob-lazy", …) while the pod ran.
	opened int
}

// coldPod runs a reader pod (ns, name "cold") of modelRef, not yet
// pulled, in kubelet's order: RunPodSandbox, then CRI PullImage, then
// the container with the image volume, running the tool with toolArgs. It
// removes the pod once its reader exited, and counts the layers ws opened
// with verification meanwhile.
func coldPod(tb testing.TB, ctx context.Context, ws *weightsnapd, rt criapi.RuntimeServiceClient, is criapi.ImageServiceClient, logDir, toolsRef, ns, modelRef string, toolArgs []string, verification string) (coldReader, error) {
	var c coldReader
	series := fmt.Sprintf("weightsnap_layers_opened_total{verification=%q}", verification)
	before, err := ws.metric(ctx, series)
	if err != nil {
		return c, err
	}
	c.readerPod, err = runReaderPodPulling(tb, ctx, rt, logDir, toolsRef, ns, "cold", modelRef, toolArgs, func() error {
		c.pullStart = time.Now()
		if _, err := is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: modelRef}}); err != nil {
			return fmt.Errorf("CRI PullImage %s: %w", modelRef, err)
		}
		c.pulled = time.Now()
		return nil
	})
	if err != nil {
		return c, err
	}
	removePod(tb, rt, c.pod)
	after, err := ws.metric(ctx, series)
	if err != nil {
		return c, err
	}
	c.opened = int(after - before)
	return c, nil
}

// runSandbox runs a pod sandbox (host network) in namespace ns, removed
// in tb.Cleanup, and returns its config and id.
func runSandbox(tb testing.TB, ctx context.Context, rt criapi.RuntimeServiceClient, logDir, ns, name string) (*criapi.PodSandboxConfig, string, error) {
	cfg := &criapi.PodSandboxConfig{
		Metadata:     &criapi.PodSandboxMetadata{Name: name, Namespace: ns, Uid: ns + "-" + name},
		LogDirectory: filepath.Join(logDir, ns, name),
		Linux: &criapi.LinuxPodSandboxConfig{SecurityContext: &criapi.LinuxSandboxSecurityContext{
			NamespaceOptions: &criapi.NamespaceOption{Network: criapi.NamespaceMode_NODE},
		}},
	}
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		return nil, "", err
	}
	sb, err := rt.RunPodSandbox(ctx, &criapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		return nil, "", fmt.Errorf("RunPodSandbox %s/%s: %w", ns, name, err)
	}
	tb.Cleanup(func() { removePod(tb, rt, pod{sandbox: sb.PodSandboxId}) })
	return cfg, sb.PodSandboxId, nil
}

// waitContainerExit polls the container's status until it has exited
// (CRI has no event for it that a client can wait on here) and returns its
// exit code.
func waitContainerExit(ctx context.Context, rt criapi.RuntimeServiceClient, id string) (int32, error) {
	for {
		st, err := rt.ContainerStatus(ctx, &criapi.ContainerStatusRequest{ContainerId: id})
		if err != nil {
			return 0, fmt.Errorf("ContainerStatus %s: %w", id, err)
		}
		if st.Status.State == criapi.ContainerState_CONTAINER_EXITED {
			return st.Status.ExitCode, nil
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return 0, fmt.Errorf("waiting for container %s: %w", id, err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// criLogLines returns the stdout lines of a CRI container log
// ("TIMESTAMP STREAM P|F MESSAGE", partial lines joined).
func criLogLines(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var lines []string
	var partial strings.Builder
	for l := range strings.SplitSeq(string(b), "\n") {
		f := strings.SplitN(l, " ", 4)
		if len(f) < 3 || f[1] != "stdout" {
			continue
		}
		msg := ""
		if len(f) == 4 {
			msg = f[3]
		}
		partial.WriteString(msg)
		if f[2] == "F" {
			lines = append(lines, partial.String())
			partial.Reset()
		}
	}
	return lines, nil
}

// benchStack is the node the benchmarks read on: a registry's hosts,
// weightsnapd, containerd with its CRI and overlayfs for ctr's pulls, and
// the tools image pulled, after a first pod paid containerd's one-time
// costs (the sandbox image's snapshot, the first shim), as on a node that
// has run pods.
type benchStack struct {
	hosts    string // containerd's and weightsnapd's hosts directory
	toolPath string // the reader program, built for the host
	tool     []byte // and its bytes
	tools    image  // the image running it
	ws       *weightsnapd
	ctd      *containerd
	rt       criapi.RuntimeServiceClient
	is       criapi.ImageServiceClient
	logs     string // the pods' log directory
}

// startBenchStack starts a benchStack under dir, with the tools image
// pushed to toolsAddr, wsConfig added to weightsnapd's config and a
// hosts.toml for each of hostsAddrs.
func startBenchStack(b *testing.B, ctx context.Context, dir, toolsAddr, wsConfig string, hostsAddrs ...string) benchStack {
	st := benchStack{hosts: filepath.Join(dir, "certs.d"), logs: filepath.Join(dir, "logs")}
	for _, addr := range hostsAddrs {
		writeHostsToml(b, st.hosts, addr)
	}
	st.toolPath = toolBinary(b)
	tool, err := os.ReadFile(st.toolPath)
	if err != nil {
		b.Fatal(err)
	}
	st.tool = tool
	toolLayer := tarLayer(b, map[string][]byte{"tool": tool}, map[string]int64{"tool": 0o755})
	st.tools = pushImage(b, toolsAddr, "tools:v1", []string{"/tool", "sleep"}, toolLayer)
	st.ws = startWeightsnapdWithConfig(b, filepath.Join(dir, "wsd"), st.hosts, wsConfig)
	st.ctd = startContainerdWithConfig(b, mkdir(b, filepath.Join(dir, "ctd")), st.ws.sock, st.hosts, st.tools.Ref,
		fmt.Sprintf(benchOverlayUnpack, "linux/"+runtime.GOARCH))
	st.rt, st.is = st.ctd.cri(b)
	if _, err := st.is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: st.tools.Ref}}); err != nil {
		b.Fatalf("CRI PullImage %s: %v", st.tools.Ref, err)
	}
	if _, id, err := runSandbox(b, ctx, st.rt, st.logs, "bench-warmup", "warmup"); err != nil {
		b.Fatal(err)
	} else {
		removePod(b, st.rt, pod{sandbox: id})
	}
	return st
}

// benchPrerequisites is what a benchmark of minutes needs before it starts:
// one run (-benchtime 1x), root, FUSE and containerd, and its knobs.
func benchPrerequisites(b *testing.B) benchConfig {
	if b.N != 1 {
		b.Fatalf("%s measures one run of minutes: use -benchtime 1x (b.N is %d)", b.Name(), b.N)
	}
	repoRoot, err := testutil.RepoRoot()
	if err != nil {
		b.Fatal(err)
	}
	cfg, err := benchConfigFromEnv(repoRoot)
	if err != nil {
		b.Fatal(err)
	}
	testutil.RequireFUSE(b)
	testutil.RequireBinary(b, "containerd")
	return cfg
}
