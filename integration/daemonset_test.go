package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/holder"
	"github.com/weightsnap/weightsnap/internal/imagebuild"
)

// daemonsetConfig is weightsnapd.toml as the test's DaemonSet container
// reads it: the node's paths (the same inside the container as on the
// node, as /var/lib/weightsnap and /run/weightsnap are in the DaemonSet,
// because containerd mounts what weightsnapd names), the holder leaving
// the container's cgroup, and, so that the pod's bytes stay in the
// registry until it reads them, no background fill and small spans.
const daemonsetConfig = `root = %q
address = %q
metrics_address = ""
log_level = "debug"
[registry]
config_path = "/etc/containerd/certs.d"
[fetch]
background_fill = false
span_bytes = %d
[holder]
leave_cgroup = true
`

// TestDaemonSetReplacedWhileReading runs weightsnapd's image (make image)
// as the DaemonSet runs it: a privileged container in the host's PID
// namespace, the node's /var/lib/weightsnap (mount propagation both ways)
// and /run/weightsnap bind-mounted. A second containerd (the node's) uses
// it as its snapshotter and runs a pod whose image volume it serves
// lazily. While the pod is held mid-file (the registry holds a range back),
// the container is stopped and removed and a new version of the image
// started on the same paths, as a rolling update does: the holder, outside
// the container's cgroup, keeps the mounts; the new container's manager
// resumes them; the pod's read finishes with the right sha256.
func TestDaemonSetReplacedWhileReading(t *testing.T) {
	s := newStack(t, nil) // containerd A runs the DaemonSet's container
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		t.Skip("cgroup v2: the holder cannot leave a container's cgroup namespace (deploy/README.md)")
	}

	bin := staticWeightsnapd(t)
	nodeRT, nodeIS := s.ctd.cri(t)
	var refs []string
	for _, version := range []string{"v1", "v2"} {
		img, err := imagebuild.Build(imagebuild.Spec{Binary: bin, Arch: runtime.GOARCH, Labels: map[string]string{"org.opencontainers.image.version": version}})
		if err != nil {
			t.Fatal(err)
		}
		ref, err := imagebuild.Push(ctx, s.origin.Addr+"/weightsnapd:"+version, img, false)
		if err != nil {
			t.Fatal(err)
		}
		pullImage(t, ctx, nodeIS, ref.String())
		refs = append(refs, ref.String())
	}
	pullImage(t, ctx, nodeIS, s.tools.Ref) // the pod sandbox's image

	node := mkdir(t, filepath.Join(s.dir, "node"))
	nodeRoot := sharedDir(t, filepath.Join(node, "var-lib-weightsnap"))
	nodeRun := mkdir(t, filepath.Join(node, "run-weightsnap"))
	conf := mkdir(t, filepath.Join(node, "etc-weightsnap"))
	if err := os.WriteFile(filepath.Join(conf, "weightsnapd.toml"), []byte(fmt.Sprintf(daemonsetConfig, nodeRoot, filepath.Join(nodeRun, "weightsnap.sock"), restartSpan)), 0o644); err != nil {
		t.Fatal(err)
	}
	ds := &daemonSet{rt: nodeRT, root: nodeRoot, run: nodeRun, conf: conf, hosts: s.hosts, logs: mkdir(t, filepath.Join(node, "logs"))}
	t.Cleanup(func() { ds.stop(t) })
	// Runs before the container stops: the manager unmounts every layer,
	// the holder exits.
	t.Cleanup(func() { ds.shutdown(t) })
	ds.start(t, ctx, refs[0], "v1")

	// The node's containerd, with the DaemonSet's weightsnapd as its
	// snapshotter.
	b := startContainerd(t, mkdir(t, filepath.Join(s.dir, "ctd-b")), filepath.Join(nodeRun, "weightsnap.sock"), s.hosts, s.tools.Ref)
	rt, is := b.cri(t)
	pullImage(t, ctx, is, s.tools.Ref)
	m := s.pushModel(t, s.origin.Addr, "dsmodel:v1", 24<<20, 900)
	pullImage(t, ctx, is, m.Ref)
	// Lazily: the weights layer is a FUSE mount on the node, not in the
	// node containerd's content store.
	if content, err := b.ctr(t, ctx, "--namespace", criNamespace, "content", "ls", "-q"); err != nil || strings.Contains(content, m.weight) {
		t.Fatalf("the weights layer %s was downloaded by containerd, not mounted lazily (%v)", m.weight, err)
	}
	if len(layerMounts(t, m.weight)) == 0 {
		t.Fatalf("no lazy mount of %s under the node's root: %v", m.weight, mountsUnder(t, nodeRoot))
	}
	p := s.runPod(t, ctx, rt, "team-ds", "infer", m.Ref)
	from := m.size / 2
	release := s.origin.Hold(m.weight, from, from+restartSpan)
	defer release()

	type result struct {
		r   *criapi.ExecSyncResponse
		err error
	}
	res := make(chan result, 1)
	go func() {
		r, err := rt.ExecSync(ctx, &criapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{"/tool", "sum", "/models-volume/" + modelPath}, Timeout: 300})
		res <- result{r, err}
	}()
	s.waitAtHold(t, ctx, "the pod", m, from)

	holderPID := pidFile(filepath.Join(nodeRoot, "holder.pid"))
	if holderPID <= 0 {
		t.Fatal("no holder pid file")
	}
	ds.replace(t, ctx, refs[1], "v2")
	if !alive(holderPID) {
		t.Fatalf("the holder (pid %d) died with the container", holderPID)
	}
	release()

	r := <-res
	if r.err != nil {
		t.Fatalf("ExecSync: %v", r.err)
	}
	if got := strings.TrimSpace(string(r.r.Stdout)); r.r.ExitCode != 0 || got != m.sum {
		t.Errorf("the pod's read across the replacement: exit %d, sha256 %q, want %s\n%s", r.r.ExitCode, got, m.sum, r.r.Stderr)
	}
	if got := sumFileInPod(t, ctx, rt, p, extraPath); got != m.extraSum {
		t.Errorf("after the replacement: sha256 of %s %s, want %s", extraPath, got, m.extraSum)
	}

	// The holder outlived the container whose stderr it was given: made to
	// log (a connection put and dropped), it lives on.
	hc, err := holder.Dial(filepath.Join(nodeRoot, "holder.sock"))
	if err != nil {
		t.Fatalf("the holder after the replacement: %v", err)
	}
	defer hc.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	if err := hc.Put("probe", nil, pw); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	if err := hc.Drop("probe"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, ctx, "the holder to log the drop", func() bool {
		return logHas(filepath.Join(nodeRoot, "holder.log"), "holder: dropped a connection", "probe")
	})
	if !alive(holderPID) {
		t.Fatalf("the holder (pid %d) died after the replacement", holderPID)
	}
}

// daemonSet is weightsnapd's pod on containerd A, through CRI as kubelet
// runs the DaemonSet's: the node's network and PID namespace, privileged,
// the node's root bind-mounted with Bidirectional propagation (so that
// its FUSE mounts reach the node), the node's run directory, the config
// and hosts.toml.
type daemonSet struct {
	rt                           criapi.RuntimeServiceClient
	root, run, conf, hosts, logs string
	sandbox, container           string // the running pod
}

// start runs the image ref as the pod of the given version and waits
// until its health check (the DaemonSet's probe) passes.
func (d *daemonSet) start(t *testing.T, ctx context.Context, ref, version string) {
	t.Helper()
	ns := &criapi.NamespaceOption{Network: criapi.NamespaceMode_NODE, Pid: criapi.NamespaceMode_NODE}
	cfg := &criapi.PodSandboxConfig{
		Metadata:     &criapi.PodSandboxMetadata{Name: "weightsnapd-" + version, Namespace: "weightsnap", Uid: "weightsnapd-" + version},
		LogDirectory: mkdir(t, filepath.Join(d.logs, version)),
		Linux: &criapi.LinuxPodSandboxConfig{SecurityContext: &criapi.LinuxSandboxSecurityContext{
			NamespaceOptions: ns, Privileged: true,
		}},
	}
	sb, err := d.rt.RunPodSandbox(ctx, &criapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		t.Fatalf("RunPodSandbox weightsnapd %s: %v", version, err)
	}
	d.sandbox = sb.PodSandboxId
	logFile := filepath.Join(cfg.LogDirectory, "weightsnapd.log")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- tail of weightsnapd %s's log:\n%s", version, tailFile(logFile, 15))
		}
	})
	cc, err := d.rt.CreateContainer(ctx, &criapi.CreateContainerRequest{
		PodSandboxId:  sb.PodSandboxId,
		SandboxConfig: cfg,
		Config: &criapi.ContainerConfig{
			Metadata: &criapi.ContainerMetadata{Name: "weightsnapd"},
			Image:    &criapi.ImageSpec{Image: ref},
			Command:  []string{imagebuild.BinaryPath, "--config", "/etc/weightsnap/weightsnapd.toml"},
			LogPath:  "weightsnapd.log",
			Linux: &criapi.LinuxContainerConfig{SecurityContext: &criapi.LinuxContainerSecurityContext{
				Privileged: true, NamespaceOptions: ns,
			}},
			Mounts: []*criapi.Mount{
				{ContainerPath: d.root, HostPath: d.root, Propagation: criapi.MountPropagation_PROPAGATION_BIDIRECTIONAL},
				{ContainerPath: d.run, HostPath: d.run},
				{ContainerPath: "/etc/weightsnap", HostPath: d.conf, Readonly: true},
				{ContainerPath: "/etc/containerd/certs.d", HostPath: d.hosts, Readonly: true},
			},
		},
	})
	if err != nil {
		t.Fatalf("CreateContainer weightsnapd %s: %v", version, err)
	}
	d.container = cc.ContainerId
	if _, err := d.rt.StartContainer(ctx, &criapi.StartContainerRequest{ContainerId: cc.ContainerId}); err != nil {
		t.Fatalf("StartContainer weightsnapd %s: %v", version, err)
	}
	for deadline := time.Now().Add(readyTimeout); ; {
		r, err := d.rt.ExecSync(ctx, &criapi.ExecSyncRequest{ContainerId: d.container,
			Cmd: []string{imagebuild.BinaryPath, "health", "--config", "/etc/weightsnap/weightsnapd.toml", "--timeout", "4s"}, Timeout: 10})
		if err == nil && r.ExitCode == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("health of weightsnapd %s never passed: %v %s", version, err, r.GetStderr())
		}
		time.Sleep(200 * time.Millisecond) // the daemon is starting; no event to wait on
	}
}

// replace stops and removes the running pod, as a rolling update does
// (its containers get SIGTERM, then whatever is left in their cgroups
// SIGKILL), and starts ref as the pod of version on the same paths.
func (d *daemonSet) replace(t *testing.T, ctx context.Context, ref, version string) {
	t.Helper()
	d.remove(t, ctx)
	d.start(t, ctx, ref, version)
}

// remove stops and removes the running pod, if any.
func (d *daemonSet) remove(t testing.TB, ctx context.Context) {
	t.Helper()
	if d.sandbox == "" {
		return
	}
	removePod(t, d.rt, pod{sandbox: d.sandbox})
	d.sandbox, d.container = "", ""
}

// shutdown ends the DaemonSet's mounts and holder from the node, as an
// operator removing weightsnap does.
func (d *daemonSet) shutdown(t testing.TB) {
	t.Helper()
	holderPID := pidFile(filepath.Join(d.root, "holder.pid"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, weightsnapdBinary(t), "shutdown", "--root", d.root).CombinedOutput(); err != nil {
		t.Errorf("weightsnapd shutdown: %v\n%s", err, out)
	}
	if holderPID > 0 && !waitExit(holderPID, stopGrace) {
		t.Errorf("the holder (pid %d) outlived weightsnapd shutdown", holderPID)
		_ = syscall.Kill(holderPID, syscall.SIGKILL)
	}
}

// stop removes the container and any mount left under the node's paths.
func (d *daemonSet) stop(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d.remove(t, ctx)
	for _, m := range mountsUnder(t, d.root) {
		if m != d.root {
			t.Errorf("mount left under the node's root: %s", m)
			_ = unix.Unmount(m, unix.MNT_FORCE|unix.MNT_DETACH)
		}
	}
}

// sharedDir makes dir a mount point of its own with shared propagation,
// as a node's /var/lib is: mounts made under it in a container that binds
// it rshared appear on the node, where containerd uses them.
func sharedDir(t *testing.T, dir string) string {
	t.Helper()
	mkdir(t, dir)
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	if err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		t.Fatalf("make %s shared: %v", dir, err)
	}
	return dir
}
