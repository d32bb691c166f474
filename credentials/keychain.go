// Package credentials owns the registry credentials kubelet hands to the
// node: the auth of each CRI PullImage, kept in memory per registry host and
// repository, and answered as an authn.Keychain before the docker
// config.json. Nothing here is written to disk or logged.
package credentials

import (
	"context"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Keychain answers, for a repository on a registry host, the credentials
// last kept for exactly that host and repository, else those of its
// fallback (authn.DefaultKeychain: the docker config.json). A registry
// host is the one the credentials were given for: a mirror, being another
// host, never gets them. A Keychain is safe for concurrent use.
type Keychain struct {
	fallback authn.Keychain

	mu   sync.RWMutex
	kept map[key]authn.AuthConfig
}

// key is a repository on one registry host, as go-containerregistry
// names them (Docker Hub is "index.docker.io", "library/" added).
type key struct{ registry, repository string }

var _ authn.Keychain = (*Keychain)(nil)

// New returns an empty Keychain over fallback; nil means
// authn.DefaultKeychain.
func New(fallback authn.Keychain) *Keychain {
	if fallback == nil {
		fallback = authn.DefaultKeychain
	}
	return &Keychain{fallback: fallback, kept: make(map[key]authn.AuthConfig)}
}

// Put keeps cfg for repository on registry, replacing what was kept for
// them; an empty cfg forgets it. registry and repository are normalized
// as in image references ("docker.io" is "index.docker.io").
func (k *Keychain) Put(registry, repository string, cfg authn.AuthConfig) error {
	repo, err := name.NewRepository(registry+"/"+repository, name.WeakValidation)
	if err != nil {
		return err
	}
	kk := keyOf(repo)
	k.mu.Lock()
	defer k.mu.Unlock()
	if cfg == (authn.AuthConfig{}) {
		delete(k.kept, kk)
	} else {
		k.kept[kk] = cfg
	}
	return nil
}

// Repository returns the registry host and repository of image, a
// reference as kubelet passes it to PullImage ("nginx",
// "registry:5000/models/llama@sha256:…"), normalized as Put keys them.
func Repository(image string) (registry, repository string, err error) {
	ref, err := name.ParseReference(image, name.WeakValidation)
	if err != nil {
		return "", "", err
	}
	return ref.Context().RegistryStr(), ref.Context().RepositoryStr(), nil
}

func keyOf(r name.Repository) key {
	return key{registry: r.RegistryStr(), repository: r.RepositoryStr()}
}

// lookup returns what is kept for kk.
func (k *Keychain) lookup(kk key) (authn.AuthConfig, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	cfg, ok := k.kept[kk]
	return cfg, ok
}

// Resolve implements authn.Keychain. A target that names no repository
// (a name.Registry) gets the fallback's answer. For a repository, the
// authenticator is read at each use, so credentials kept after a login
// (a later PullImage, rotated secrets) serve its next request or token;
// the fallback is read once, here, as go-containerregistry does.
func (k *Keychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), target)
}

// ResolveContext implements authn.ContextKeychain.
func (k *Keychain) ResolveContext(ctx context.Context, target authn.Resource) (authn.Authenticator, error) {
	fb, err := authn.Resolve(ctx, k.fallback, target)
	if err != nil {
		return nil, err
	}
	repo, ok := target.(name.Repository)
	if !ok {
		return fb, nil
	}
	return &authenticator{k: k, key: keyOf(repo), fallback: fb}, nil
}

// authenticator is the credentials of one repository, looked up at each
// use.
type authenticator struct {
	k        *Keychain
	key      key
	fallback authn.Authenticator
}

// Authorization implements authn.Authenticator.
func (a *authenticator) Authorization() (*authn.AuthConfig, error) {
	return a.AuthorizationContext(context.Background())
}

// AuthorizationContext implements authn.ContextAuthenticator.
func (a *authenticator) AuthorizationContext(ctx context.Context) (*authn.AuthConfig, error) {
	if cfg, ok := a.k.lookup(a.key); ok {
		return &cfg, nil
	}
	return authn.Authorization(ctx, a.fallback)
}

// String keeps the credentials out of anything that prints the
// authenticator.
func (a *authenticator) String() string {
	return "credentials for " + a.key.registry + "/" + a.key.repository
}
