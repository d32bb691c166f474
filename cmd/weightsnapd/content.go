package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// containerdContent reads blobs from containerd's content store: at an
// image's first Prepare, containerd's pull has put the image's manifest
// and config there, and reading them here spares the FUSE manager two
// requests to the registry, one after the other, before the layer is
// mounted. The namespace
// is the Prepare's (withNamespace). What it returns is checked against
// its digest by the caller (remote.WithLocalContent), as the registry's
// answers are: containerd is trusted no more than the registry.
type containerdContent struct {
	address string // containerd's socket; "unix://" before it is allowed

	warned atomic.Bool // that containerd could not be reached
	once   sync.Once
	conn   *grpc.ClientConn
	client contentapi.ContentClient
	err    error
}

// errNoNamespace: a Mount without a containerd namespace (from a process
// that does not pass it) reads from the registry.
var errNoNamespace = errors.New("no containerd namespace")

// Get returns blob d, if containerd holds it in the context's namespace
// and it is at most max bytes.
func (c *containerdContent) Get(ctx context.Context, d digest.Digest, max int64) ([]byte, error) {
	if _, ok := namespaces.Namespace(ctx); !ok {
		return nil, errNoNamespace
	}
	client, err := c.dial()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream if it is left early
	// One byte more than max shows a blob that is larger.
	stream, err := client.Read(ctx, &contentapi.ReadContentRequest{Digest: d.String(), Size: max + 1})
	if err != nil {
		return nil, c.failed(ctx, err)
	}
	var b []byte
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return nil, c.failed(ctx, err)
		}
		if r.Offset != int64(len(b)) {
			return nil, fmt.Errorf("containerd content %s: data at %d, want %d", d, r.Offset, len(b))
		}
		if int64(len(b)+len(r.Data)) > max {
			return nil, fmt.Errorf("containerd content %s: larger than %d bytes", d, max)
		}
		b = append(b, r.Data...)
	}
}

// failed converts a gRPC error; the first time containerd cannot be
// reached it says so where an operator looks, since every image then
// costs the registry two requests more: a wrong address (k3s has its own)
// or a socket not mounted into weightsnapd's container.
func (c *containerdContent) failed(ctx context.Context, err error) error {
	err = errgrpc.ToNative(err)
	if errdefs.IsUnavailable(err) && !c.warned.Swap(true) {
		log.G(ctx).WithError(err).WithField("address", c.address).Warn("containerd's content store cannot be reached: images' manifests and configs come from the registry")
	}
	return err
}

// dial connects once, on first use: containerd may start after weightsnapd
// (its proxy plugin dials weightsnapd), and gRPC reconnects on its own.
func (c *containerdContent) dial() (contentapi.ContentClient, error) {
	c.once.Do(func() {
		conn, err := grpc.NewClient("unix://"+strings.TrimPrefix(c.address, "unix://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			c.err = fmt.Errorf("containerd at %s: %w", c.address, err)
			return
		}
		c.conn, c.client = conn, contentapi.NewContentClient(conn)
	})
	return c.client, c.err
}

// Close closes the connection, if one was made.
func (c *containerdContent) Close() error {
	c.once.Do(func() { c.err = errors.New("closed") })
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// withNamespace returns ctx in containerd namespace ns (none if empty).
func withNamespace(ctx context.Context, ns string) context.Context {
	if ns == "" {
		return ctx
	}
	return namespaces.WithNamespace(ctx, ns)
}

// namespaceOf returns the containerd namespace of ctx ("" if none): that of
// the containerd request being served.
func namespaceOf(ctx context.Context) string {
	ns, _ := namespaces.Namespace(ctx)
	return ns
}
