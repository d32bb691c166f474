package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/holder"

	"github.com/weightsnap/weightsnap/chunks"
)

// restartSpan and restartWorkers are the fetch span and the number of
// fetches at once of the restart test. What a killed manager was fetching
// is lost with it and fetched again: the test kills it when its only
// fetches in flight wait at a hold that covers the rest of the blob but
// its last chunk, and have sent nothing of it; only the head of a fetch that started before
// the hold (adjacent chunks fetched in one GET) is lost, at most
// inFlightSlack.
const (
	restartSpan    = 1 << 20
	restartWorkers = 2
	inFlightSlack  = 4 * restartSpan
)

// TestReadsSurviveRestartsAndUpgrades: a pod reads its model through a
// CRI image volume, cold, and is held mid-file (the registry holds back a
// range in the middle of the weights), when weightsnap's processes die or
// are upgraded: kill -9 of the FUSE manager (weightsnapd starts another),
// kill -9 of both (weightsnapd is started again), and an upgrade of both
// (SIGTERM, then a new binary: the running manager hands over). Once the
// range is let through, the pod's read(2) and mmap reads complete with the
// right sha256, with no ENOTCONN, and the registry served the layer once,
// plus at most what was in flight at the kill: everything a killed manager
// had fetched is kept.
func TestReadsSurviveRestartsAndUpgrades(t *testing.T) {
	s := newStackWithConfig(t, nil, func(dir, sock string) string {
		// Without background fill and with small spans, the bytes a
		// pod has not read stay in the registry: the held range stays
		// ahead of the reader.
		return fmt.Sprintf("[fetch]\nbackground_fill = false\nspan_bytes = %d\nworkers = %d\n", restartSpan, restartWorkers)
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	rt, is := s.ctd.cri(t)
	pullImage(t, ctx, is, s.tools.Ref)

	cases := []struct {
		name    string
		mmap    bool
		disrupt func(testing.TB)
	}{
		{"kill -9 of the FUSE manager, read(2)", false, s.ws.killManager},
		{"kill -9 of the FUSE manager, mmap", true, s.ws.killManager},
		{"kill -9 of weightsnapd and the FUSE manager, read(2)", false, s.ws.killBoth},
		{"upgrade of both, mmap", true, s.ws.upgrade},
		{"upgrade of both, read(2)", false, s.ws.upgrade},
	}
	for i, c := range cases {
		m := s.pushModel(t, s.origin.Addr, fmt.Sprintf("model%d:v1", i), 24<<20, uint64(700+i))
		pullImage(t, ctx, is, m.Ref)
		p := s.runPod(t, ctx, rt, fmt.Sprintf("team-%d", i), "infer", m.Ref)
		// On a chunk boundary, and up to the blob's last chunk: a fetch
		// the hold stops has sent nothing when a process dies, and so
		// has any read-ahead past it, so what is fetched twice is only
		// what a process lost. The last chunk is left out: the first
		// read checks the layer's tar headers, the last of which (the
		// weights' last byte, the end of the archive) are in it.
		from := (m.size / 2) &^ (chunks.DefaultChunkSize - 1)
		release := s.origin.Hold(m.weight, from, (m.size-1)&^(chunks.DefaultChunkSize-1))

		cmd := "sum"
		if c.mmap {
			cmd = "msum"
		}
		res := make(chan *criapi.ExecSyncResponse, 1)
		errc := make(chan error, 1)
		go func() {
			r, err := rt.ExecSync(ctx, &criapi.ExecSyncRequest{
				ContainerId: p.container,
				Cmd:         []string{"/tool", cmd, "/models-volume/" + modelPath},
				Timeout:     300,
			})
			res <- r
			errc <- err
		}()
		s.waitAtHold(t, ctx, c.name, m, from)
		c.disrupt(t)
		// At once: a fetch stalled on the hold for long is cut by the
		// client's minimum transfer rate and retried, sending its head
		// again.
		release()
		s.awaitSnapshotter(t, ctx)

		r, err := <-res, <-errc
		if err != nil {
			t.Fatalf("%s: ExecSync: %v", c.name, err)
		}
		if r.ExitCode != 0 || strings.TrimSpace(string(r.Stdout)) != m.sum {
			t.Errorf("%s: the pod's read: exit %d, sha256 %q, want %s\n%s", c.name, r.ExitCode, strings.TrimSpace(string(r.Stdout)), m.sum, r.Stderr)
		}
		// The layer is still served: a file the pod never read.
		if got := sumFileInPod(t, ctx, rt, p, extraPath); got != m.extraSum {
			t.Errorf("%s: after it, sha256 of %s %s, want %s", c.name, extraPath, got, m.extraSum)
		}
		// Both files read whole: every byte of the layer fetched.
		if got := s.origin.BlobBytes(m.weight); got > m.size+inFlightSlack {
			t.Errorf("%s: the registry served %d bytes of the %d-byte weights layer, want it once (plus at most %d in flight at the kill)", c.name, got, m.size, inFlightSlack)
		} else {
			t.Logf("%s: the registry served %d bytes of the %d-byte weights layer", c.name, got, m.size)
		}
		removePod(t, rt, p)
	}
	if !logHas(s.ws.log, "resumed the mounts of a former fuse manager") {
		t.Error("weightsnapd's log does not say a manager resumed mounts")
	}
}

// waitAtHold waits until the pod reading m's weights is stopped at the
// hold at from: every byte of the weights before from has been sent, and
// every fetch in flight waits at the hold. (The bytes sent in all say
// nothing of where the reader is: read-ahead may have passed a short
// hold, and the other file of the layer is never read.)
func (s *stack) waitAtHold(t *testing.T, ctx context.Context, what string, m model, from int64) {
	t.Helper()
	waitUntil(t, ctx, what+": the read reaching the hold in the weights", func() bool {
		held := s.origin.Held(m.weight)
		return s.origin.Sent(m.weight, m.weightOff, from) && held > 0 && s.origin.InFlight(m.weight) == held
	})
}

// waitUntil polls cond until it holds, failing the test at ctx's end.
func waitUntil(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-time.After(20 * time.Millisecond): // polling a condition
		}
	}
}

// TestUnheldMountIsMountedAgain: a layer whose connection never reached the
// holder (a hand-over that failed) is lost with its FUSE manager; the next
// pod of its image finds it mounted again, not unavailable, and reads the
// right bytes.
func TestUnheldMountIsMountedAgain(t *testing.T) {
	s := newStack(t, nil)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	rt, is := s.ctd.cri(t)
	pullImage(t, ctx, is, s.tools.Ref)
	m := s.pushModel(t, s.origin.Addr, "unheld:v1", 8<<20, 801)
	pullImage(t, ctx, is, m.Ref)
	a := s.runPod(t, ctx, rt, "team-a", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, a); got != m.sum {
		t.Fatalf("before: sha256 %s, want %s", got, m.sum)
	}

	hc, err := holder.Dial(filepath.Join(s.ws.root, "holder.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	held, err := hc.List()
	if err != nil {
		t.Fatal(err)
	}
	dropped := 0
	for _, h := range held {
		h.File.Close()
		if strings.Contains(string(h.Meta), m.weight) {
			if err := hc.Drop(h.Key); err != nil {
				t.Fatal(err)
			}
			dropped++
		}
	}
	if dropped != 1 {
		t.Fatalf("%d held mounts of the weights layer, want 1", dropped)
	}
	s.ws.killManager(t)
	removePod(t, rt, a) // its mount died with the manager

	b := s.runPod(t, ctx, rt, "team-b", "infer", m.Ref)
	if got := sumInPod(t, ctx, rt, b); got != m.sum {
		t.Errorf("a new pod after its layer's mount was lost: sha256 %s, want %s", got, m.sum)
	}
	if !logHas(s.ws.log, "mounting again a layer no server serves", m.weight) {
		t.Error("weightsnapd's log does not say it mounted the lost layer again")
	}
}
