package integration

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// weightsnapBinary builds cmd/weightsnap into a temp dir of the test.
func weightsnapBinary(t testing.TB) string {
	t.Helper()
	root, err := testutil.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return goBuild(t, root, "./cmd/weightsnap", filepath.Join(t.TempDir(), "weightsnap"))
}

// TestCLIPackMountAndSignal drives the operator's commands as a user
// would: pack a model directory, mount it in the foreground, read it,
// SIGTERM while a process still holds a weight file open, and expect exit
// 0 with nothing left mounted.
func TestCLIPackMountAndSignal(t *testing.T) {
	dir := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	bin := weightsnapBinary(t)

	model := filepath.Join(dir, "model", "tiny")
	weights := lazyRandom(3<<20, 7)
	files := map[string][]byte{"config.json": []byte(`{"hidden_size": 8}`), "model.safetensors": weights}
	if err := os.MkdirAll(model, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(model, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ref := reg.Addr + "/models/tiny:v1"
	out, err := exec.Command(bin, "pack", "--threshold", "1MiB", model, ref).Output()
	if err != nil {
		t.Fatalf("weightsnap pack: %v", err)
	}
	if !strings.HasPrefix(string(out), ref+"@sha256:") {
		t.Fatalf("weightsnap pack printed %q, want %s@sha256:…", out, ref)
	}

	target := filepath.Join(dir, "mnt")
	metricsAddr := freeLoopbackAddr(t)
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "mount", "--cache-dir", filepath.Join(dir, "cache"), "--metrics-address", metricsAddr, ref, target)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	})
	inImage := filepath.Join(target, "models", "tiny")
	lazyWaitFor(t, "the mount to show the model", func() bool {
		_, err := os.Stat(filepath.Join(inImage, "model.safetensors"))
		return err == nil
	})
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(inImage, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s through the mount: %d bytes, err %v; want %d bytes", name, len(got), err, len(want))
		}
	}

	// The metrics endpoint reports what the reads cost.
	body, err := httpGet(t.Context(), "http://"+metricsAddr+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"weightsnap_registry_bytes_total{", "weightsnap_registry_requests_total{outcome=\"ok\"}", "weightsnap_time_to_first_read_seconds{", "weightsnap_read_latency_seconds_bucket{"} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	// A model server keeps its weights open: the stop must not wait for it.
	held, err := os.Open(filepath.Join(inImage, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-exited; err != nil {
		t.Fatalf("weightsnap mount after SIGTERM: %v\n%s", err, stderr.String())
	}
	if left := mountsUnder(t, dir); len(left) != 0 {
		t.Fatalf("mounts left after SIGTERM: %v", left)
	}
}

// TestCLIMountErrors: a missing image is one clear line and a non-zero exit.
func TestCLIMountErrors(t *testing.T) {
	dir := lazyRoot(t)
	reg := testutil.StartRegistry(t)
	bin := weightsnapBinary(t)
	cmd := exec.Command(bin, "mount", "--cache-dir", filepath.Join(dir, "cache"), reg.Addr+"/no/such:image", filepath.Join(dir, "mnt"))
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("mount of a missing image succeeded: %s", out)
	}
	msg := strings.TrimSpace(string(out))
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "not found") {
		t.Fatalf("mount of a missing image said %q; want one line saying not found", msg)
	}
	if left := mountsUnder(t, dir); len(left) != 0 {
		t.Fatalf("mounts left: %v", left)
	}
}

// freeLoopbackAddr returns a loopback address with a port free right now.
func freeLoopbackAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
