package integration

// weightsnapd as the DaemonSet runs it: its health probe against a real
// daemon, and its image (make image) running in containerd.

import (
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

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
// naming the FUSE manager once it is killed, though its socket file stays.
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

	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !waitExit(pid, 10*time.Second) {
		t.Fatalf("the FUSE manager (pid %d) survived SIGKILL", pid)
	}
	out, err = w.health(t)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("health after the manager was killed: %v, want exit status 1\n%s", err, out)
	}
	if !strings.Contains(out, "fuse manager at "+filepath.Join(w.root, "fusemanager.sock")+" does not answer") {
		t.Errorf("health after the manager was killed says %q, want it to name the fuse manager", out)
	}
	t.Logf("health after kill -9 of the manager: %s", out)
}
