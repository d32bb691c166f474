package fs

// Tests of a mount's life: unmount, busy and held mounts, stale mounts of a dead server, invalidation.

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
	"golang.org/x/sys/unix"
)

func TestUnmount(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("data"))
	parent := t.TempDir()
	mp := filepath.Join(parent, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:unmount"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	if !isMountpoint(t, mp) {
		t.Fatal("not mounted after Serve")
	}
	if err := m.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after Unmount")
	}
	<-m.Done() // nothing holds it: the server exits
	if err := m.Unmount(); err != nil {
		t.Errorf("second Unmount: %v", err)
	}
}

// TestUnmountHeldByAnotherMount unmounts a layer that another mount still
// holds, as a running container's overlay holds its lower layers: Unmount
// returns at once, the server serves the holder until it goes, and Done
// tells when.
func TestUnmountHeldByAnotherMount(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("held"))
	mp := filepath.Join(t.TempDir(), "mnt")
	holder := filepath.Join(t.TempDir(), "holder")
	for _, d := range []string{mp, holder} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:held"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	if err := unix.Mount(mp, holder, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(holder, unix.MNT_DETACH) })
	if err := m.Unmount(); err != nil { // waited forever for the holder before
		t.Fatal(err)
	}
	select {
	case <-m.Done():
		t.Fatal("server exited while another mount holds it")
	default:
	}
	if b, err := os.ReadFile(filepath.Join(holder, "f")); string(b) != "held" {
		t.Fatalf("read through the holder = %q, %v", b, err)
	}
	if err := unix.Unmount(holder, 0); err != nil {
		t.Fatal(err)
	}
	<-m.Done()
}

// TestUnmountRetriedAfterFailure makes an unmount fail (its mountpoint's
// path is gone for a moment) and checks that a later Unmount tries again
// instead of repeating the first failure.
func TestUnmountRetriedAfterFailure(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("data"))
	root := t.TempDir()
	parent, moved := filepath.Join(root, "p"), filepath.Join(root, "moved")
	mp := filepath.Join(parent, "mnt")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:retry"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Rename(moved, parent)
		m.Unmount()
	})
	if err := os.Rename(parent, moved); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); err == nil {
		t.Fatal("Unmount of a mountpoint whose path is gone succeeded")
	}
	if err := os.Rename(moved, parent); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(); err != nil {
		t.Fatalf("second Unmount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after the second Unmount")
	}
}

// TestUnmountBusy holds a file open across Unmount: the mount is detached
// at once, the open file keeps working, and Unmount returns once it is
// closed.
func TestUnmountBusy(t *testing.T) {
	testutil.RequireFUSE(t)
	l := newFakeLayer()
	l.file("f", []byte("still readable"))
	mp := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Serve(t.Context(), &layer.Opened{Layer: l}, mp, WithName("test:busy"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	f, err := os.Open(filepath.Join(mp, "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })

	// A busy mount is detached: Unmount returns, the mountpoint is free,
	// and the server keeps serving the open file until it is closed.
	if err := m.Unmount(); err != nil {
		t.Fatalf("Unmount of busy mount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Fatal("busy mount was not detached")
	}
	select {
	case <-m.Done():
		t.Fatal("server exited while a file was open")
	default:
	}
	b := make([]byte, 64)
	if n, err := f.ReadAt(b, 0); string(b[:n]) != "still readable" {
		t.Errorf("read from detached mount = %q, %v", b[:n], err)
	}
	f.Close()
	select {
	case <-m.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("server did not exit after the last file was closed")
	}
}

// startHelperDaemon runs this test binary as a separate FUSE daemon
// serving a fake layer at a fresh mountpoint, so a test can kill it.
func startHelperDaemon(t *testing.T) (string, *exec.Cmd) {
	t.Helper()
	testutil.RequireFUSE(t)
	mp := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mp)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		CleanupMount(mp)
	})
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		t.Fatalf("helper daemon: %q", line)
	}
	if b, err := os.ReadFile(filepath.Join(mp, "hello")); err != nil || string(b) != "hello" {
		t.Fatalf("read from helper mount = %q, %v", b, err)
	}
	return mp, cmd
}

// TestCleanupStaleMount kills a FUSE daemon with SIGKILL and clears the
// "transport endpoint is not connected" mount it leaves.
func TestCleanupStaleMount(t *testing.T) {
	mp, cmd := startHelperDaemon(t)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// A name never looked up must reach the dead daemon (the root's
	// attributes may be served from the kernel's cache).
	if _, err := os.Lstat(filepath.Join(mp, "never-looked-up")); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("lstat after SIGKILL: %v, want ENOTCONN", err)
	}
	if err := CleanupMount(mp); err != nil {
		t.Fatalf("CleanupMount: %v", err)
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after CleanupMount")
	}
	if err := CleanupMount(mp); err != nil {
		t.Errorf("CleanupMount of an unmounted dir: %v", err)
	}
}

// TestCleanupHungMount clears the mount of a daemon that stopped
// answering, and frees the caller waiting on it.
func TestCleanupHungMount(t *testing.T) {
	mp, cmd := startHelperDaemon(t)
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stuck := make(chan error, 1)
	go func() {
		_, err := os.Lstat(filepath.Join(mp, "never-looked-up"))
		stuck <- err
	}()
	if err := CleanupMount(mp); err != nil {
		t.Fatalf("CleanupMount: %v", err)
	}
	// Whether the lookup was already waiting or came after the abort,
	// it fails instead of hanging.
	if err := <-stuck; err == nil {
		t.Error("lookup on a hung mount succeeded")
	}
	if isMountpoint(t, mp) {
		t.Error("still mounted after CleanupMount")
	}
}

// isMountpoint reports whether p is a mount point: its device differs
// from its parent's.
func isMountpoint(t *testing.T, p string) bool {
	t.Helper()
	var st, pst unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return true // a dead FUSE mount (ENOTCONN) is still mounted
	}
	if err := unix.Stat(filepath.Dir(p), &pst); err != nil {
		t.Fatal(err)
	}
	return st.Dev != pst.Dev
}

// TestInvalidate: once a layer's content is found wrong, Invalidate drops
// what the kernel cached of it, so the next read gets the layer's error
// instead of the cached bytes.
func TestInvalidate(t *testing.T) {
	l := newFakeLayer()
	l.file("f", []byte("cached bytes"))
	m := mountFake(t, l)
	p := filepath.Join(m.Mountpoint(), "f")
	if b, err := os.ReadFile(p); err != nil || string(b) != "cached bytes" {
		t.Fatalf("first read = %q, %v", b, err)
	}
	l.failReads("f", errors.New("content did not match its digest"))
	if b, err := os.ReadFile(p); err != nil || string(b) != "cached bytes" {
		t.Fatalf("before Invalidate the kernel's cached pages serve the read: got %q, %v", b, err)
	}
	m.Invalidate()
	if b, err := os.ReadFile(p); err == nil {
		t.Fatalf("after Invalidate a read of a failed file = %q, want an error", b)
	}
}
