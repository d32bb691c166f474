package integration

// Processes the tests start (registries, containerd, weightsnapd) and the mounts they leave: started, stopped and reported in one way.

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// stopGrace is how long a stopped process gets after SIGTERM before SIGKILL.
const stopGrace = 20 * time.Second

// readyTimeout bounds waiting for a daemon's socket.
const readyTimeout = 60 * time.Second

// shortTempDir returns a temporary directory with a short path (unix
// socket paths are limited to 108 bytes, and t.TempDir's are long),
// removed in t.Cleanup after every mount under it is gone.
func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unmountUnder(t, dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing %s: %v", dir, err)
		}
	})
	return dir
}

// mountsUnder returns the mount points at or under dir, deepest first.
func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var mps []string
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	slices.SortFunc(mps, func(a, b string) int { return len(b) - len(a) })
	return mps
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder detaches every mount under dir (what a crashed daemon or
// an aborted test left behind).
func unmountUnder(t testing.TB, dir string) {
	t.Helper()
	for _, mp := range mountsUnder(t, dir) {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			t.Errorf("unmounting %s: %v", mp, err)
		}
	}
}

// process is a daemon started by a test.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string // file holding its stdout and stderr
	done chan struct{}
	err  error // valid after done
}

// startProcess starts bin with args, its output in logFile. It is stopped
// in t.Cleanup (SIGTERM, then SIGKILL), and the tail of its log is printed
// if the test failed.
func startProcess(t testing.TB, name, logFile string, env []string, bin string, args ...string) *process {
	t.Helper()
	p := spawn(t, name, logFile, env, bin, args...)
	t.Cleanup(func() { p.stopAndReport(t) })
	return p
}

// stopAndReport stops p and prints the tail of its log if the test failed.
func (p *process) stopAndReport(t testing.TB) {
	t.Helper()
	p.stop(t)
	if t.Failed() {
		t.Logf("--- tail of %s log (%s):\n%s", p.name, p.log, tailFile(p.log, 60))
	}
}

// spawn starts bin like startProcess, leaving stopping it to the caller.
func spawn(t testing.TB, name, logFile string, env []string, bin string, args ...string) *process {
	t.Helper()
	lf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	// Own process group: a ^C of the test does not reach it first, and
	// Pdeathsig stops it if the test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p
}

// stop sends SIGTERM and waits, then SIGKILL. Stopping twice is harmless.
func (p *process) stop(t testing.TB) {
	t.Helper()
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		t.Errorf("%s did not stop within %v of SIGTERM; killing it", p.name, stopGrace)
		p.kill(t)
	}
}

// kill sends SIGKILL and waits for the process to be reaped.
func (p *process) kill(t testing.TB) {
	t.Helper()
	_ = p.cmd.Process.Kill()
	<-p.done
}

// exitedCleanly reports whether the process has exited with status 0.
func (p *process) exitedCleanly() bool {
	select {
	case <-p.done:
		return p.err == nil
	default:
		return false
	}
}

func tailFile(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// waitSocket waits until a unix socket accepts connections, or the
// process exits.
func waitSocket(t testing.TB, p *process, path string) {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited before serving %s: %v\n%s", p.name, path, p.err, tailFile(p.log, 40))
		case <-time.After(50 * time.Millisecond): // polling a socket; no event to wait on
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not serve %s within %v\n%s", p.name, path, readyTimeout, tailFile(p.log, 40))
		}
	}
}

// waitExit waits until process pid (not necessarily a child) has exited,
// and reports whether it did within timeout.
func waitExit(pid int, timeout time.Duration) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return errors.Is(err, unix.ESRCH) // already gone
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, int(timeout.Milliseconds()))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil && n > 0
	}
}
