package main

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/services/content/contentserver"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// serveContent serves containerd's content service over a local content
// store on a unix socket, as containerd does, and returns the socket and
// the store. Every call must carry containerd namespace ns.
func serveContent(t *testing.T, ns string) (string, content.Store) {
	t.Helper()
	dir := t.TempDir()
	store, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "c.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if got := metadata.ValueFromIncomingContext(ss.Context(), "containerd-namespace"); len(got) != 1 || got[0] != ns {
			return status.Errorf(codes.InvalidArgument, "namespace %v, want %s", got, ns)
		}
		return handler(srv, ss)
	}))
	contentapi.RegisterContentServer(srv, contentserver.New(store))
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return sock, store
}

// TestContainerdContent reads blobs through containerd's content service:
// whole, as the store holds them; not at all without a namespace, or when
// larger than asked for, or absent.
func TestContainerdContent(t *testing.T) {
	sock, store := serveContent(t, "k8s.io")
	small := []byte(`{"schemaVersion":2}`)
	large := bytes.Repeat([]byte("x"), 3<<20) // several messages of the stream
	for _, b := range [][]byte{small, large} {
		d := digest.FromBytes(b)
		if err := content.WriteBlob(t.Context(), store, d.String(), bytes.NewReader(b), ocispec.Descriptor{Digest: d, Size: int64(len(b))}); err != nil {
			t.Fatal(err)
		}
	}
	// Written as containerd's and crictl's flags take it.
	cc := &containerdContent{address: "unix://" + sock}
	t.Cleanup(func() { cc.Close() })
	ctx := withNamespace(t.Context(), "k8s.io")

	for _, b := range [][]byte{small, large} {
		got, err := cc.Get(ctx, digest.FromBytes(b), int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, b) {
			t.Fatalf("read %d bytes, want the %d stored", len(got), len(b))
		}
	}
	if _, err := cc.Get(ctx, digest.FromBytes(large), int64(len(large))-1); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("a blob larger than max: err %v, want one saying so", err)
	}
	if _, err := cc.Get(ctx, digest.FromString("absent"), 1<<20); err == nil {
		t.Error("an absent blob: no error")
	}
	if _, err := cc.Get(context.Background(), digest.FromBytes(small), 1<<20); err != errNoNamespace {
		t.Errorf("no namespace: err %v, want %v", err, errNoNamespace)
	}
	if _, err := cc.Get(withNamespace(t.Context(), "default"), digest.FromBytes(small), 1<<20); err == nil {
		t.Error("another namespace than the server's: no error")
	}
}

// TestContainerdContentNotRunning: with no containerd at the address, a
// read fails at once (the caller asks the registry).
func TestContainerdContentNotRunning(t *testing.T) {
	cc := &containerdContent{address: filepath.Join(t.TempDir(), "absent.sock")}
	t.Cleanup(func() { cc.Close() })
	_, err := cc.Get(withNamespace(t.Context(), "k8s.io"), digest.FromString("x"), 1<<20)
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("no containerd: err %v, want unavailable", err)
	}
	if !cc.warned.Load() {
		t.Error("no containerd: not reported")
	}
}
