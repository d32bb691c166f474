package imagebuild

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// WriteLayout writes img as the only image of a new OCI layout in dir,
// replacing what dir held, its manifest annotated with refName
// (org.opencontainers.image.ref.name) when that is not empty.
func WriteLayout(dir string, img v1.Image, refName string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	add := mutate.IndexAddendum{Add: img}
	if refName != "" {
		add.Descriptor.Annotations = map[string]string{"org.opencontainers.image.ref.name": refName}
	}
	if _, err := layout.Write(dir, mutate.AppendManifests(empty.Index, add)); err != nil {
		return fmt.Errorf("writing OCI layout %s: %w", dir, err)
	}
	return nil
}

// Push pushes img to ref (host/repo:tag) with the credentials of the
// docker config.json and returns the reference by digest. Loopback
// registries are spoken to over plain HTTP; plainHTTP extends that to ref's
// host whatever it is.
func Push(ctx context.Context, ref string, img v1.Image, plainHTTP bool) (name.Digest, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return name.Digest{}, err
	}
	if plainHTTP || loopback(r.Context().RegistryStr()) {
		if r, err = name.ParseReference(ref, name.Insecure); err != nil {
			return name.Digest{}, err
		}
	}
	if err := remote.Write(r, img, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return name.Digest{}, fmt.Errorf("pushing %s: %w", r, err)
	}
	d, err := img.Digest()
	if err != nil {
		return name.Digest{}, err
	}
	return r.Context().Digest(d.String()), nil
}

// loopback reports whether a registry host[:port] is on this machine.
func loopback(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
