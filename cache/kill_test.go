package cache

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
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
	// Armed, it holds up every flush with a complete record due until
	// the kill: the process dies between a verification and its flush.
	var armed atomic.Bool
	testHookSynced = func(b *blob) {
		b.mu.Lock()
		due := b.completeDue
		b.mu.Unlock()
		if due && armed.Load() {
			select {}
		}
	}
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
	case "fetch", "flush":
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
		if mode == "flush" {
			if err := s.Flush(); err != nil {
				panic(err)
			}
		}
	case "verify":
		if err := b.Verify(ctx); err != nil {
			panic(err)
		}
		// Dropped and fetched again since the complete record: the
		// chunk's new record follows the drop, and the blob is whole
		// again, verified perhaps, but not recorded complete when the
		// child dies.
		armed.Store(true)
		b.Invalidate(3*testChunk, 1)
		if err := b.Fetch(ctx, 3*testChunk, 1); err != nil {
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

// TestKillThenMachineCrash: the records of a killed process reached the
// disk, the data of some chunks they claim did not (a machine crash
// before writeback). Those chunks are checked, dropped and fetched again;
// wrong bytes are never served, and a blob is not reported complete on
// the strength of records that followed its complete record.
func TestKillThenMachineCrash(t *testing.T) {
	if inKillChild() {
		return
	}
	data, key := killContent()
	cases := []struct {
		name, mode string
		// lose makes the data of chunk c as a crash could leave it.
		lose func(t *testing.T, path string, c int64)
		lost []int64 // the chunks lost
	}{
		{"zeroed", "fetch", func(t *testing.T, path string, c int64) {
			zeroRange(t, path, c*testChunk, testChunk)
		}, []int64{1, 10}},
		{"hole", "fetch", func(t *testing.T, path string, c int64) {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			punchFile(f, c*testChunk, testChunk)
		}, []int64{2, 16}},
		{"refetched after complete", "verify", func(t *testing.T, path string, c int64) {
			// The child fetched chunk 3 again after the drop: what
			// is on disk is what the first fetch left, here spoiled
			// so that only its checksum can tell.
			flip(t, path, c*testChunk+9)
		}, []int64{3}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			runKilled(t, "TestKillThenMachineCrash", dir, tc.mode)
			dataPath, _ := blobFiles(dir, key)
			for _, c := range tc.lost {
				tc.lose(t, dataPath, c)
			}

			s := openStore(t, dir, testOptions()...)
			c := newCounter(data)
			b := openBlob(t, s, key, int64(len(data)), c.fetch)
			if b.Complete() {
				t.Fatal("Complete after the crash, though a chunk was dropped after the complete record")
			}
			chunks := killedChunks
			if tc.mode == "verify" {
				chunks = nil
				for i := range int64(17) {
					chunks = append(chunks, i)
				}
			}
			readChunks(t, b, data, chunks)
			var want []call
			for _, l := range tc.lost {
				want = append(want, call{l * testChunk, min(testChunk, int64(len(data))-l*testChunk)})
			}
			if got := c.src.Calls(); !slices.Equal(got, want) {
				t.Fatalf("fetched %v, want the lost chunks %v", got, want)
			}
			verify(t, b)
		})
	}
}

// TestFlushThenKill: what Flush persisted, a successor finds whole: the
// fetched chunks, and the complete record of a verified blob.
func TestFlushThenKill(t *testing.T) {
	if inKillChild() {
		return
	}
	dir := t.TempDir()
	runKilled(t, t.Name(), dir, "flush")

	data, key := killContent()
	s := openStore(t, dir, testOptions()...)
	c := newCounter(data)
	b := openBlob(t, s, key, int64(len(data)), c.fetch)
	readChunks(t, b, data, killedChunks)
	if calls := c.src.Calls(); len(calls) != 0 {
		t.Fatalf("after Flush and the kill, fetched again: %v", calls)
	}
}

// TestFlushLeavesNothingDue: after Flush, every blob's data is synced and
// no complete record waits, and the store keeps working.
func TestFlushLeavesNothingDue(t *testing.T) {
	dir := t.TempDir()
	data, key := content(91, 5*testChunk)
	s := openStore(t, dir, testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	if err := b.Fetch(context.Background(), 0, 2*testChunk); err != nil {
		t.Fatal(err)
	}
	// Complete in memory, record not appended: as between the end of a
	// verification and its flush.
	verify(t, b)
	b.b.mu.Lock()
	b.b.completeDue = true
	b.b.st.dataDirty.Store(true)
	b.b.mu.Unlock()
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	b.b.mu.Lock()
	due := b.b.completeDue
	b.b.mu.Unlock()
	if due || b.b.st.dataDirty.Load() {
		t.Fatalf("after Flush: complete record due %v, data dirty %v", due, b.b.st.dataDirty.Load())
	}
	_, rec := blobFiles(dir, key)
	raw, err := os.ReadFile(rec)
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := replay(raw); !ok || !r.complete {
		t.Fatal("records not complete after Flush")
	}
	readAll(t, b, data, 1000)
}

// TestCompleteRecordOnlyOverSyncedData: a chunk dropped, fetched again and
// the blob verified again, all between a flush's sync and its append of
// the complete record that was due: that flush must not append it, since
// its sync did not cover the refetched chunk. A later flush does.
func TestCompleteRecordOnlyOverSyncedData(t *testing.T) {
	dir := t.TempDir()
	data, key := content(92, 6*testChunk)
	s := openStore(t, dir, testOptions()...)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	var once sync.Once
	var appended atomic.Int32
	testHookSynced = func(bb *blob) {
		bb.mu.Lock()
		due := bb.completeDue
		bb.mu.Unlock()
		if !due {
			return
		}
		once.Do(func() {
			b.Invalidate(2*testChunk, 1)
			if err := b.Fetch(context.Background(), 2*testChunk, 1); err != nil {
				t.Error(err)
			}
			// Verified again (as a run the refetch kicked could, if
			// this flush is the flusher's): due again.
			if !bb.verifyWhole(&verifyRun{}) {
				t.Error("not verified again")
			}
		})
	}
	testHookComplete = func(bb *blob) {
		appended.Add(1)
		if bb.st.dataDirty.Load() {
			t.Error("complete record appended over data not synced")
		}
	}
	t.Cleanup(func() { testHookSynced, testHookComplete = nil, nil })
	verify(t, b)
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if appended.Load() != 1 {
		t.Fatalf("%d complete records appended, want 1", appended.Load())
	}
	_, rec := blobFiles(dir, key)
	raw, err := os.ReadFile(rec)
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := replay(raw); !ok || !r.complete {
		t.Fatal("records not complete after the second flush")
	}
}
