package lazy

import (
	"context"

	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/remote"
)

// RemoteOptions is a Registry over remote's package functions.
func RemoteOptions(opts ...remote.Option) Registry { return remoteOptions(opts) }

type remoteOptions []remote.Option

func (o remoteOptions) Resolve(ctx context.Context, ref string) (*remote.Image, error) {
	return remote.Resolve(ctx, ref, o...)
}

func (o remoteOptions) OpenBlob(ctx context.Context, repo string, d digest.Digest, size int64) (*remote.Blob, error) {
	return remote.OpenBlob(ctx, repo, d, size, o...)
}
