package main

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/weightsnap/weightsnap/remote"
)

// TestDeployConfigIsDefaults keeps deploy/weightsnapd.toml, which documents
// every key with its default, in step with defaultConfig.
func TestDeployConfigIsDefaults(t *testing.T) {
	cfg, err := loadConfig(filepath.Join("..", "..", "deploy", "weightsnapd.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if want := defaultConfig(); !reflect.DeepEqual(cfg, want) {
		t.Errorf("deploy/weightsnapd.toml = %+v\ndefaults = %+v", cfg, want)
	}
}

func TestConfigUnknownKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte("[registry]\nconfig_paht = \"/x\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadConfig(p); err == nil {
		t.Fatal("a misspelt key was accepted")
	}
}

func TestFlagsOverrideFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte("root = \"/from/file\"\nlog_level = \"debug\"\n[cache]\nmax_bytes = 1024\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseFlags([]string{"--config", p, "--root", "/from/flag"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/from/flag" || cfg.LogLevel != "debug" || cfg.Cache.MaxBytes != 1024 || cfg.Address != defaultConfig().Address {
		t.Errorf("config = %+v", cfg)
	}
}

func TestHostsMirrors(t *testing.T) {
	dir := t.TempDir()
	hostDir := filepath.Join(dir, "registry.example:5000")
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := `server = "http://registry.example:5000"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]

[host."https://push-only.example"]
  capabilities = ["push"]

[host."https://mirror.example/cache/v2"]
  capabilities = ["pull"]
  override_path = true
`
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	mirrors := hostsMirrors(context.Background(), dir)
	got := mirrors("registry.example:5000")
	want := []remote.Endpoint{
		{Host: "127.0.0.1:5001", Scheme: "http"},
		{Host: "mirror.example", Scheme: "https", Path: "/cache/v2"},
		{Host: "registry.example:5000", Scheme: "http"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("endpoints = %+v\nwant %+v", got, want)
	}
	if got := mirrors("other.example"); got != nil {
		t.Errorf("registry without hosts.toml: endpoints = %+v, want nil (origin defaults)", got)
	}
}
