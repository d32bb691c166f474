package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// BenchmarkCRIPodRead looks for why the warm re-read in a CRI pod of
// `make bench` ran at a fraction of the same reader's speed in a `ctr run`
// container. It sets up the bench's stack once, reads a model cold in a
// CRI pod, waits for weightsnapd to verify its layers, and then reads it
// warm in variants that differ in one thing each, every one the median of
// warmRuns runs but the first, which cannot be repeated: the first open
// after the layers verified. A second model, read cold on the host through
// weightsnapd's layer mount instead of a pod, has its first read after
// verification on the host too. Knobs: WEIGHTSNAP_BENCH_SIZE.
// Run: -run '^$' -bench BenchmarkCRIPodRead -benchtime 1x.
func BenchmarkCRIPodRead(b *testing.B) {
	cfg := benchPrerequisites(b)
	ctx, cancel := context.WithTimeout(b.Context(), 30*time.Minute)
	defer cancel()

	dir := shortTempDir(b, "wsc")
	reg := testutil.StartRegistry(b)
	st := startBenchStack(b, ctx, dir, reg.Addr, "", reg.Addr)
	hosts, toolPath, tool, tools := st.hosts, st.toolPath, st.tool, st.tools
	ws, ctd, rt, is, logs := st.ws, st.ctd, st.rt, st.is, st.logs

	data := mkdir(b, filepath.Join(dir, "data"))
	model := func(name string, seed uint64) (benchModel, string, []string) {
		ref := reg.Addr + "/bench/model:" + name
		m, layers := pushedModel(b, ctx, filepath.Join(data, name), tool, cfg, seed, name, ref)
		return m, ref, weightDigests(layers)
	}

	// Model A: read cold in a CRI pod, as `make bench` does.
	ma, refA, weightsA := model("a", 1)
	volFiles := ma.modelFiles("/models-volume")
	if _, err := coldPod(b, ctx, ws, rt, is, logs, tools.Ref, "bench-a", refA, append([]string{"read"}, volFiles...), "chunks"); err != nil {
		b.Fatal(err)
	}
	if err := ws.waitVerified(ctx, weightsA); err != nil {
		b.Fatal(err)
	}

	type variant struct {
		key, what string
		runs      []readTrace
	}
	var vs []variant
	add := func(key, what string, runs ...readTrace) { vs = append(vs, variant{key, what, runs}) }
	pods := func(name string, files []string, edit func(*criapi.ContainerConfig), n int) []readTrace {
		var runs []readTrace
		for i := range n {
			p, err := runReaderPodEdited(b, ctx, rt, logs, tools.Ref, "bench-c", fmt.Sprintf("%s-%d", name, i), refA,
				append([]string{"read"}, files...), nil, edit)
			if err != nil {
				b.Fatal(err)
			}
			removePod(b, rt, p.pod)
			runs = append(runs, p.trace)
		}
		return runs
	}
	add("cri-first", "CRI pod, image volume, the first open since the layers verified", pods("first", volFiles, nil, 1)...)
	add("cri", "CRI pod, image volume (as make bench)", pods("vol", volFiles, nil, warmRuns)...)
	add("cri-seccomp", "CRI pod, image volume, seccomp RuntimeDefault", pods("seccomp", volFiles, func(c *criapi.ContainerConfig) {
		c.Linux = &criapi.LinuxContainerConfig{SecurityContext: &criapi.LinuxContainerSecurityContext{
			Seccomp: &criapi.SecurityProfile{ProfileType: criapi.SecurityProfile_RuntimeDefault}}}
	}, warmRuns)...)
	add("cri-rootfs", "CRI pod, the model image as root file system", pods("rootfs", ma.modelFiles("/"), func(c *criapi.ContainerConfig) {
		c.Image = &criapi.ImageSpec{Image: refA}
		c.Mounts = nil
	}, warmRuns)...)
	if _, err := ctd.ctr(b, ctx, "--namespace", benchNamespace, "images", "pull", "--snapshotter", "weightsnap",
		"--plain-http", "--hosts-dir", hosts, refA); err != nil {
		b.Fatal(err)
	}
	var ctrRuns []readTrace
	for i := range warmRuns {
		out, err := ctd.ctr(b, ctx, append([]string{"--namespace", benchNamespace, "run", "--rm", "--snapshotter", "weightsnap",
			refA, fmt.Sprintf("bench-ctr-%d", i), "/tool", "read"}, ma.modelFiles("/")...)...)
		if err != nil {
			b.Fatal(err)
		}
		tr, err := parseToolOutput(strings.Split(out, "\n"))
		if err != nil {
			b.Fatal(err)
		}
		ctrRuns = append(ctrRuns, tr)
	}
	add("ctr", "ctr run, the model image as root file system (as make bench)", ctrRuns...)
	hostFiles, err := filesInMounts(mountsUnder(b, ws.root), ma.modelFiles(""))
	if err != nil {
		b.Fatal(err)
	}
	add("host", "host, weightsnapd's layer mount", hostReads(b, ctx, toolPath, hostFiles, warmRuns)...)

	// Model B: read cold on the host through the layer mount (no pod),
	// then, once verified, the first open and the ones after it, on the
	// host.
	mb, refB, weightsB := model("b", 2)
	if _, err := is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: refB}}); err != nil {
		b.Fatal(err)
	}
	before := mountsUnder(b, ws.root)
	if _, err := ctd.ctr(b, ctx, "--namespace", benchNamespace, "images", "pull", "--snapshotter", "weightsnap",
		"--plain-http", "--hosts-dir", hosts, refB); err != nil {
		b.Fatal(err)
	}
	var newMounts []string
	for _, mp := range mountsUnder(b, ws.root) {
		if !slices.Contains(before, mp) {
			newMounts = append(newMounts, mp)
		}
	}
	hostB, err := filesInMounts(slices.Concat(newMounts, before), mb.modelFiles(""))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := runTool(ctx, toolPath, append([]string{"read"}, hostB...)...); err != nil {
		b.Fatal(err)
	}
	if err := ws.waitVerified(ctx, weightsB); err != nil {
		b.Fatal(err)
	}
	add("host-b-first", "host, layer mount of model B, the first open since the layers verified", hostReads(b, ctx, toolPath, hostB, 1)...)
	add("host-b", "host, layer mount of model B", hostReads(b, ctx, toolPath, hostB, warmRuns)...)

	if wl, err := os.ReadFile(ws.log); err == nil {
		for l := range strings.SplitSeq(string(wl), "\n") {
			if strings.Contains(l, "dropped pages") {
				b.Log(l)
			}
		}
	}
	fmt.Printf("%-14s %6s %12s %12s %14s  %s\n", "variant", "runs", "first MiB s", "read MB/s", "seq MB/s", "what")
	for _, v := range vs {
		slices.SortFunc(v.runs, func(x, y readTrace) int { return int(x.readMBps() - y.readMBps()) })
		m := v.runs[len(v.runs)/2]
		var rates []string
		for _, r := range v.runs {
			rates = append(rates, fmt.Sprintf("%.0f", r.readMBps()))
		}
		seq := float64(m.bytes) / m.done.Sub(m.headers).Seconds() / 1e6
		fmt.Printf("%-14s %6d %12.3f %12.0f %14.0f  %s [%s]\n", v.key, len(v.runs), m.first.Sub(m.start).Seconds(), m.readMBps(), seq, v.what, strings.Join(rates, " "))
		b.ReportMetric(m.readMBps(), v.key+"-read-MB/s")
		b.ReportMetric(m.first.Sub(m.start).Seconds(), v.key+"-first-MiB-s")
	}
}

// hostReads runs the tool's read on the host n times.
func hostReads(b *testing.B, ctx context.Context, toolPath string, files []string, n int) []readTrace {
	var runs []readTrace
	for range n {
		tr, err := runTool(ctx, toolPath, append([]string{"read"}, files...)...)
		if err != nil {
			b.Fatal(err)
		}
		runs = append(runs, tr)
	}
	return runs
}
