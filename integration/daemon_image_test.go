package integration

// weightsnapd as the DaemonSet runs it: its health probe against a real
// daemon, and its image (make image) running in containerd.

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weightsnap/weightsnap/internal/imagebuild"
	"github.com/weightsnap/weightsnap/internal/testutil"
)

// health runs `weightsnapd health` for w and returns its output and exit
// error.
func (w *weightsnapd) health(t testing.TB) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), w.bin, "health", "--config", w.config, "--root", w.root, "--address", w.sock, "--timeout", "5s")
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// TestHealthProbe: the probe passes while both processes serve, and fails
// naming the FUSE manager while it does not answer (stopped with SIGSTOP:
// hung), though its socket file stays. A manager killed with SIGKILL is
// replaced by weightsnapd, and the probe passes again, naming the new one.
func TestHealthProbe(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := shortTempDir(t, "wsh")
	w := startWeightsnapd(t, filepath.Join(dir, "wsd"), mkdir(t, filepath.Join(dir, "hosts")))

	out, err := w.health(t)
	if err != nil || !strings.HasPrefix(out, "ok: ") {
		t.Fatalf("health of a running weightsnapd: %v\n%s", err, out)
	}
	pid := w.managerPID()
	if pid <= 0 || !strings.Contains(out, "(pid "+strconv.Itoa(pid)+")") {
		t.Errorf("health output %q does not name the manager's pid %d", out, pid)
	}

	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	out, err = w.health(t)
	_ = syscall.Kill(pid, syscall.SIGCONT)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("health while the manager is stopped: %v, want exit status 1\n%s", err, out)
	}
	if !strings.Contains(out, "fuse manager at "+filepath.Join(w.root, "fusemanager.sock")) {
		t.Errorf("health while the manager is stopped says %q, want it to name the fuse manager", out)
	}
	t.Logf("health while the manager is stopped: %s", out)

	w.killManager(t)
	out, err = w.health(t)
	if np := w.managerPID(); err != nil || !strings.Contains(out, "(pid "+strconv.Itoa(np)+")") {
		t.Fatalf("health after the manager was killed and replaced (pid %d): %v\n%s", np, err, out)
	}
}

// staticWeightsnapd builds weightsnapd as make image does: static, for
// linux, with -trimpath.
func staticWeightsnapd(t testing.TB) []byte {
	t.Helper()
	root, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "weightsnapd")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/weightsnapd")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOWORK=off", "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build weightsnapd: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDaemonImageRunsInContainerd: the image make image builds runs in
// containerd as the DaemonSet runs it (privileged, the node's
// /var/lib/weightsnap and /run/weightsnap bind-mounted, the entrypoint with
// its default paths), and `weightsnapd health` passes inside the container
// (the exec probe) and from the node through the host paths.
func TestDaemonImageRunsInContainerd(t *testing.T) {
	s := newStack(t, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	img, err := imagebuild.Build(imagebuild.Spec{Binary: staticWeightsnapd(t), Arch: runtime.GOARCH})
	if err != nil {
		t.Fatal(err)
	}
	ref, err := imagebuild.Push(ctx, s.origin.Addr+"/weightsnapd:test", img, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ctd.ctr(t, ctx, "images", "pull", "--local", "--snapshotter", "overlayfs", "--plain-http", "--hosts-dir", s.hosts, ref.String()); err != nil {
		t.Fatal(err)
	}

	nodeRoot := mkdir(t, filepath.Join(s.dir, "node", "var-lib-weightsnap"))
	nodeRun := mkdir(t, filepath.Join(s.dir, "node", "run-weightsnap"))
	const id = "weightsnapd-image"
	t.Cleanup(func() {
		// SIGTERM, as kubelet stops it, then the task and container go,
		// and with them the FUSE manager and the holder (no mounts here).
		cctx, ccancel := context.WithTimeout(context.Background(), time.Minute)
		defer ccancel()
		_, _ = s.ctd.ctr(t, cctx, "tasks", "kill", "--signal", "SIGTERM", id)
		for deadline := time.Now().Add(stopGrace); time.Now().Before(deadline); {
			out, _ := s.ctd.ctr(t, cctx, "tasks", "ls")
			if !strings.Contains(out, id) || strings.Contains(out, "STOPPED") {
				break
			}
			time.Sleep(100 * time.Millisecond) // polling ctr; no event to wait on
		}
		if _, err := s.ctd.ctr(t, cctx, "tasks", "rm", "--force", id); err != nil && !strings.Contains(err.Error(), "not found") {
			t.Errorf("removing the task: %v", err)
		}
		if _, err := s.ctd.ctr(t, cctx, "containers", "rm", id); err != nil {
			t.Errorf("removing the container: %v", err)
		}
	})
	if _, err := s.ctd.ctr(t, ctx, "run", "-d", "--privileged", "--snapshotter", "overlayfs",
		"--mount", "type=bind,src="+nodeRoot+",dst=/var/lib/weightsnap,options=rbind:rw",
		"--mount", "type=bind,src="+nodeRun+",dst=/run/weightsnap,options=rbind:rw",
		ref.String(), id); err != nil {
		t.Fatal(err)
	}

	// The probe as the DaemonSet runs it, in the container, until the
	// daemon has started (the startup probe's job).
	var out string
	for deadline := time.Now().Add(readyTimeout); ; {
		out, err = s.ctd.ctr(t, ctx, "tasks", "exec", "--exec-id", "probe-"+strconv.FormatInt(time.Now().UnixNano(), 36), id,
			imagebuild.BinaryPath, "health", "--timeout", "4s")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			logs, _ := s.ctd.ctr(t, ctx, "tasks", "ls")
			t.Fatalf("health in the container never passed: %v\n%s\ntasks:\n%s", err, out, logs)
		}
		time.Sleep(200 * time.Millisecond) // the daemon is starting; no event to wait on
	}
	if !strings.HasPrefix(out, "ok: snapshots API at /run/weightsnap/weightsnap.sock, fuse manager") {
		t.Errorf("health in the container says %q", out)
	}
	t.Logf("health in the container: %s", strings.TrimSpace(out))

	// From the node, through the host paths: containerd's side of them.
	hcmd := exec.CommandContext(ctx, weightsnapdBinary(t), "health", "--root", nodeRoot, "--address", filepath.Join(nodeRun, "weightsnap.sock"))
	if b, err := hcmd.CombinedOutput(); err != nil {
		t.Errorf("health from the node: %v\n%s", err, b)
	}
}
