package pack

import (
	"context"
	"fmt"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Push uploads img to ref ("host[:port]/repo:tag" or "…@sha256:…") with
// credentials from the default keychain (docker config, credential
// helpers). plainHTTP talks HTTP instead of HTTPS; loopback and private
// addresses use HTTP anyway. Blobs the registry already has (answered by a
// HEAD per blob) are not uploaded again, so re-pushing an unchanged model
// only sends its manifest.
//
// If progress is not nil it receives the bytes done and total as blobs are
// sent (existing blobs count as done) and an update carrying the error on
// failure, and it is closed when Push returns. Sends block: the caller
// must drain progress concurrently, until it is closed.
func Push(ctx context.Context, img v1.Image, ref string, plainHTTP bool, progress chan<- v1.Update) error {
	var nopts []name.Option
	if plainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	r, err := name.ParseReference(ref, nopts...)
	if err != nil {
		if progress != nil {
			close(progress)
		}
		return fmt.Errorf("push: %w", err)
	}
	opts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
	}
	if progress != nil {
		// ggcr closes the channel when Write returns.
		opts = append(opts, remote.WithProgress(progress))
	}
	if err := remote.Write(r, img, opts...); err != nil {
		return fmt.Errorf("push %s: %w", r, err)
	}
	return nil
}
