package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weightsnap/weightsnap/metrics"
)

// The metric names a PromQL expression names, each with the labels its
// selector matches on, if it has one.
var (
	metricRef = regexp.MustCompile(`(weightsnap_[a-z_]+)(\{[^}]*\})?`)
	labelName = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	descName  = regexp.MustCompile(`fqName: "([^"]+)"`)
	descVars  = regexp.MustCompile(`variableLabels: \{([^}]*)\}`)
)

// TestDashboardNamesExportedMetrics checks every expression of the
// Grafana dashboard against the metrics weightsnap registers: each metric
// it names exists (a histogram's _bucket, _count and _sum series by the
// histogram's name), and each label it matches on is one of the metric's.
// Descriptors rather than gathered samples, since a vector exports no
// series before its first observation.
func TestDashboardNamesExportedMetrics(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "deploy", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard is not JSON: %v", err)
	}
	var exprs []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || k == "query" || k == "definition") {
					exprs = append(exprs, s)
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dash)
	if len(exprs) < 10 {
		t.Fatalf("found %d expressions in the dashboard", len(exprs))
	}

	labels := make(map[string][]string) // registered name → its variable labels
	descs := make(chan *prometheus.Desc)
	go func() { metrics.Registry.Describe(descs); close(descs) }()
	for d := range descs {
		s := d.String()
		m := descName.FindStringSubmatch(s)
		if m == nil {
			t.Fatalf("cannot read descriptor %s", s)
		}
		var vars []string
		if v := descVars.FindStringSubmatch(s); v != nil && v[1] != "" {
			vars = strings.Split(v[1], ",")
		}
		labels[m[1]] = vars
	}

	seen := make(map[string]bool)
	for _, e := range exprs {
		for _, m := range metricRef.FindAllStringSubmatch(e, -1) {
			name, sel := m[1], m[2]
			known, ok := labels[name]
			extra := []string{"instance", "job"} // the scrape's target labels
			if !ok {
				for _, suf := range []string{"_bucket", "_count", "_sum"} {
					if base, cut := strings.CutSuffix(name, suf); cut {
						if known, ok = labels[base]; ok && suf == "_bucket" {
							extra = append(extra, "le")
						}
						break
					}
				}
			}
			if !ok {
				t.Errorf("the dashboard names %s, which weightsnap does not export (in %q)", name, e)
				continue
			}
			seen[name] = true
			for _, l := range labelName.FindAllStringSubmatch(sel, -1) {
				if !slices.Contains(known, l[1]) && !slices.Contains(extra, l[1]) {
					t.Errorf("the dashboard matches %s on label %q; its labels are %v (in %q)", name, l[1], known, e)
				}
			}
		}
	}
	// What the dashboard is for.
	for _, want := range []string{
		"weightsnap_time_to_first_read_seconds", "weightsnap_registry_bytes_total", "weightsnap_cache_bytes_total",
		"weightsnap_layer_fetched_bytes", "weightsnap_layer_size_bytes", "weightsnap_registry_requests_total",
		"weightsnap_read_latency_seconds_count", "weightsnap_layers_opened_total", "weightsnap_unverified_layer_mismatches_total",
	} {
		if !seen[want] {
			t.Errorf("the dashboard does not show %s", want)
		}
	}
}
