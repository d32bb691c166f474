package fs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/internal/testutil"
	"github.com/weightsnap/weightsnap/layer"
)

// resumeChildEnv, when set to a mountpoint, makes the test binary the
// first server of TestResumeAfterServerKilled: it serves resumeLayer there,
// sends its connection on descriptor 3, and, once a read of "slow" or
// "mapped" reaches it, says so and never answers.
const (
	resumeChildEnv = "WEIGHTSNAP_FS_TEST_RESUME_CHILD"
	resumeDirEnv   = "WEIGHTSNAP_FS_TEST_RESUME_DIR"
)

// resumeLayer is the layer both servers serve.
func resumeLayer() *fakeLayer {
	l := newFakeLayer()
	l.dir("d")
	l.file("d/slow", randBytes(1, 3<<20)) // read(2) when the server dies
	l.file("mapped", randBytes(2, 2<<20)) // read through mmap then
	l.file("pass", randBytes(3, 1<<20))   // open, passed through, across the takeover
	l.file("cached", randBytes(4, 1<<20)) // open, served by the daemon, across it
	return l
}

// passFiles returns a WithPassthrough function finding the named files'
// content in dir.
func passFiles(dir string, names ...string) func(e *layer.Entry) (*os.File, bool) {
	return func(e *layer.Entry) (*os.File, bool) {
		for _, n := range names {
			if e.Name == n {
				f, err := os.Open(filepath.Join(dir, n))
				return f, err == nil
			}
		}
		return nil, false
	}
}

func runResumeChild(mp string) {
	dir := os.Getenv(resumeDirEnv)
	l := resumeLayer()
	l.beforeRead = func(e *layer.Entry) {
		if e.Name == "d/slow" || e.Name == "mapped" {
			fmt.Println("reading", e.Name)
			select {} // the server dies with this request unanswered
		}
	}
	m, err := Serve(context.Background(), &layer.Opened{Layer: l}, mp, WithName("test:resume"),
		WithPassthrough(passFiles(dir, "pass")), WithOpenTable(filepath.Join(dir, "opens")))
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	c, err := m.Conn()
	if err == nil {
		err = unix.Sendmsg(3, c.Init, unix.UnixRights(int(c.File.Fd())), nil, 0)
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	select {}
}

// TestResumeAfterServerKilled kills the process serving a mount (SIGKILL)
// while a read(2) and an mmap page fault wait on it, and while two files
// are open, one passed through and one served by the daemon. A new server
// resumes the connection: the waiting reads complete with the right
// bytes, and the open files can be opened again (in the kind they are open
// in: the other would be refused by the kernel with EIO).
func TestResumeAfterServerKilled(t *testing.T) {
	testutil.RequireFUSE(t)
	mp, dir := t.TempDir(), t.TempDir()
	want := resumeLayer()
	for _, n := range []string{"pass", "cached"} {
		if err := os.WriteFile(filepath.Join(dir, n), want.content[want.entries[n].Ino], 0o644); err != nil {
			t.Fatal(err)
		}
	}

	child, lines, conn := startResumeChild(t, mp, dir)
	pass := openAndCheck(t, mp, "pass", want)
	cached := openAndCheck(t, mp, "cached", want)

	slow := make(chan []byte, 1)
	go func() {
		b, err := os.ReadFile(filepath.Join(mp, "d/slow"))
		if err != nil {
			t.Errorf("read d/slow: %v", err)
		}
		slow <- b
	}()
	mapped := make(chan []byte, 1)
	go func() {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), mmapEnv+"="+filepath.Join(mp, "mapped"))
		cmd.Stderr = os.Stderr
		b, err := cmd.Output()
		if err != nil {
			t.Errorf("mmap read of mapped: %v", err)
		}
		mapped <- b
	}()
	waitLines(t, lines, "reading d/slow", "reading mapped")
	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = child.Wait()

	l := resumeLayer()
	m, err := Resume(t.Context(), &layer.Opened{Layer: l}, mp, conn, WithName("test:resume"),
		WithPassthrough(passFiles(dir, "pass", "cached")), WithOpenTable(filepath.Join(dir, "opens")))
	if m != nil {
		t.Cleanup(func() {
			if err := m.Unmount(); err != nil {
				t.Errorf("Unmount: %v", err)
			}
		})
	}
	if errors.Is(err, ErrNoResend) {
		testutil.SkipOrFail(t, "the kernel cannot resend requests in flight (Linux < 6.9)")
	}
	if err != nil {
		t.Fatalf("Resume: %v", err)
	}

	for name, ch := range map[string]chan []byte{"d/slow": slow, "mapped": mapped} {
		if got := <-ch; !bytes.Equal(got, want.content[want.entries[name].Ino]) {
			t.Errorf("%s: read %d bytes, not the content", name, len(got))
		}
	}
	if !l.readOf("d/slow") {
		t.Error("the new server served no read of d/slow")
	}
	for _, name := range []string{"pass", "cached", "d/slow"} {
		openAndCheck(t, mp, name, want).Close()
	}
	pass.Close()
	cached.Close()
	// With every handle closed, "cached" may now be passed through.
	openAndCheck(t, mp, "cached", want).Close()
}

// startResumeChild starts the first server of mp and receives its
// connection. The child is killed and the mount removed at the end of the
// test, whatever happened.
func startResumeChild(t *testing.T, mp, dir string) (*exec.Cmd, <-chan string, Conn) {
	t.Helper()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(sp[0]), "sock"), os.NewFile(uintptr(sp[1]), "sock")
	defer mine.Close()
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), resumeChildEnv+"="+mp, resumeDirEnv+"="+dir)
	child.ExtraFiles = []*os.File{theirs}
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	t.Cleanup(func() {
		_ = child.Process.Kill()
		_ = child.Wait()
		if err := CleanupMount(mp); err != nil {
			t.Errorf("cleanup %s: %v", mp, err)
		}
	})
	lines := make(chan string, 8)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()

	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := unix.Recvmsg(sp[0], buf, oob, 0)
	if err != nil {
		t.Fatalf("receiving the connection: %v", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("receiving the connection: %d messages, %v", len(msgs), err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		t.Fatalf("receiving the connection: %v", err)
	}
	waitLines(t, lines, "ready")
	return child, lines, Conn{File: os.NewFile(uintptr(fds[0]), "/dev/fuse"), Init: buf[:n]}
}

// waitLines reads lines until it has seen each of want, in any order.
func waitLines(t *testing.T, lines <-chan string, want ...string) {
	t.Helper()
	left := map[string]bool{}
	for _, w := range want {
		left[w] = true
	}
	for len(left) > 0 {
		l, ok := <-lines
		if !ok {
			t.Fatalf("the child ended before saying %v", left)
		}
		if strings.HasPrefix(l, "error:") {
			t.Fatalf("child: %s", l)
		}
		delete(left, l)
	}
}

// openAndCheck opens name under mp, reads it whole and compares it with
// want's content; the file is returned open at its end, and closed when
// the test ends if it is not before.
func openAndCheck(t *testing.T, mp, name string, want *fakeLayer) *os.File {
	t.Helper()
	f, err := os.Open(filepath.Join(mp, name))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	// A file of the mount left open when the test binary exits would
	// deadlock it: its close waits for a server that exited with it.
	t.Cleanup(func() { f.Close() })
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	if !bytes.Equal(b, want.content[want.entries[name].Ino]) {
		t.Errorf("%s: %d bytes, not the content", name, len(b))
	}
	return f
}

// readOf reports whether ReadAt read the named file.
func (f *fakeLayer) readOf(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.reads {
		if r.name == name {
			return true
		}
	}
	return false
}

// TestServeIgnoresStaleOpenTable: a new mount at a place where a former
// one left its open table (a reboot, a holder that died) starts a table
// of its own. The stale one says file a is passed through with backing
// ID 1, which on the new connection is the ID of the first file
// registered, here b: trusting it would serve a's reads from b's file.
func TestServeIgnoresStaleOpenTable(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	l := newFakeLayer()
	a := l.file("a", randBytes(5, 1<<20))
	b := l.file("b", randBytes(6, 1<<20))
	for _, e := range []*layer.Entry{a, b} {
		if err := os.WriteFile(filepath.Join(dir, e.Name), l.content[e.Ino], 0o644); err != nil {
			t.Fatal(err)
		}
	}
	table := filepath.Join(dir, "opens")
	stale := fmt.Sprintf(`{"files":{"%d":{"p":1,"b":1}}}`, a.Ino)
	if err := os.WriteFile(table, []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	m := mountFake(t, l, WithPassthrough(passFiles(dir, "a", "b")), WithOpenTable(table))
	openAndCheck(t, m.Mountpoint(), "b", l)
	openAndCheck(t, m.Mountpoint(), "a", l)
}
