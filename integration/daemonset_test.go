package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

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
		if _, err := s.ctd.ctr(t, ctx, "images", "pull", "--local", "--snapshotter", "overlayfs", "--plain-http", "--hosts-dir", s.hosts, ref.String()); err != nil {
			t.Fatal(err)
		}
		refs = append(refs, ref.String())
	}

	node := mkdir(t, filepath.Join(s.dir, "node"))
	nodeRoot := sharedDir(t, filepath.Join(node, "var-lib-weightsnap"))
	nodeRun := mkdir(t, filepath.Join(node, "run-weightsnap"))
	conf := mkdir(t, filepath.Join(node, "etc-weightsnap"))
	if err := os.WriteFile(filepath.Join(conf, "weightsnapd.toml"), []byte(fmt.Sprintf(daemonsetConfig, nodeRoot, filepath.Join(nodeRun, "weightsnap.sock"), restartSpan)), 0o644); err != nil {
		t.Fatal(err)
	}
	ds := &daemonSet{s: s, root: nodeRoot, run: nodeRun, conf: conf}
	t.Cleanup(func() { ds.stop(t) })
	// Runs before the container stops: the manager unmounts every layer,
	// the holder exits.
	t.Cleanup(func() { ds.shutdown(t) })
	ds.start(t, ctx, refs[0], "weightsnapd-v1")

	// The node's containerd, with the DaemonSet's weightsnapd as its
	// snapshotter.
	b := startContainerd(t, mkdir(t, filepath.Join(s.dir, "ctd-b")), filepath.Join(nodeRun, "weightsnap.sock"), s.hosts, s.tools.Ref)
	rt, is := b.cri(t)
	pullImage(t, ctx, is, s.tools.Ref)
	m := s.pushModel(t, s.origin.Addr, "dsmodel:v1", 24<<20, 900)
	pullImage(t, ctx, is, m.Ref)
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
	waitUntil(t, ctx, "the pod's read reaching the middle of the weights", func() bool { return s.origin.BlobBytes(m.weight) >= from })

	holderPID := pidFile(filepath.Join(nodeRoot, "holder.pid"))
	if holderPID <= 0 {
		t.Fatal("no holder pid file")
	}
	ds.replace(t, ctx, refs[1], "weightsnapd-v2")
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
}

// daemonSet is weightsnapd's container on containerd A, as the DaemonSet
// runs it.
type daemonSet struct {
	s               *stack
	root, run, conf string
	id              string // the running container
}

// start runs the image ref as container id and waits until its health
// check passes.
func (d *daemonSet) start(t *testing.T, ctx context.Context, ref, id string) {
	t.Helper()
	d.id = id
	if _, err := d.s.ctd.ctr(t, ctx, "run", "-d", "--privileged", "--snapshotter", "overlayfs",
		"--with-ns", fmt.Sprintf("pid:/proc/%d/ns/pid", os.Getpid()), // the host PID namespace (hostPID)
		"--mount", "type=bind,src="+d.root+",dst="+d.root+",options=rbind:rw:rshared",
		"--mount", "type=bind,src="+d.run+",dst="+d.run+",options=rbind:rw",
		"--mount", "type=bind,src="+d.conf+",dst=/etc/weightsnap,options=rbind:ro",
		"--mount", "type=bind,src="+d.s.hosts+",dst=/etc/containerd/certs.d,options=rbind:ro",
		ref, id, imagebuild.BinaryPath, "--config", "/etc/weightsnap/weightsnapd.toml"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(readyTimeout); ; {
		out, err := d.s.ctd.ctr(t, ctx, "tasks", "exec", "--exec-id", "probe-"+strconv.FormatInt(time.Now().UnixNano(), 36), id,
			imagebuild.BinaryPath, "health", "--config", "/etc/weightsnap/weightsnapd.toml", "--timeout", "4s")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("health of %s never passed: %v\n%s", id, err, out)
		}
		time.Sleep(200 * time.Millisecond) // the daemon is starting; no event to wait on
	}
}

// replace stops and removes the running container, as kubelet does in a
// rolling update (SIGTERM, then the task and container go), and starts
// ref as id on the same paths.
func (d *daemonSet) replace(t *testing.T, ctx context.Context, ref, id string) {
	t.Helper()
	d.remove(t, ctx)
	d.start(t, ctx, ref, id)
}

// remove stops the running container: SIGTERM, then SIGKILL of whatever
// is left in its cgroup when the task is removed.
func (d *daemonSet) remove(t testing.TB, ctx context.Context) {
	t.Helper()
	if d.id == "" {
		return
	}
	_, _ = d.s.ctd.ctr(t, ctx, "tasks", "kill", "--signal", "SIGTERM", d.id)
	for deadline := time.Now().Add(stopGrace); time.Now().Before(deadline); {
		out, _ := d.s.ctd.ctr(t, ctx, "tasks", "ls")
		if !strings.Contains(out, d.id) || strings.Contains(out, "STOPPED") {
			break
		}
		time.Sleep(100 * time.Millisecond) // polling ctr; no event to wait on
	}
	if _, err := d.s.ctd.ctr(t, ctx, "tasks", "rm", "--force", d.id); err != nil && !strings.Contains(err.Error(), "not found") {
		t.Errorf("removing the task %s: %v", d.id, err)
	}
	if _, err := d.s.ctd.ctr(t, ctx, "containers", "rm", d.id); err != nil {
		t.Errorf("removing the container %s: %v", d.id, err)
	}
	d.id = ""
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
