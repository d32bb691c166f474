package credentials

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
)

func TestMatchIsKubelets(t *testing.T) {
	for _, tc := range []struct {
		pattern, image string
		want           bool
	}{
		{"registry.test", "registry.test/models/llama", true},
		{"*.registry.test", "eu.registry.test/models/llama", true},
		{"*.registry.test", "registry.test/models/llama", false}, // one label per *
		{"*.*.registry.test", "a.b.registry.test/x", true},
		{"*.registry.test", "a.b.registry.test/x", false},
		{"registry.test:5000", "registry.test:5000/x", true},
		{"registry.test", "registry.test:5000/x", false}, // ports must be equal
		{"registry.test:5000", "registry.test/x", false},
		{"registry.test/models", "registry.test/models/llama", true},
		{"registry.test/models", "registry.test/other/llama", false},
		{"*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.eu-west-1.amazonaws.com/m", true},
		{"reg*.test", "registry.test/x", true},
		{"docker.io", "docker.io/library/nginx", true},
	} {
		if got := match(tc.pattern, tc.image); got != tc.want {
			t.Errorf("match(%q, %q) = %v, want %v", tc.pattern, tc.image, got, tc.want)
		}
	}
}

// testPlugin writes an executable plugin named name into dir that appends
// its stdin, arguments and $TEST_ENV as one line to dir/<name>.log and
// prints dir/<name>.out as its response.
func testPlugin(t *testing.T, dir, name string) {
	t.Helper()
	script := `#!/bin/sh
log="$(dirname "$0")/` + name + `.log"
printf '%s|%s|%s\n' "$(cat)" "$*" "$TEST_ENV" >> "$log"
cat "$(dirname "$0")/` + name + `.out"
`
	if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
}

// respond makes plugin name's next answers resp.
func respond(t *testing.T, dir, name string, resp string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name+".out"), []byte(resp), 0o644); err != nil {
		t.Fatal(err)
	}
}

// runs returns the lines plugin name logged, one per run.
func runs(t *testing.T, dir, name string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name+".log"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func response(keyType, duration string, auth map[string]authn.AuthConfig) string {
	r := map[string]any{
		"apiVersion":   pluginAPI,
		"kind":         responseKind,
		"cacheKeyType": keyType,
		"auth":         auth,
	}
	if duration != "" {
		r["cacheDuration"] = duration
	}
	b, _ := json.Marshal(r)
	return string(b)
}

// loadTestPlugins writes config (YAML) and loads it with a clock the test
// moves.
func loadTestPlugins(t *testing.T, dir, config string) (*Plugins, *time.Time) {
	t.Helper()
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := LoadPlugins(path, dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_000_000, 0)
	p.now = func() time.Time { return now }
	return p, &now
}

const twoProviders = `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: eu-provider
    matchImages: ["*.registry.test", "registry.test:5000/models"]
    defaultCacheDuration: 10m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: ["--region", "eu"]
    env:
      - name: TEST_ENV
        value: from-config
  - name: other
    matchImages: ["other.test"]
    defaultCacheDuration: 1m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
`

func TestPluginsRunAsKubeletRunsThem(t *testing.T) {
	dir := t.TempDir()
	testPlugin(t, dir, "eu-provider")
	testPlugin(t, dir, "other")
	bob := authn.AuthConfig{Username: "bob", Password: "b-secret"}
	respond(t, dir, "eu-provider", response("Registry", "", map[string]authn.AuthConfig{"*.registry.test": bob, "registry.test:5000": bob}))
	p, now := loadTestPlugins(t, dir, twoProviders)
	ctx := context.Background()

	got, err := p.credentials(ctx, "eu.registry.test/models/llama")
	if err != nil || len(got) != 1 || got[0] != bob {
		t.Fatalf("credentials = %v, %v; want [bob]", got, err)
	}
	r := runs(t, dir, "eu-provider")
	want := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"eu.registry.test/models/llama"}|--region eu|from-config`
	if len(r) != 1 || r[0] != want {
		t.Fatalf("plugin ran %q, want once with %q", r, want)
	}

	// Cached by registry for defaultCacheDuration, as the response set none.
	p.credentials(ctx, "eu.registry.test/other/repo")
	*now = now.Add(9 * time.Minute)
	p.credentials(ctx, "eu.registry.test/models/llama")
	if n := len(runs(t, dir, "eu-provider")); n != 1 {
		t.Fatalf("plugin ran %d times within its cache duration, want 1", n)
	}
	*now = now.Add(2 * time.Minute)
	p.credentials(ctx, "eu.registry.test/models/llama")
	if n := len(runs(t, dir, "eu-provider")); n != 2 {
		t.Fatalf("plugin ran %d times after its cache expired, want 2", n)
	}

	// Images no provider matches run nothing.
	if got, err := p.credentials(ctx, "elsewhere.test/x"); len(got) != 0 || err != nil {
		t.Fatalf("credentials of an unmatched image = %v, %v", got, err)
	}
	if r := runs(t, dir, "other"); r != nil {
		t.Fatalf("unmatched plugin ran: %q", r)
	}
}

func TestPluginCacheKeyTypesAndDuration(t *testing.T) {
	bob := authn.AuthConfig{Username: "bob", Password: "b-secret"}
	auth := map[string]authn.AuthConfig{"*.registry.test": bob}
	for _, tc := range []struct {
		keyType, duration string
		images            []string
		wantRuns          int
	}{
		{"Image", "", []string{"a.registry.test/x", "a.registry.test/x", "a.registry.test/y"}, 2},
		{"Registry", "", []string{"a.registry.test/x", "a.registry.test/y", "b.registry.test/x"}, 2},
		{"Global", "", []string{"a.registry.test/x", "b.registry.test/y"}, 1},
		{"Global", "0s", []string{"a.registry.test/x", "a.registry.test/x"}, 2}, // 0: not cached
		{"Global", "30s", []string{"a.registry.test/x", "+31s", "a.registry.test/x"}, 2},
	} {
		t.Run(tc.keyType+tc.duration, func(t *testing.T) {
			dir := t.TempDir()
			testPlugin(t, dir, "eu-provider")
			testPlugin(t, dir, "other")
			respond(t, dir, "eu-provider", response(tc.keyType, tc.duration, auth))
			p, now := loadTestPlugins(t, dir, twoProviders)
			for _, im := range tc.images {
				if d, ok := strings.CutPrefix(im, "+"); ok {
					dd, _ := time.ParseDuration(d)
					*now = now.Add(dd)
					continue
				}
				if got, err := p.credentials(context.Background(), im); err != nil || len(got) != 1 {
					t.Fatalf("credentials(%s) = %v, %v", im, got, err)
				}
			}
			if n := len(runs(t, dir, "eu-provider")); n != tc.wantRuns {
				t.Errorf("plugin ran %d times, want %d", n, tc.wantRuns)
			}
		})
	}
}

func TestPluginBadOutput(t *testing.T) {
	for name, out := range map[string]string{
		"not json":       "password: hunter2",
		"wrong kind":     `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"Other","cacheKeyType":"Image"}`,
		"wrong version":  `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1alpha1","kind":"CredentialProviderResponse","cacheKeyType":"Image"}`,
		"bad key type":   `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Node"}`,
		"bad duration":   `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"soon"}`,
		"too long":       strings.Repeat("x", maxPluginOutput+1),
		"exits non-zero": "",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			testPlugin(t, dir, "eu-provider")
			testPlugin(t, dir, "other")
			p, _ := loadTestPlugins(t, dir, twoProviders)
			if out == "" {
				// cat of a missing response file fails the plugin.
			} else {
				respond(t, dir, "eu-provider", out)
			}
			got, err := p.credentials(context.Background(), "a.registry.test/x")
			if err == nil || len(got) != 0 {
				t.Fatalf("credentials = %v, %v; want an error", got, err)
			}
		})
	}
}

func TestLoadPluginsRejectsBadConfig(t *testing.T) {
	dir := t.TempDir()
	testPlugin(t, dir, "p")
	for name, cfg := range map[string]string{
		"kind":         `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"KubeletConfiguration"}`,
		"path in name": `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"../p","matchImages":["a"],"defaultCacheDuration":"1m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`,
		"missing bin":  `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"q","matchImages":["a"],"defaultCacheDuration":"1m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`,
		"no duration":  `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"p","matchImages":["a"],"apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`,
		"no match":     `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"p","defaultCacheDuration":"1m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`,
	} {
		path := filepath.Join(dir, name+".json")
		os.WriteFile(path, []byte(cfg), 0o644)
		if _, err := LoadPlugins(path, dir); err == nil {
			t.Errorf("%s: LoadPlugins accepted %s", name, cfg)
		}
	}
	ok := `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"p","matchImages":["a"],"defaultCacheDuration":"1m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`
	path := filepath.Join(dir, "ok.json")
	os.WriteFile(path, []byte(ok), 0o644)
	if _, err := LoadPlugins(path, dir); err != nil {
		t.Errorf("LoadPlugins of JSON: %v", err)
	}
}
