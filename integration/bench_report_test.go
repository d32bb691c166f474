package integration

// BenchmarkModelPull's outputs: the table on stdout, bench.json and the
// bench.svg chart of bytes read over time.

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
)

// writeTable prints the result as the table the README shows.
func writeTable(w io.Writer, r benchResult) {
	fmt.Fprintf(w, "\nweightsnap benchmark, %s\n", r.Time)
	fmt.Fprintf(w, "machine: %s\n", r.Machine)
	fmt.Fprintf(w, "model:   %s of weights in %d safetensors file(s), image %s in %d layers (%s)\n",
		gib(r.Model.WeightsBytes), r.Model.Shards, gib(r.Model.ImageBytes), r.Model.Layers, r.Model.Ref)
	fmt.Fprintf(w, "caches:  %s\n\n", r.DropCaches)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "path\tpull s\treader s\tfirst MiB s\theaders s\tlast byte s\tread MB/s\te2e MB/s\t")
	step := func(p benchPath, k string) string {
		if v, ok := p.Steps[k]; ok {
			return fmt.Sprintf("%.2f", v)
		}
		return "-"
	}
	for _, p := range r.Paths {
		hd := "-"
		if p.Headers > 0 {
			hd = fmt.Sprintf("%.2f", p.Headers)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.3f\t%s\t%.2f\t%.0f\t%.0f\t\n",
			p.Name, step(p, "pull"), step(p, "reader"), p.FirstMiB, hd, p.LastByte, p.ReadMBps, p.EndToEndMBps)
	}
	tw.Flush()
	fmt.Fprintln(w, "\n  Seconds from each path's start; reader s: the reading process started; read MB/s: bytes over the")
	fmt.Fprintln(w, "  reader's own time; e2e MB/s: bytes over the time from the path's start to its last byte.")
	width := 0
	for _, p := range r.Paths {
		width = max(width, len(p.Name)+1)
	}
	for _, p := range r.Paths {
		fmt.Fprintf(w, "  %-*s %s\n", width, p.Name+":", p.Note)
	}

	if len(r.PullTrace.Layers) > 0 {
		fmt.Fprintf(w, "\nthe cold pull (weightsnap CRI, cold), from PullImage, as weightsnapd logged it:\n%s", r.PullTrace)
	}

	s := r.Shared
	fmt.Fprintf(w, "\n%d pods in namespaces %s through %s:\n", s.Pods, strings.Join(s.Namespaces, ", "), strings.Join(s.Refs, ", "))
	fmt.Fprintf(w, "  registry served %s for a model of %s (%.4f×); pulls %.2f s; first MiB in every pod by %.2f s, last byte by %.2f s (%.0f MB/s over all pods)\n",
		gib(s.RegistryBytes), gib(s.ModelBytes), s.Ratio, s.PullS, s.FirstMiBMaxS, s.LastByteMaxS, s.AggregateMBps)
	fmt.Fprintf(w, "peak RSS (VmHWM): weightsnapd %s, FUSE manager %s, holder %s%s\n", mib(r.RSS.WeightsnapdBytes), mib(r.RSS.ManagerBytes), mib(r.RSS.HolderBytes), parenthesize(r.RSS.Note))
	fmt.Fprintf(w, "cache on disk: %s allocated (%s apparent) for %s of data still cached (%.4f×), %s\n",
		gib(r.Cache.AllocatedBytes), gib(r.Cache.ApparentBytes), gib(r.Cache.DataBytes), r.Cache.Ratio, r.Cache.Dir)
	writeCachePoints(w, r.Cache)
	writeDisk(w, r.Disk)
	fmt.Fprintln(w)

	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\twant\tmeasured\tlimit\tresult\tnote")
	for _, t := range r.Targets {
		res := "pass"
		if !t.Pass {
			res = "MISS"
		}
		fmt.Fprintf(tw, "%s\t%s\t%.4g\t%.4g\t%s\t%s\n", t.Name, t.Want, t.Value, t.Limit, res, t.Note)
	}
	tw.Flush()
	if v := r.Verification; v.WithPath != "" {
		fmt.Fprintf(w, "\nchunk verification: cold read %.0f vs %.0f MB/s without (%.2f×), time to first read %.3f vs %.3f s\n",
			v.ColdMBps, v.ColdMBpsWithout, v.Ratio, v.FirstMiBS, v.FirstMiBSWithout)
	}
	fmt.Fprintln(w)
}

func parenthesize(s string) string {
	if s == "" {
		return ""
	}
	return " (" + s + ")"
}

func gib(n int64) string { return fmt.Sprintf("%.3f GiB", float64(n)/(1<<30)) }
func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// writeJSON writes r to path.
func writeJSON(path string, r benchResult) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// chartStyle is the colour of each path's line (Tableau 10), the paths
// to compare strong, the references (GETs and local files) dashed; paths
// not listed are not drawn.
var chartStyle = map[string]string{
	"get-cold": "#4e79a7", "get-warm": "#a0cbe8", "get-proxy-cold": "#76b7b2",
	"local-cold": "#79706e", "local-warm": "#bab0ac",
	"overlayfs": "#f28e2b", "ws-cold": "#e15759", "ws-cold-notable": "#ff9da7", "ws-warm": "#59a14f", "ws-cached": "#b07aa1", "ws-host-warm": "#8cd17d",
	"ws-cold-load": "#edc948", "ws-cold-load4": "#9c755f",
}

// writeSVG draws every path's bytes read over time, each from its own
// start, as one chart.
func writeSVG(path, title string, all []benchPath) error {
	var paths []benchPath
	for _, p := range all {
		if _, ok := chartStyle[p.Key]; ok {
			paths = append(paths, p)
		}
	}
	const (
		width, height          = 1000, 600
		left, right, top, bot  = 70, 300, 50, 60
		plotW, plotH           = width - left - right, height - top - bot
		legendX, legendY, rowH = width - right + 20, top + 10, 34
	)
	var maxT, maxB float64
	for _, p := range paths {
		for _, pt := range p.Series {
			maxT, maxB = math.Max(maxT, pt[0]), math.Max(maxB, pt[1])
		}
	}
	if maxT <= 0 || maxB <= 0 {
		return fmt.Errorf("chart: nothing to draw")
	}
	tStep := niceStep(maxT, 8)
	maxT = math.Ceil(maxT/tStep-1e-3) * tStep
	maxG := maxB / (1 << 30)
	gStep := niceStep(maxG, 6)
	maxG = math.Ceil(maxG/gStep-1e-3) * gStep
	x := func(t float64) float64 { return left + t/maxT*plotW }
	y := func(b float64) float64 { return top + plotH - b/(1<<30)/maxG*plotH }

	var s strings.Builder
	fmt.Fprintf(&s, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&s, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&s, `<text x="%d" y="28" font-size="15" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))
	for t := 0.0; t <= maxT+tStep/2; t += tStep {
		fmt.Fprintf(&s, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#e5e5e5"/>`, x(t), top, x(t), top+plotH)
		fmt.Fprintf(&s, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", x(t), top+plotH+18, trimFloat(t))
	}
	for g := 0.0; g <= maxG+gStep/2; g += gStep {
		yy := y(g * (1 << 30))
		fmt.Fprintf(&s, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e5e5e5"/>`, left, yy, left+plotW, yy)
		fmt.Fprintf(&s, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-8, yy+4, trimFloat(g))
	}
	fmt.Fprintf(&s, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#333"/>`+"\n", left, top, plotW, plotH)
	fmt.Fprintf(&s, `<text x="%d" y="%d" text-anchor="middle">seconds from each path's start: the pull request, the GET, RunPodSandbox (warm pods) or the reader (local)</text>`+"\n", left+plotW/2, height-18)
	fmt.Fprintf(&s, `<text x="18" y="%d" text-anchor="middle" transform="rotate(-90 18 %d)">GiB read by the reader</text>`+"\n", top+plotH/2, top+plotH/2)
	for i, p := range paths {
		c := chartStyle[p.Key]
		var pts []string
		for _, pt := range p.Series {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(pt[0]), y(pt[1])))
		}
		dash, width := "", 2.5
		if strings.HasPrefix(p.Key, "get") || strings.HasPrefix(p.Key, "local") {
			dash, width = ` stroke-dasharray="6 4"`, 1.5
		}
		fmt.Fprintf(&s, `<polyline fill="none" stroke="%s" stroke-width="%.1f"%s points="%s"/>`+"\n", c, width, dash, strings.Join(pts, " "))
		ly := legendY + i*rowH
		fmt.Fprintf(&s, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"%s/>`, legendX, ly, legendX+24, ly, c, dash)
		fmt.Fprintf(&s, `<text x="%d" y="%d">%s</text>`, legendX+30, ly+4, html.EscapeString(p.Name))
		fmt.Fprintf(&s, `<text x="%d" y="%d" fill="#555" font-size="11">first MiB %.2f s, last byte %.2f s</text>`+"\n", legendX+30, ly+18, p.FirstMiB, p.LastByte)
	}
	s.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(s.String()), 0o644)
}

// niceStep returns a round tick step (1, 2 or 5 × 10^k) giving about n
// ticks up to max.
func niceStep(max float64, n int) float64 {
	raw := max / float64(n)
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if raw <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".")
}

// writeOutputs writes bench.json and bench.svg into dir and returns
// their paths.
func writeOutputs(dir string, r benchResult) (jsonPath, svgPath string, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	jsonPath, svgPath = filepath.Join(dir, "bench.json"), filepath.Join(dir, "bench.svg")
	if err := writeJSON(jsonPath, r); err != nil {
		return "", "", err
	}
	title := fmt.Sprintf("Bytes read over time: %s model, %d file(s), %d CPUs, Linux %s",
		gib(r.Model.WeightsBytes), r.Model.Shards, r.Machine.CPUs, r.Machine.Kernel)
	if err := writeSVG(svgPath, title, r.Paths); err != nil {
		return "", "", err
	}
	return jsonPath, svgPath, nil
}
