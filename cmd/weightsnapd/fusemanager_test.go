package main

import (
	"context"
	"errors"
	"net"
	"net/rpc"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/credentials"
)

// blockingMounter is a LayerMounter whose mounts wait for a release.
type blockingMounter struct {
	started   chan string
	release   chan struct{}
	unmounted chan string
}

func (b *blockingMounter) Mount(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error {
	b.started <- mountpoint
	<-b.release
	return nil
}

func (b *blockingMounter) Check(ctx context.Context, mountpoint string) error { return nil }

func (b *blockingMounter) Unmount(ctx context.Context, mountpoint string) error {
	b.unmounted <- mountpoint
	return nil
}

// serveMounter serves m as the manager does and returns a client of it.
func serveMounter(t *testing.T, m *blockingMounter) *managerClient {
	return serveService(t, &mountService{m: m, keys: credentials.New(authn.NewMultiKeychain()), stopped: make(chan struct{})})
}

// serveService serves svc as the manager does and returns a client of it.
func serveService(t *testing.T, svc *mountService) *managerClient {
	srv := rpc.NewServer()
	if err := srv.RegisterName(rpcService, svc); err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("unix", filepath.Join(t.TempDir(), "m.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go srv.Accept(lis)
	conn, err := net.Dial("unix", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := &managerClient{c: rpc.NewClient(conn), dead: make(chan struct{})}
	t.Cleanup(func() { c.c.Close() })
	return c
}

// A mount the manager finishes after containerd gave up on it is undone:
// nobody else would ever unmount it.
func TestMountAfterCallerGaveUpIsUndone(t *testing.T) {
	m := &blockingMounter{started: make(chan string, 1), release: make(chan struct{}), unmounted: make(chan string, 1)}
	c := serveMounter(t, m)
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- c.Mount(ctx, "/mnt/layer", "reg/img:v1", digest.FromString("layer")) }()
	<-m.started
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Mount: %v, want context.Canceled", err)
	}
	close(m.release)
	if mp := <-m.unmounted; mp != "/mnt/layer" {
		t.Fatalf("unmounted %q", mp)
	}
}

func (b *blockingMounter) CachedBytes(ctx context.Context, mountpoint string) (int64, error) {
	if mountpoint != "/mnt/layer" {
		return 0, errors.New("not mounted")
	}
	return 12345, nil
}

// The snapshotter asks the manager what the cache holds for a layer.
func TestCachedBytesOverRPC(t *testing.T) {
	c := serveMounter(t, &blockingMounter{})
	if n, err := c.CachedBytes(t.Context(), "/mnt/layer"); n != 12345 || err != nil {
		t.Fatalf("CachedBytes = %d, %v", n, err)
	}
	if _, err := c.CachedBytes(t.Context(), "/mnt/other"); err == nil {
		t.Fatal("CachedBytes of no mount: no error")
	}
}

// Credentials the snapshotter process keeps (from a CRI PullImage) reach
// the manager's keychain, which its registry client reads.
func TestCredentialsOverRPC(t *testing.T) {
	keys := credentials.New(authn.NewMultiKeychain())
	c := serveService(t, &mountService{m: &blockingMounter{}, keys: keys, stopped: make(chan struct{})})
	cfg := authn.AuthConfig{Username: "alice", Password: "a-secret"}
	if err := c.keepCredentials(t.Context(), "registry.test:5000", "models/llama", cfg); err != nil {
		t.Fatal(err)
	}
	repo, err := name.NewRepository("registry.test:5000/models/llama")
	if err != nil {
		t.Fatal(err)
	}
	a, err := keys.Resolve(repo)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := a.Authorization(); err != nil || *got != cfg {
		t.Errorf("the manager's keychain answers %+v, %v; want %+v", got, err, cfg)
	}
	if err := c.keepCredentials(t.Context(), "registry.test:5000", "Not A Repository", cfg); err == nil {
		t.Error("credentials for an invalid repository were kept")
	}
}

// namespaceMounter records the containerd namespace each call arrives in.
type namespaceMounter struct {
	blockingMounter
	mounts, warms chan string
}

func (n *namespaceMounter) Mount(ctx context.Context, mountpoint, imageRef string, d digest.Digest) error {
	n.mounts <- namespaceOf(ctx)
	return nil
}

func (n *namespaceMounter) Warm(ctx context.Context, imageRef string, layers []digest.Digest) {
	n.warms <- namespaceOf(ctx)
}

// The containerd namespace of a Prepare reaches the manager's Mount and
// Warm, in which their resolve reads containerd's content store.
func TestNamespaceOverRPC(t *testing.T) {
	m := &namespaceMounter{mounts: make(chan string, 1), warms: make(chan string, 1)}
	c := serveService(t, &mountService{m: m, keys: credentials.New(authn.NewMultiKeychain()), stopped: make(chan struct{})})
	ctx := withNamespace(t.Context(), "k8s.io")
	if err := c.Mount(ctx, "/mnt/layer", "reg/img@"+digest.FromString("m").String(), digest.FromString("layer")); err != nil {
		t.Fatal(err)
	}
	if ns := <-m.mounts; ns != "k8s.io" {
		t.Errorf("Mount's namespace in the manager: %q, want k8s.io", ns)
	}
	c.Warm(ctx, "reg/img@"+digest.FromString("m").String(), []digest.Digest{digest.FromString("other")})
	if ns := <-m.warms; ns != "k8s.io" {
		t.Errorf("Warm's namespace in the manager: %q, want k8s.io", ns)
	}
	if err := c.Mount(t.Context(), "/mnt/layer2", "reg/img:v1", digest.FromString("layer")); err != nil {
		t.Fatal(err)
	}
	if ns := <-m.mounts; ns != "" {
		t.Errorf("a Mount without a namespace arrives in %q", ns)
	}
}
