package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weightsnap/weightsnap/internal/imagebuild"
)

// TestDaemonSetProbes keeps the DaemonSet's probes on `weightsnapd health`
// at the path where make image puts the binary.
func TestDaemonSetProbes(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := `exec: {command: ["` + imagebuild.BinaryPath + `", "` + healthCommand + `", "--config", "/etc/weightsnap/weightsnapd.toml"`
	for _, probe := range []string{"startupProbe:", "readinessProbe:", "livenessProbe:"} {
		_, rest, ok := strings.Cut(string(b), probe)
		if !ok {
			t.Errorf("deploy/daemonset.yaml has no %s", probe)
			continue
		}
		if line, _, _ := strings.Cut(strings.TrimSpace(rest), "\n"); !strings.HasPrefix(line, want) {
			t.Errorf("%s runs %s, want %s…", probe, line, want)
		}
	}
}
