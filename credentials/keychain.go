// Package credentials owns the registry credentials of the node, answered
// as an authn.Keychain from three sources in order: the auth of each CRI
// PullImage kubelet made, kept in memory per registry host and repository;
// kubelet's credential provider plugins, run as kubelet runs them; the
// docker config.json, read again when it changes. A credential the
// registry refused gives way to the next source. Nothing here is written
// to disk or logged.
package credentials

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"context"
	"github.com/containerd/log"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Keychain answers, for a repository on a registry host, the credentials
// last kept for exactly that host and repository, else those the
// credential provider plugins give for it (WithPlugins), else those of its
// fallback (authn.DefaultKeychain: the docker config.json). A registry
// host is the one the credentials were given for: a mirror, being another
// host, never gets them. A Keychain is safe for concurrent use.
type Keychain struct {
	fallback authn.Keychain
	plugins  *Plugins
	stamp    func() string // the fallback's files, as their sizes and times

	mu   sync.RWMutex
	kept map[key]authn.AuthConfig
	// read is the fallback's answer per repository and the stamp of its
	// files when it was read.
	read map[key]fallbackRead
	// refused is, per repository, the credentials a registry refused, in
	// the order it did; every source skips them.
	refused map[key][]authn.AuthConfig
}

type fallbackRead struct {
	cfg   authn.AuthConfig
	stamp string
}

// Option configures a Keychain.
type Option func(*Keychain)

// WithPlugins answers repositories that nothing kept covers with what
// kubelet's credential provider plugins give, before the fallback.
func WithPlugins(p *Plugins) Option {
	return func(k *Keychain) { k.plugins = p }
}

// key is a repository on one registry host, as go-containerregistry
// names them (Docker Hub is "index.docker.io", "library/" added).
type key struct{ registry, repository string }

var _ authn.Keychain = (*Keychain)(nil)

// New returns an empty Keychain over fallback; nil means
// authn.DefaultKeychain.
func New(fallback authn.Keychain, opts ...Option) *Keychain {
	if fallback == nil {
		fallback = authn.DefaultKeychain
	}
	k := &Keychain{
		fallback: fallback,
		stamp:    dockerConfigStamp,
		kept:     make(map[key]authn.AuthConfig),
		read:     make(map[key]fallbackRead),
		refused:  make(map[key][]authn.AuthConfig),
	}
	for _, o := range opts {
		o(k)
	}
	return k
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
// authenticator walks the sources at each use, so credentials kept after a
// login (a later PullImage, a plugin's renewed password, an edited docker
// config.json) serve its next request or token.
func (k *Keychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), target)
}

// ResolveContext implements authn.ContextKeychain.
func (k *Keychain) ResolveContext(ctx context.Context, target authn.Resource) (authn.Authenticator, error) {
	repo, ok := target.(name.Repository)
	if !ok {
		return authn.Resolve(ctx, k.fallback, target)
	}
	return &authenticator{k: k, repo: repo, key: keyOf(repo)}, nil
}

// candidates returns the credentials of each source for a, in order.
func (k *Keychain) candidates(ctx context.Context, a *authenticator) []candidate {
	var out []candidate
	if cfg, ok := k.lookup(a.key); ok {
		out = append(out, candidate{cfg: cfg, from: "kubelet"})
	}
	if k.plugins != nil {
		cfgs, err := k.plugins.credentials(ctx, a.image())
		if err != nil {
			log.G(ctx).WithError(err).WithField("repo", a.image()).Warn("credential provider failed")
		}
		for _, cfg := range cfgs {
			out = append(out, candidate{cfg: cfg, from: "plugin"})
		}
	}
	cfg, err := k.fromFallback(ctx, a)
	if err != nil {
		log.G(ctx).WithError(err).WithField("repo", a.image()).Warn("reading the docker config failed")
	} else {
		out = append(out, candidate{cfg: cfg, from: "docker-config"})
	}
	return out
}

type candidate struct {
	cfg  authn.AuthConfig
	from string
}

// fromFallback returns the fallback's answer for a, asked again when its
// files changed.
func (k *Keychain) fromFallback(ctx context.Context, a *authenticator) (authn.AuthConfig, error) {
	stamp := k.stamp()
	k.mu.RLock()
	r, ok := k.read[a.key]
	k.mu.RUnlock()
	if ok && r.stamp == stamp {
		return r.cfg, nil
	}
	auth, err := authn.Resolve(ctx, k.fallback, a.repo)
	if err != nil {
		return authn.AuthConfig{}, err
	}
	cfg, err := authn.Authorization(ctx, auth)
	if err != nil {
		return authn.AuthConfig{}, err
	}
	k.mu.Lock()
	k.read[a.key] = fallbackRead{cfg: *cfg, stamp: stamp}
	k.mu.Unlock()
	return *cfg, nil
}

// choose returns the first of cands the registry has not refused. When it
// refused them all, the refusals are forgotten and the first is given
// again: a registry that refused everything for a while does not lock the
// repository out for good.
func (k *Keychain) choose(kk key, cands []candidate) (candidate, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, c := range cands {
		if !slices.Contains(k.refused[kk], c.cfg) {
			return c, true
		}
	}
	delete(k.refused, kk)
	if len(cands) == 0 {
		return candidate{}, false
	}
	return cands[0], true
}

// maxRefused bounds the refusals kept per repository.
const maxRefused = 16

// refuse notes that the registry refused cfg for a, drops a plugin's
// cached answer that gave it, and reports whether a source has another
// credential to try.
func (k *Keychain) refuse(ctx context.Context, a *authenticator, cfg authn.AuthConfig) bool {
	k.mu.Lock()
	r := append(k.refused[a.key], cfg)
	if len(r) > maxRefused {
		r = r[len(r)-maxRefused:]
	}
	k.refused[a.key] = r
	k.mu.Unlock()
	if k.plugins != nil {
		k.plugins.forget(a.image(), cfg)
	}
	k.mu.RLock()
	refused := slices.Clone(k.refused[a.key])
	k.mu.RUnlock()
	for _, c := range k.candidates(ctx, a) {
		if !slices.Contains(refused, c.cfg) {
			return true
		}
	}
	return false
}

// authenticator is the credentials of one repository, looked up at each
// use. It remembers what it gave last, which is what Refused refuses.
type authenticator struct {
	k    *Keychain
	repo name.Repository
	key  key

	mu   sync.Mutex
	last *authn.AuthConfig
}

// image is the repository as kubelet names images to its plugins:
// "docker.io/library/nginx", "registry:5000/models/llama".
func (a *authenticator) image() string {
	reg := a.key.registry
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return reg + "/" + a.key.repository
}

// Authorization implements authn.Authenticator.
func (a *authenticator) Authorization() (*authn.AuthConfig, error) {
	return a.AuthorizationContext(context.Background())
}

// AuthorizationContext implements authn.ContextAuthenticator: the first
// credentials, in source order, that the registry has not refused.
func (a *authenticator) AuthorizationContext(ctx context.Context) (*authn.AuthConfig, error) {
	c, ok := a.k.choose(a.key, a.k.candidates(ctx, a))
	a.mu.Lock()
	defer a.mu.Unlock()
	if !ok {
		a.last = nil
		return &authn.AuthConfig{}, nil
	}
	cfg := c.cfg
	a.last = &cfg
	log.G(ctx).WithFields(log.Fields{"repo": a.image(), "source": c.from}).Debug("registry credentials")
	return &cfg, nil
}

// Refused tells a that the registry refused the credentials it gave last,
// so that its next answer comes from the next source; it reports whether
// there is one. A plugin's cached answer that gave them is dropped, so the
// plugin runs again.
func (a *authenticator) Refused(ctx context.Context) bool {
	a.mu.Lock()
	last := a.last
	a.mu.Unlock()
	if last == nil {
		return false
	}
	return a.k.refuse(ctx, a, *last)
}

// String keeps the credentials out of anything that prints the
// authenticator.
func (a *authenticator) String() string {
	return "credentials for " + a.key.registry + "/" + a.key.repository
}

// dockerConfigStamp is the sizes and modification times of the files
// authn.DefaultKeychain reads: a change to any of them asks it again.
func dockerConfigStamp() string {
	var paths []string
	if home, err := os.UserHomeDir(); err == nil {
		paths = append(paths, filepath.Join(home, ".docker", "config.json"), filepath.Join(home, ".config", "containers", "auth.json"))
	}
	for _, p := range []string{
		filepath.Join(os.Getenv("DOCKER_CONFIG"), "config.json"),
		os.Getenv("REGISTRY_AUTH_FILE"),
		filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "containers", "auth.json"),
		filepath.Join(os.Getenv("XDG_CONFIG_HOME"), "containers", "auth.json"),
	} {
		paths = append(paths, p)
	}
	var b strings.Builder
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			// The inode too: an editor that renames a new file into place
			// within the clock's resolution changes only that.
			var ino uint64
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				ino = st.Ino
			}
			fmt.Fprintf(&b, "%s %d %d %d;", p, fi.Size(), fi.ModTime().UnixNano(), ino)
		} else {
			fmt.Fprintf(&b, "%s -;", p)
		}
	}
	return b.String()
}
