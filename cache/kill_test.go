package cache

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

// The tests here run the first store in a child process (this test binary
// again) and SIGKILL it once it has done its work: nothing of Close, nor
// of a flush the flusher has not run yet, happens. The page cache, like
// after a real kill, keeps whatever the child wrote.

const (
	killDirEnv  = "WEIGHTSNAP_CACHE_KILL_DIR"
	killModeEnv = "WEIGHTSNAP_CACHE_KILL_MODE"
)

// killContent is the blob every child and parent of these tests share.
func killContent() ([]byte, digest.Digest) { return content(90, 16*testChunk+123) }

// killedChunks are the chunks the "fetch" child fetches, one FetchFunc
// call each, plus a run of them in one call.
var killedChunks = []int64{0, 1, 2, 5, 9, 10, 11, 12, 16}

// killChild runs in the child: it does what mode says, prints "ready" and
// waits for the kill, its store open and never closed.
func killChild(dir, mode string) {
	data, key := killContent()
	s, err := Open(dir, testOptions()...)
	if err != nil {
		panic(err)
	}
	b, err := s.Blob(key, int64(len(data)), newSource(data).fetch)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	switch mode {
	case "fetch":
		for _, c := range killedChunks[:4] {
			if err := b.Fetch(ctx, c*testChunk, 1); err != nil {
				panic(err)
			}
		}
		// 9..12 in one call (WithMaxFetch is 4 chunks), then the last,
		// short chunk.
		if err := b.Fetch(ctx, 9*testChunk, 4*testChunk); err != nil {
			panic(err)
		}
		if err := b.Fetch(ctx, 16*testChunk, 1); err != nil {
			panic(err)
		}
	default:
		panic("unknown mode " + mode)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin) // until the kill
}

// runKilled runs the child of test name in mode over dir and SIGKILLs it
// once it is ready.
func runKilled(t *testing.T, name, dir, mode string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+name+"$")
	cmd.Env = append(os.Environ(), killDirEnv+"="+dir, killModeEnv+"="+mode)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	sc := bufio.NewScanner(out)
	for sc.Scan() && sc.Text() != "ready" {
	}
	if sc.Text() != "ready" {
		cmd.Wait()
		t.Fatalf("child ended before it was ready: %v\n%s", sc.Err(), stderr.String())
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
}

// inKillChild runs the child's part if this process is one, and reports
// whether it was.
func inKillChild() bool {
	dir := os.Getenv(killDirEnv)
	if dir == "" {
		return false
	}
	killChild(dir, os.Getenv(killModeEnv))
	return true
}

// counter is a FetchFunc over data that counts its calls.
type counter struct{ src *source }

func newCounter(data []byte) *counter { return &counter{newSource(data)} }

func (c *counter) fetch(ctx context.Context, p []byte, off int64) error {
	return c.src.fetch(ctx, p, off)
}

// readChunks reads each of chunks through b and compares them to data.
func readChunks(t *testing.T, b *Blob, data []byte, chunks []int64) {
	t.Helper()
	for _, c := range chunks {
		off := c * testChunk
		n := min(testChunk, int64(len(data))-off)
		got, err := readRange(b, off, n)
		if err != nil {
			t.Fatalf("read chunk %d: %v", c, err)
		}
		if !bytes.Equal(got, data[off:off+n]) {
			t.Fatalf("chunk %d: wrong bytes", c)
		}
	}
}

// TestKillKeepsFetchedChunks: a process killed right after its fetches
// completed leaves their records behind, so that its successor fetches
// none of those chunks again.
func TestKillKeepsFetchedChunks(t *testing.T) {
	if inKillChild() {
		return
	}
	dir := t.TempDir()
	runKilled(t, t.Name(), dir, "fetch")

	data, key := killContent()
	s := openStore(t, dir, testOptions()...)
	c := newCounter(data)
	b := openBlob(t, s, key, int64(len(data)), c.fetch)
	readChunks(t, b, data, killedChunks)
	if calls := c.src.Calls(); len(calls) != 0 {
		t.Fatalf("after the kill, fetched again: %v", calls)
	}
	if want := int64(len(killedChunks)-1)*testChunk + 123; b.CachedBytes() != want {
		t.Fatalf("CachedBytes = %d, want %d", b.CachedBytes(), want)
	}
}
