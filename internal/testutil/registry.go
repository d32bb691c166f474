package testutil

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Registry is a running Debian docker-registry (the CNCF distribution
// registry) serving plain HTTP on a loopback port, with its own storage.
type Registry struct {
	// Addr is host:port, usable in image references ("Addr/repo:tag").
	Addr string
	// Dir is the registry's storage root directory.
	Dir string

	bin      string // the docker-registry binary
	config   string // its config file, for garbage-collect
	cmd      *exec.Cmd
	stderr   *syncBuffer
	exited   chan struct{} // closed once the process has been reaped
	waitErr  error         // valid after exited is closed
	stopOnce sync.Once
}

// RegistryOption configures StartRegistry.
type RegistryOption func(*registryConfig)

type registryConfig struct {
	remoteURL string
}

// WithPullThrough runs the registry as a pull-through cache of remoteURL
// (for example "http://127.0.0.1:5000"). Such a registry refuses pushes.
func WithPullThrough(remoteURL string) RegistryOption {
	return func(c *registryConfig) { c.remoteURL = remoteURL }
}

// registryBinary is where Debian's docker-registry package installs it.
const registryBinary = "docker-registry"

// registryStartAttempts bounds retries when another process takes the chosen
// port between our probe and the registry's bind (other engineers' tests run
// on this machine concurrently).
const registryStartAttempts = 3

// StartRegistry starts a registry and waits until it answers GET /v2/. It is
// stopped in t.Cleanup, and its stderr is logged if the test failed. It skips
// the test (fails it when CI=true) if docker-registry is not installed.
func StartRegistry(t testing.TB, opts ...RegistryOption) *Registry {
	t.Helper()
	var cfg registryConfig
	for _, o := range opts {
		o(&cfg)
	}
	bin := RequireBinary(t, registryBinary)
	dir := t.TempDir()
	var lastErr error
	for range registryStartAttempts {
		r, err := startRegistry(t.Context(), bin, dir, cfg)
		if err == nil {
			t.Cleanup(func() {
				r.Stop()
				if t.Failed() {
					t.Logf("registry %s stderr:\n%s", r.Addr, r.stderr.String())
				}
			})
			return r
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("start registry: %v", lastErr)
	return nil
}

func startRegistry(ctx context.Context, bin, dir string, cfg registryConfig) (*Registry, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	r := &Registry{
		Addr:   net.JoinHostPort("127.0.0.1", fmt.Sprint(port)),
		Dir:    filepath.Join(dir, "storage"),
		stderr: &syncBuffer{},
		exited: make(chan struct{}),
	}
	if err := os.MkdirAll(r.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("create storage dir: %w", err)
	}
	config := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %q
  delete:
    enabled: true
http:
  addr: %q
  secret: weightsnap-testutil
`, r.Dir, r.Addr)
	if cfg.remoteURL != "" {
		config += fmt.Sprintf("proxy:\n  remoteurl: %q\n", cfg.remoteURL)
	}
	configPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		return nil, fmt.Errorf("write config: %w", err)
	}
	r.bin, r.config = bin, configPath

	// Not exec.CommandContext: Stop, not the test's context, ends the process,
	// so it still runs while other cleanups that may need it run.
	r.cmd = exec.Command(bin, "serve", configPath)
	// A clean environment: the registry reads REGISTRY_* overrides from it.
	r.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	r.cmd.Stdout = r.stderr
	r.cmd.Stderr = r.stderr
	// Pdeathsig stops it if the test binary dies without its cleanups
	// (a -timeout panic).
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		r.waitErr = r.cmd.Wait()
		close(r.exited)
	}()
	if err := r.waitReady(ctx); err != nil {
		r.Stop()
		return nil, fmt.Errorf("%w; stderr:\n%s", err, r.stderr.String())
	}
	return r, nil
}

// waitReady polls GET /v2/ until it answers 200, the process exits, or a
// deadline passes.
func (r *Registry) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.URL()+"/v2/", nil)
		if err != nil {
			return err
		}
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-r.exited:
			return fmt.Errorf("registry exited before it was ready: %v", r.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("registry at %s not ready: %w", r.Addr, ctx.Err())
		case <-tick.C:
		}
	}
}

// URL returns the registry's base URL, "http://Addr".
func (r *Registry) URL() string { return "http://" + r.Addr }

// Stderr returns what the registry has written so far.
func (r *Registry) Stderr() string { return r.stderr.String() }

// Stop terminates the registry (SIGTERM, then SIGKILL if it lingers) and
// waits for it to exit. It may be called any number of times, for tests that
// take the registry away mid-way.
func (r *Registry) Stop() {
	r.stopOnce.Do(func() {
		_ = r.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-r.exited:
			return
		case <-time.After(5 * time.Second):
		}
		_ = r.cmd.Process.Kill()
		<-r.exited
	})
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// syncBuffer is a bytes.Buffer safe for a process writing while a test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Pid is the registry process's id, for measuring its CPU time.
func (r *Registry) Pid() int { return r.cmd.Process.Pid }
