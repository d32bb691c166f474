package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	ggcrremote "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/internal/testutil"
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

// TestDaemonSetConfig keeps the DaemonSet's weightsnapd.toml loadable and
// its metrics on loopback: the pod shares the node's network.
func TestDaemonSetConfig(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "weightsnapd.toml: |\n")
	if !ok {
		t.Fatal("no weightsnapd.toml in deploy/daemonset.yaml")
	}
	var file strings.Builder
	for _, line := range strings.SplitAfter(rest, "\n") {
		if strings.TrimSpace(line) != "" && !strings.HasPrefix(line, "    ") {
			break
		}
		file.WriteString(strings.TrimPrefix(line, "    "))
	}
	cfg, err := loadConfig(testutil.WriteFile(t, t.TempDir(), "weightsnapd.toml", []byte(file.String())))
	if err != nil {
		t.Fatal(err)
	}
	host, _, err := net.SplitHostPort(cfg.MetricsAddress)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		t.Errorf("DaemonSet metrics_address %q: want a loopback address", cfg.MetricsAddress)
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
	if cfg.Root != "/from/flag" || cfg.LogLevel != "debug" || cfg.Cache.MaxBytes != (DiskSize{Bytes: 1024}) || cfg.Address != defaultConfig().Address {
		t.Errorf("config = %+v", cfg)
	}
}

func TestHostsMirrors(t *testing.T) {
	dir := t.TempDir()
	caFile := testutil.WriteFile(t, dir, "ca.pem", testutil.NewCA(t).PEM)
	hosts := fmt.Sprintf(`server = "http://registry.example:5000"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]

[host."https://push-only.example"]
  capabilities = ["push"]

[host."https://mirror.example/cache/v2"]
  capabilities = ["pull"]
  override_path = true
  skip_verify = true

[host."http://10.0.0.9:5002"]
  capabilities = ["pull"]
  ca = %q
`, caFile)
	mirrors := hostsMirrors(context.Background(), writeHosts(t, "registry.example:5000", hosts))
	got := mirrors("registry.example:5000")
	var withTLS []string
	for i, ep := range got {
		if ep.TLS != nil {
			withTLS = append(withTLS, ep.Host)
			got[i].TLS = nil
		}
	}
	want := []remote.Endpoint{
		{Host: "127.0.0.1:5001", Scheme: "http"},
		{Host: "mirror.example", Scheme: "https", Path: "/cache/v2"},
		// containerd tries HTTPS first on an http:// host with TLS settings.
		{Host: "10.0.0.9:5002", Scheme: "http"},
		{Host: "registry.example:5000", Scheme: "http"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("endpoints = %+v\nwant %+v", got, want)
	}
	if want := []string{"mirror.example", "10.0.0.9:5002"}; !reflect.DeepEqual(withTLS, want) {
		t.Errorf("endpoints with a TLS configuration: %v, want %v", withTLS, want)
	}
	if got := mirrors("other.example"); got != nil {
		t.Errorf("registry without hosts.toml: endpoints = %+v, want nil (origin defaults)", got)
	}
}

// blobRegistry is an in-process registry holding one random layer blob in
// test/model, counting the blob requests it serves.
type blobRegistry struct {
	handler http.Handler
	blobs   atomic.Int64
	digest  digest.Digest
	data    []byte
}

func newBlobRegistry(t *testing.T) *blobRegistry {
	t.Helper()
	r := &blobRegistry{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.handler = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if strings.Contains(req.URL.Path, "/blobs/") {
			r.blobs.Add(1)
		}
		inner.ServeHTTP(w, req)
	})
	push := httptest.NewServer(inner)
	defer push.Close()
	layer, err := random.Layer(4096, types.OCILayer)
	if err != nil {
		t.Fatal(err)
	}
	repo, err := name.NewRepository(strings.TrimPrefix(push.URL, "http://") + "/test/model")
	if err != nil {
		t.Fatal(err)
	}
	if err := ggcrremote.WriteLayer(repo, layer, ggcrremote.WithContext(t.Context())); err != nil {
		t.Fatal(err)
	}
	h, _ := layer.Digest()
	r.digest = digest.Digest(h.String())
	rc, _ := layer.Compressed()
	defer rc.Close()
	if r.data, err = io.ReadAll(rc); err != nil {
		t.Fatal(err)
	}
	return r
}

// read reads the blob from host/test/model with c.
func (r *blobRegistry) read(ctx context.Context, c *remote.Client, host string) error {
	b, err := c.OpenBlob(ctx, host+"/test/model", r.digest, int64(len(r.data)))
	if err != nil {
		return err
	}
	buf := make([]byte, len(r.data))
	if _, err := b.ReadAt(ctx, buf, 0); err != nil {
		return err
	}
	if !bytes.Equal(buf, r.data) {
		return errors.New("wrong bytes")
	}
	return nil
}

// writeHosts writes the hosts.toml of registry under a new certs.d
// directory and returns the directory.
func writeHosts(t *testing.T, registry, hostsTOML string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, registry), 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.WriteFile(t, filepath.Join(dir, registry), "hosts.toml", []byte(hostsTOML))
	return dir
}

// TestHostsTLS: a mirror's ca, client certificates and skip_verify in
// hosts.toml are used, as containerd uses them.
func TestHostsTLS(t *testing.T) {
	reg := newBlobRegistry(t)
	origin := httptest.NewServer(reg.handler)
	t.Cleanup(origin.Close)
	originHost := strings.TrimPrefix(origin.URL, "http://")

	ca, clientCA := testutil.NewCA(t), testutil.NewCA(t)
	certs := t.TempDir()
	caFile := testutil.WriteFile(t, certs, "ca.pem", ca.PEM)
	_, certPEM, keyPEM := clientCA.Issue(t, "weightsnapd")
	certFile := testutil.WriteFile(t, certs, "client.pem", certPEM)
	keyFile := testutil.WriteFile(t, certs, "client-key.pem", keyPEM)
	mirror := ca.StartTLS(t, reg.handler, nil, "127.0.0.1")
	mtlsMirror := ca.StartTLS(t, reg.handler, clientCA, "127.0.0.1")

	for _, tc := range []struct {
		name       string
		mirror     *httptest.Server
		tls        string // the mirror's TLS lines in hosts.toml
		wantMirror bool
	}{
		{"ca", mirror, fmt.Sprintf("ca = %q", caFile), true},
		{"no ca", mirror, "", false},
		{"skip_verify", mirror, "skip_verify = true", true},
		{"client certificate", mtlsMirror, fmt.Sprintf("ca = %q\n  client = [[%q, %q]]", caFile, certFile, keyFile), true},
		{"no client certificate", mtlsMirror, fmt.Sprintf("ca = %q", caFile), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeHosts(t, originHost, fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n  %s\n",
				origin.URL, tc.mirror.URL, tc.tls))
			mirrors := hostsMirrors(t.Context(), dir)
			retry := remote.WithRetry(2, time.Millisecond)

			mirrorOnly := remote.WithMirrors(func(r string) []remote.Endpoint { return mirrors(r)[:1] })
			err := reg.read(t.Context(), remote.New(retry, mirrorOnly), originHost)
			if tc.wantMirror && err != nil {
				t.Fatalf("read through the mirror: %v", err)
			}
			if !tc.wantMirror && (err == nil || !strings.Contains(err.Error(), "tls: ")) {
				t.Fatalf("read through the mirror: %v, want a TLS error", err)
			}

			before := reg.blobs.Load()
			if err := reg.read(t.Context(), remote.New(retry, remote.WithMirrors(mirrors)), originHost); err != nil {
				t.Fatalf("read with the origin to fall back on: %v", err)
			}
			if reg.blobs.Load() == before {
				t.Fatal("no blob request")
			}
		})
	}
}

// TestHostsPrivateRegistryHTTPS: a registry on a private address whose
// hosts.toml says https, with a private CA, is read over HTTPS only.
func TestHostsPrivateRegistryHTTPS(t *testing.T) {
	reg := newBlobRegistry(t)
	ca := testutil.NewCA(t)
	const host = "10.1.2.3:5000"
	srv := ca.StartTLS(t, reg.handler, nil, "10.1.2.3")
	var fakeNet testutil.FakeNet
	fakeNet.Route(host, srv.Listener.Addr().String())
	caFile := testutil.WriteFile(t, t.TempDir(), "ca.pem", ca.PEM)
	dir := writeHosts(t, host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", host, caFile))

	c := remote.New(remote.WithRetry(2, time.Millisecond), remote.WithMirrors(hostsMirrors(t.Context(), dir)),
		remote.WithTransport(&http.Transport{DialContext: fakeNet.DialContext}))
	if err := reg.read(t.Context(), c, host); err != nil {
		t.Errorf("read over HTTPS: %v", err)
	}
	if n := fakeNet.PlainConns(host); n != 0 {
		t.Errorf("%d plain-HTTP connections to %s", n, host)
	}
}

func TestCacheSizes(t *testing.T) {
	for in, want := range map[string]DiskSize{
		`214748364800`: {Bytes: 200 << 30},
		`0`:            {},
		`"200GiB"`:     {Bytes: 200 << 30},
		`'512MiB'`:     {Bytes: 512 << 20},
		`"50%"`:        {Share: 0.5},
		`" 12.5 %"`:    {Share: 0.125},
		`"100%"`:       {Share: 1},
	} {
		cfg, err := loadConfigText(t, "[cache]\nmax_bytes = "+in+"\nmin_free_bytes = "+in+"\n")
		if err != nil || cfg.Cache.MaxBytes != want || cfg.Cache.MinFreeBytes != want {
			t.Errorf("max_bytes = %s: %+v, %+v, %v; want %+v", in, cfg.Cache.MaxBytes, cfg.Cache.MinFreeBytes, err, want)
		}
	}
	for _, in := range []string{`-1`, `"150%"`, `"-5%"`, `"lots"`, `true`, `1.5`, `"%"`} {
		if cfg, err := loadConfigText(t, "[cache]\nmax_bytes = "+in+"\n"); err == nil {
			t.Errorf("max_bytes = %s accepted: %+v", in, cfg.Cache.MaxBytes)
		}
	}
	// The FUSE manager gets the configuration as JSON.
	b, err := json.Marshal(defaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	var back Config
	if err := json.Unmarshal(b, &back); err != nil || back.Cache != defaultConfig().Cache {
		t.Fatalf("JSON round trip: %+v, %v", back.Cache, err)
	}
}

func loadConfigText(t *testing.T, text string) (Config, error) {
	p := filepath.Join(t.TempDir(), "weightsnapd.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return loadConfig(p)
}

// TestCredentialProvidersConfigIsChecked fails a config whose plugin
// config cannot be loaded at start, not at the first private pull.
func TestCredentialProvidersConfigIsChecked(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "weightsnapd.toml")
	conf := "[credential_providers]\nconfig = \"" + filepath.Join(dir, "missing.yaml") + "\"\nbin_dir = \"" + dir + "\"\n"
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadConfig(path); err == nil || !strings.Contains(err.Error(), "credential provider config") {
		t.Fatalf("loadConfig with a missing plugin config: %v", err)
	}
}

func TestMemoryLimit(t *testing.T) {
	def := defaultConfig().Fetch
	if n, ok := memoryLimit(def, ""); !ok || n != 192<<20 {
		t.Errorf("default: limit %d, set %v; want 192 MiB, set", n, ok)
	}
	if _, ok := memoryLimit(def, "1GiB"); ok {
		t.Error("GOMEMLIMIT in the environment: the configured limit was set over it")
	}
	if _, ok := memoryLimit(FetchConfig{}, ""); ok {
		t.Error("memory_limit_bytes = 0: a limit was set")
	}
}
