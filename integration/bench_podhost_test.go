package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// BenchmarkColdPodAndHost reads models cold through one weightsnapd, in
// turn in a CRI pod (image volume, as `make bench`) and on the host
// through the layer mount right after CRI PullImage, a new model each
// time, and logs for each the reader's MB/s and the CPU seconds per GiB
// of the FUSE manager, the registry and the reader, cut at the reader's
// last byte. It is how the FUSE manager's CPU in `make bench` was found
// to include the whole blob's hash when cut at the pod's exit.
// Knobs: WEIGHTSNAP_BENCH_SIZE, WEIGHTSNAP_COLD_CASES (default
// pod,host,pod,host), WEIGHTSNAP_PERF_DIR (a `perf record -g` of the FUSE
// manager per case, from PullImage to the pod's removal or the read's end).
// Run: -run '^$' -bench BenchmarkColdPodAndHost -benchtime 1x.
func BenchmarkColdPodAndHost(b *testing.B) {
	cfg := benchPrerequisites(b)
	ctx, cancel := context.WithTimeout(b.Context(), 30*time.Minute)
	defer cancel()
	dir := shortTempDir(b, "wsg")
	reg := testutil.StartRegistry(b)
	st := startBenchStack(b, ctx, dir, reg.Addr, benchUnverifiedLazy+os.Getenv(benchEnvConfig), reg.Addr)
	data := mkdir(b, filepath.Join(dir, "data"))
	manager := st.ws.managerPID()
	if manager <= 0 {
		b.Fatal("no FUSE manager pid file")
	}
	cases := []string{"pod", "host", "pod", "host"}
	if v := os.Getenv("WEIGHTSNAP_COLD_CASES"); v != "" {
		cases = strings.Split(v, ",")
	}
	for i, how := range cases {
		name := fmt.Sprint("m", i)
		ref := reg.Addr + "/bench/model:" + name
		m, _ := pushedModel(b, ctx, filepath.Join(data, name), st.tool, cfg, uint64(i+1), name, ref)
		if err := dropCaches(); err != nil {
			b.Fatal(err)
		}
		stopPerf := perfRecord(b, manager, fmt.Sprintf("%d-%s", i, how))
		cpu := startCPUSampler(manager, reg.Pid())
		b.Cleanup(func() { cpu.halt() })
		var tr readTrace
		switch how {
		case "pod":
			c, err := coldPod(b, ctx, st.ws, st.rt, st.is, st.logs, st.tools.Ref, "gap", ref, append([]string{"read"}, m.modelFiles("/models-volume")...), "chunks")
			if err != nil {
				b.Fatal(err)
			}
			tr = c.trace
		case "host":
			var err error
			if tr, err = hostColdRead(b, ctx, st, ref, m); err != nil {
				b.Fatal(err)
			}
		default:
			b.Fatalf("case %q: want pod or host", how)
		}
		stopPerf()
		if err := cpu.halt(); err != nil {
			b.Fatal(err)
		}
		gib := float64(m.size) / (1 << 30)
		read, all := cpu.since(tr.done), cpu.since(time.Now())
		b.Logf("%d %s: read %.0f MB/s; to the last byte: manager %.2f, registry %.2f, reader %.2f CPU-s/GiB; to the end of the case: manager %.2f",
			i, how, tr.readMBps(), read[0]/gib, read[1]/gib, tr.cpu.Seconds()/gib, all[0]/gib)
	}
}

// hostColdRead pulls ref through CRI and reads m's files through the
// layer mounts weightsnapd made for it, at once.
func hostColdRead(b *testing.B, ctx context.Context, st benchStack, ref string, m benchModel) (readTrace, error) {
	before := mountsUnder(b, st.ws.root)
	if _, err := st.is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: ref}}); err != nil {
		return readTrace{}, err
	}
	var mounts []string
	for _, mp := range mountsUnder(b, st.ws.root) {
		if !slices.Contains(before, mp) {
			mounts = append(mounts, mp)
		}
	}
	files, err := filesInMounts(slices.Concat(mounts, before), m.modelFiles(""))
	if err != nil {
		return readTrace{}, err
	}
	return runTool(ctx, st.toolPath, append([]string{"read"}, files...)...)
}

// perfRecord starts `perf record -g` of pid into WEIGHTSNAP_PERF_DIR/name.data
// if that is set, and returns what stops it.
func perfRecord(b *testing.B, pid int, name string) func() {
	d := os.Getenv("WEIGHTSNAP_PERF_DIR")
	if d == "" {
		return func() {}
	}
	cmd := exec.Command("perf", "record", "-F", "499", "-g", "-p", fmt.Sprint(pid), "-o", filepath.Join(d, name+".data"))
	if err := cmd.Start(); err != nil {
		b.Fatalf("perf: %v", err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cmd.Process.Signal(syscall.SIGINT)
			cmd.Wait()
		}
	}
	b.Cleanup(stop)
	return stop
}
