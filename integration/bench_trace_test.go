package integration

// Where the time of a cold pull goes: weightsnapd's debug log, read back
// for the window from PullImage to its return.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// stargzOverheadS is what lazy loading added to the floor with
// stargz-snapshotter, measured side by side with weightsnap on this kind
// of machine (1 GiB model, CRI image volume, PullImage to the first MiB in
// the pod minus the same for an image already on the node). It cannot
// run in the benchmark: the Go module proxy does not serve its commands.
const stargzOverheadS = 0.166

// pullTrace is one cold pull as weightsnapd saw it, in seconds from
// PullImage.
type pullTrace struct {
	// FirstPrepare is when containerd's first Prepare reached
	// weightsnapd: before it, containerd resolved the image and fetched
	// its manifest and config.
	FirstPrepare float64 `json:"first_prepare_s"`
	// LastPrepared is when weightsnapd answered the last layer's Prepare.
	LastPrepared float64 `json:"last_prepared_s"`
	// Pulled is when PullImage returned: after LastPrepared, containerd
	// committed the snapshots and recorded the image.
	Pulled float64      `json:"pulled_s"`
	Layers []layerTrace `json:"layers"`
}

// layerTrace is one layer's Prepare.
type layerTrace struct {
	Layer string `json:"layer"`
	// Prepare and Prepared are when its Prepare arrived and was answered.
	Prepare  float64 `json:"prepare_s"`
	Prepared float64 `json:"prepared_s"`
	// Opened is when the FUSE manager had the layer open (at the image's
	// first Prepare, every layer opens at once); Index and Segments how
	// long building its index and declaring its segments took, Mount the
	// FUSE mount.
	Opened   float64 `json:"opened_s"`
	IndexS   float64 `json:"index_s"`
	Segments float64 `json:"segments_s"`
	MountS   float64 `json:"mount_s"`
}

// logLine is the part of a weightsnapd (or FUSE manager) JSON log line the
// trace reads.
type logLine struct {
	Time       time.Time `json:"time"`
	Msg        string    `json:"msg"`
	Key        string    `json:"key"`
	Layer      string    `json:"layer"`
	Mountpoint string    `json:"mountpoint"`
	Index      int64     `json:"index"`    // ns
	Segments   int64     `json:"segments"` // ns
	Took       int64     `json:"took"`     // ns
}

// tracePull reads weightsnapd's log for the window [start, end] of one
// PullImage.
func tracePull(logPath string, start, end time.Time) (pullTrace, error) {
	f, err := os.Open(logPath)
	if err != nil {
		return pullTrace{}, err
	}
	defer f.Close()
	return parsePullTrace(f, start, end)
}

func parsePullTrace(r io.Reader, start, end time.Time) (pullTrace, error) {
	tr := pullTrace{Pulled: secs(end.Sub(start))}
	byKey := map[string]*layerTrace{}   // snapshot key → its layer
	byMount := map[string]*layerTrace{} // mountpoint → its layer
	byLayer := map[string]*layerTrace{} // layer digest
	var order []*layerTrace
	at := func(l logLine) float64 { return secs(l.Time.Sub(start)) }
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var opened []logLine
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Time.Before(start) || l.Time.After(end) {
			continue
		}
		switch {
		case strings.HasPrefix(l.Msg, "preparing filesystem mount"):
			lt := &layerTrace{Prepare: at(l)}
			byKey[l.Key] = lt
			order = append(order, lt)
		case l.Msg == "mounting layer lazily":
			if lt := byKey[l.Key]; lt != nil {
				lt.Layer = l.Layer
				byMount[l.Mountpoint] = lt
				byLayer[l.Layer] = lt
			}
		case l.Msg == "layer mounted":
			if lt := byMount[l.Mountpoint]; lt != nil {
				lt.MountS = secs(time.Duration(l.Took))
			}
		case l.Msg == "layer opened":
			opened = append(opened, l)
		case l.Msg == "prepared remote snapshot":
			if lt := byKey[l.Key]; lt != nil {
				lt.Prepared = at(l)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return tr, err
	}
	for _, l := range opened {
		if lt := byLayer[l.Layer]; lt != nil {
			lt.Opened, lt.IndexS, lt.Segments = at(l), secs(time.Duration(l.Index)), secs(time.Duration(l.Segments))
		}
	}
	if len(order) == 0 {
		return tr, fmt.Errorf("no Prepare in weightsnapd's log between %s and %s", start.Format(time.RFC3339Nano), end.Format(time.RFC3339Nano))
	}
	tr.FirstPrepare = order[0].Prepare
	for _, lt := range order {
		tr.Layers = append(tr.Layers, *lt)
		tr.LastPrepared = max(tr.LastPrepared, lt.Prepared)
	}
	return tr, nil
}

func secs(d time.Duration) float64 { return round4(d.Seconds()) }

// String is the trace as a few lines of text.
func (t pullTrace) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "  %.3f s containerd: resolve, manifest and config, until the first Prepare\n", t.FirstPrepare)
	for _, l := range t.Layers {
		fmt.Fprintf(&b, "  %.3f–%.3f s Prepare %s: opened at %.3f s (index %.1f ms, segments %.1f ms), FUSE mount %.1f ms\n",
			l.Prepare, l.Prepared, shortDigest(l.Layer), l.Opened, 1000*l.IndexS, 1000*l.Segments, 1000*l.MountS)
	}
	fmt.Fprintf(&b, "  %.3f s PullImage returned (containerd: %.3f s after the last Prepare)\n", t.Pulled, t.Pulled-t.LastPrepared)
	return b.String()
}

func shortDigest(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 && len(d) > i+13 {
		return d[:i+13]
	}
	return d
}

// ttfrOverhead is what lazy loading adds to the floor: the cold pod's
// PullImage to first MiB, minus the floor, a pod of an image already on
// the node (container created and started, first MiB read), both from the
// same run.
func ttfrOverhead(cold, warm benchPath) (overhead, floor float64) {
	floor = warm.FirstMiB - warm.Steps["sandbox"]
	return cold.FirstMiB - floor, floor
}

// BenchmarkPullTrace pulls three (WEIGHTSNAP_TRACE_PULLS) models of
// WEIGHTSNAP_BENCH_SIZE cold
// through CRI, each into a pod reading its first MiB, then a pod of the
// last one again (the floor), and prints where each pull's time went:
// the trace make bench reports for its one cold pull, repeated.
// WEIGHTSNAP_TRACE_CONFIG is added to weightsnapd's config. With
// WEIGHTSNAP_TRACE_COLD_FLOOR set, each pull's floor is also measured
// after the page cache is dropped, the state the cold pod starts in.
//
//	sudo go test ./integration -run '^$' -bench BenchmarkPullTrace -benchtime 1x
func BenchmarkPullTrace(b *testing.B) {
	cfg := benchPrerequisites(b)
	ctx := b.Context()
	dir := shortTempDir(b, "wst")
	probe := useDiskProbe(b, dir)
	reg := testutil.StartRegistry(b)
	st := startBenchStack(b, ctx, dir, reg.Addr, os.Getenv("WEIGHTSNAP_TRACE_CONFIG"), reg.Addr)
	data := mkdir(b, filepath.Join(dir, "data"))
	pulls := 3
	if v := os.Getenv("WEIGHTSNAP_TRACE_PULLS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("WEIGHTSNAP_TRACE_PULLS=%q: want a count", v)
		}
		pulls = n
	}
	var floors, overheads []float64
	for i := range pulls {
		ref := fmt.Sprintf("%s/bench/trace%d:v1", reg.Addr, i)
		m, _ := pushedModel(b, ctx, filepath.Join(data, fmt.Sprint(i)), st.tool, cfg, uint64(10+i), fmt.Sprint("trace", i), ref)
		if err := dropCaches(); err != nil {
			b.Fatal(err)
		}
		files := m.modelFiles("/models-volume")
		c, err := coldPod(b, ctx, st.ws, st.rt, st.is, st.logs, st.tools.Ref, fmt.Sprint("trace", i), ref, append([]string{"read"}, files...), "chunks")
		if err != nil {
			b.Fatal(err)
		}
		tr, err := tracePull(st.ws.log, c.pullStart, c.pulled)
		if err != nil {
			b.Fatal(err)
		}
		cold := podPath("cold", "cold", "", c.pullStart, c.pulled, c.readerPod)
		w, err := runReaderPod(b, ctx, st.rt, st.logs, st.tools.Ref, fmt.Sprint("trace", i), "warm", ref, files)
		if err != nil {
			b.Fatal(err)
		}
		removePod(b, st.rt, w.pod)
		overhead, floor := ttfrOverhead(cold, podPath("warm", "warm", "", w.sandboxStart, time.Time{}, w))
		floors, overheads = append(floors, floor), append(overheads, overhead)
		b.Logf("pull %d: first MiB %.3f s, floor %.3f s, lazy overhead %.3f s (the disk slow for %v s before it)\n%s", i, cold.FirstMiB, floor, overhead, probe.waits, tr)
		if os.Getenv("WEIGHTSNAP_TRACE_COLD_FLOOR") != "" {
			if err := dropCaches(); err != nil {
				b.Fatal(err)
			}
			f, err := runReaderPod(b, ctx, st.rt, st.logs, st.tools.Ref, fmt.Sprint("trace", i), "floor-cold", ref, files)
			if err != nil {
				b.Fatal(err)
			}
			removePod(b, st.rt, f.pod)
			overhead, floor := ttfrOverhead(cold, podPath("floor-cold", "floor-cold", "", f.sandboxStart, time.Time{}, f))
			b.Logf("pull %d: floor after a drop %.3f s, lazy overhead against it %.3f s", i, floor, overhead)
		}
	}
	if hwm, err := vmHWM(st.ws.managerPID()); err == nil {
		b.ReportMetric(float64(hwm)/(1<<20), "manager-peak-RSS-MiB")
	}
	b.ReportMetric(slices.Max(overheads), "max-overhead-s")
	b.ReportMetric(slices.Min(overheads), "min-overhead-s")
	b.ReportMetric(slices.Max(floors), "max-floor-s")
}

func TestParsePullTrace(t *testing.T) {
	start := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	line := func(ms int, kv string) string {
		return fmt.Sprintf(`{"time":%q,%s}`, start.Add(time.Duration(ms)*time.Millisecond).Format(time.RFC3339Nano), kv) + "\n"
	}
	log := line(-5, `"msg":"preparing filesystem mount at mountpoint=/old","key":"k0"`) +
		line(20, `"msg":"preparing filesystem mount at mountpoint=/s/1/fs","key":"k1"`) +
		line(20, `"msg":"mounting layer lazily","key":"k1","layer":"sha256:aaaaaaaaaaaaaaaa","mountpoint":"/s/1/fs"`) +
		line(45, `"msg":"layer opened","layer":"sha256:bbbbbbbbbbbbbbbb","index":20000000,"segments":3000000`) +
		line(50, `"msg":"layer opened","layer":"sha256:aaaaaaaaaaaaaaaa","index":25000000,"segments":1000000`) +
		line(51, `"msg":"layer mounted","mountpoint":"/s/1/fs","took":1500000`) +
		line(53, `"msg":"prepared remote snapshot","key":"k1"`) +
		"not json\n" +
		line(56, `"msg":"preparing filesystem mount at mountpoint=/s/2/fs","key":"k2"`) +
		line(56, `"msg":"mounting layer lazily","key":"k2","layer":"sha256:bbbbbbbbbbbbbbbb","mountpoint":"/s/2/fs"`) +
		line(58, `"msg":"layer mounted","mountpoint":"/s/2/fs","took":1000000`) +
		line(60, `"msg":"prepared remote snapshot","key":"k2"`) +
		line(200, `"msg":"preparing filesystem mount at mountpoint=/later","key":"k3"`)
	tr, err := parsePullTrace(strings.NewReader(log), start, start.Add(80*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	want := pullTrace{FirstPrepare: 0.02, LastPrepared: 0.06, Pulled: 0.08, Layers: []layerTrace{
		{Layer: "sha256:aaaaaaaaaaaaaaaa", Prepare: 0.02, Prepared: 0.053, Opened: 0.05, IndexS: 0.025, Segments: 0.001, MountS: 0.0015},
		{Layer: "sha256:bbbbbbbbbbbbbbbb", Prepare: 0.056, Prepared: 0.06, Opened: 0.045, IndexS: 0.02, Segments: 0.003, MountS: 0.001},
	}}
	if fmt.Sprint(tr) != fmt.Sprint(want) || !slices.Equal(tr.Layers, want.Layers) {
		t.Errorf("trace\n%+v\nwant\n%+v", tr, want)
	}
	if _, err := parsePullTrace(strings.NewReader(log), start.Add(time.Second), start.Add(2*time.Second)); err == nil {
		t.Error("a window without a Prepare: no error")
	}
}
