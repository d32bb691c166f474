package credentials

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"go.yaml.in/yaml/v3"
)

// Credential provider plugins are run as kubelet runs them (KEP-2133): the
// same CredentialProviderConfig file, the same executables from the same
// directory, a CredentialProviderRequest on stdin and a
// CredentialProviderResponse on stdout, whose auth is cached for as long
// as the plugin says, by image, registry or globally.

const (
	configKind   = "CredentialProviderConfig"
	pluginAPI    = "credentialprovider.kubelet.k8s.io/v1"
	requestKind  = "CredentialProviderRequest"
	responseKind = "CredentialProviderResponse"

	// pluginTimeout bounds one run of a plugin, as kubelet's does.
	pluginTimeout = time.Minute
	// maxPluginOutput bounds what a plugin may write on stdout and stderr.
	maxPluginOutput = 1 << 20
)

// configAPIs are the CredentialProviderConfig versions kubelet reads whose
// fields used here are the same.
var configAPIs = map[string]bool{
	"kubelet.config.k8s.io/v1":      true,
	"kubelet.config.k8s.io/v1beta1": true,
}

// providerConfig is kubelet's CredentialProviderConfig, the part used here.
type providerConfig struct {
	APIVersion string     `json:"apiVersion" yaml:"apiVersion"`
	Kind       string     `json:"kind" yaml:"kind"`
	Providers  []provider `json:"providers" yaml:"providers"`
}

type provider struct {
	Name                 string   `json:"name" yaml:"name"`
	MatchImages          []string `json:"matchImages" yaml:"matchImages"`
	DefaultCacheDuration string   `json:"defaultCacheDuration" yaml:"defaultCacheDuration"`
	APIVersion           string   `json:"apiVersion" yaml:"apiVersion"`
	Args                 []string `json:"args" yaml:"args"`
	Env                  []struct {
		Name  string `json:"name" yaml:"name"`
		Value string `json:"value" yaml:"value"`
	} `json:"env" yaml:"env"`
}

type pluginRequest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Image      string `json:"image"`
}

type pluginResponse struct {
	APIVersion    string  `json:"apiVersion"`
	Kind          string  `json:"kind"`
	CacheKeyType  string  `json:"cacheKeyType"`
	CacheDuration *string `json:"cacheDuration"`
	Auth          map[string]struct {
		Username string `json:"username"`
		Password string `json:"password"`
	} `json:"auth"`
}

// Plugins runs the credential provider plugins of one
// CredentialProviderConfig. It is safe for concurrent use.
type Plugins struct {
	plugins []*plugin
	now     func() time.Time // tests move time
}

// plugin is one provider of the config and its cache.
type plugin struct {
	name        string
	path        string
	args        []string
	env         []string
	matchImages []string
	defaultTTL  time.Duration

	// mu serializes runs (one per image at a time is what kubelet's
	// single flight gives) and guards cache.
	mu    sync.Mutex
	cache map[string]cached
}

// cached is one response, kept until expires, under its cache key.
type cached struct {
	keys    []string // the response's match keys, most specific first
	auth    map[string]authn.AuthConfig
	expires time.Time
}

// LoadPlugins reads kubelet's CredentialProviderConfig (YAML or JSON) at
// configPath, whose plugins are executables in binDir.
func LoadPlugins(configPath, binDir string) (*Plugins, error) {
	b, err := os.ReadFile(configPath)
	if err != nil {
		return nil, fmt.Errorf("credential provider config: %w", err)
	}
	var c providerConfig
	if err := yaml.Unmarshal(b, &c); err != nil { // JSON is YAML
		return nil, fmt.Errorf("credential provider config %s: %w", configPath, err)
	}
	if !configAPIs[c.APIVersion] || c.Kind != configKind {
		return nil, fmt.Errorf("credential provider config %s: apiVersion %q kind %q: want kubelet.config.k8s.io/v1 %s", configPath, c.APIVersion, c.Kind, configKind)
	}
	p := &Plugins{now: time.Now}
	for i, pc := range c.Providers {
		pl, err := newPlugin(pc, binDir)
		if err != nil {
			return nil, fmt.Errorf("credential provider config %s: providers[%d]: %w", configPath, i, err)
		}
		p.plugins = append(p.plugins, pl)
	}
	return p, nil
}

func newPlugin(pc provider, binDir string) (*plugin, error) {
	if pc.Name == "" || pc.Name == "." || pc.Name == ".." || strings.ContainsRune(pc.Name, '/') {
		return nil, fmt.Errorf("name %q is not a file name", pc.Name)
	}
	if pc.APIVersion != pluginAPI {
		return nil, fmt.Errorf("%s: apiVersion %q: want %s", pc.Name, pc.APIVersion, pluginAPI)
	}
	if len(pc.MatchImages) == 0 {
		return nil, fmt.Errorf("%s: no matchImages", pc.Name)
	}
	for _, m := range pc.MatchImages {
		if _, err := parseSchemeless(m); err != nil {
			return nil, fmt.Errorf("%s: matchImages %q: %w", pc.Name, m, err)
		}
	}
	ttl, err := time.ParseDuration(pc.DefaultCacheDuration)
	if err != nil || ttl < 0 {
		return nil, fmt.Errorf("%s: defaultCacheDuration %q: want a duration such as 10m", pc.Name, pc.DefaultCacheDuration)
	}
	path := filepath.Join(binDir, pc.Name)
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("%s: %w", pc.Name, err)
	}
	env := os.Environ()
	for _, e := range pc.Env {
		env = append(env, e.Name+"="+e.Value)
	}
	return &plugin{
		name: pc.Name, path: path, args: pc.Args, env: env,
		matchImages: pc.MatchImages, defaultTTL: ttl,
		cache: make(map[string]cached),
	}, nil
}

// credentials returns, for image (a repository "host[:port]/path", as
// kubelet names it), the credentials the matching plugins give, in
// provider order and, within one response, the most specific match key
// first. A plugin that fails is skipped; its error is returned with the
// credentials of the others.
func (p *Plugins) credentials(ctx context.Context, image string) ([]authn.AuthConfig, error) {
	var out []authn.AuthConfig
	var errs []error
	for _, pl := range p.plugins {
		if !matchesAny(pl.matchImages, image) {
			continue
		}
		c, err := pl.get(ctx, image, p.now)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, k := range c.keys {
			if match(k, image) {
				out = append(out, c.auth[k])
			}
		}
	}
	return out, errors.Join(errs...)
}

// forget drops every cached response that gave cfg for image, so that the
// next request runs the plugin again.
func (p *Plugins) forget(image string, cfg authn.AuthConfig) {
	for _, pl := range p.plugins {
		pl.mu.Lock()
		for k, c := range pl.cache {
			for _, key := range c.keys {
				if c.auth[key] == cfg && match(key, image) {
					delete(pl.cache, k)
					break
				}
			}
		}
		pl.mu.Unlock()
	}
}

// get returns the cached response for image, running the plugin when there
// is none or it expired.
func (pl *plugin) get(ctx context.Context, image string, now func() time.Time) (cached, error) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	t := now()
	for _, k := range []string{image, registryOf(image), ""} {
		if c, ok := pl.cache[k]; ok {
			if t.Before(c.expires) {
				return c, nil
			}
			delete(pl.cache, k)
		}
	}
	resp, err := pl.run(ctx, image)
	if err != nil {
		return cached{}, err
	}
	c := cached{auth: make(map[string]authn.AuthConfig, len(resp.Auth))}
	for k, a := range resp.Auth {
		if _, err := parseSchemeless(k); err != nil {
			return cached{}, fmt.Errorf("credential provider %s: auth key %q: %w", pl.name, k, err)
		}
		c.keys = append(c.keys, k)
		c.auth[k] = authn.AuthConfig{Username: a.Username, Password: a.Password}
	}
	// kubelet's order: reverse lexical, so longer, more specific keys first.
	sort.Sort(sort.Reverse(sort.StringSlice(c.keys)))
	ttl := pl.defaultTTL
	if resp.CacheDuration != nil {
		if ttl, err = time.ParseDuration(*resp.CacheDuration); err != nil {
			return cached{}, fmt.Errorf("credential provider %s: cacheDuration %q: %w", pl.name, *resp.CacheDuration, err)
		}
	}
	if ttl > 0 {
		var key string
		switch resp.CacheKeyType {
		case "Image":
			key = image
		case "Registry":
			key = registryOf(image)
		case "Global":
			key = ""
		}
		c.expires = t.Add(ttl)
		pl.cache[key] = c
	}
	return c, nil
}

// run executes the plugin for image.
func (pl *plugin) run(ctx context.Context, image string) (*pluginResponse, error) {
	req, err := json.Marshal(pluginRequest{APIVersion: pluginAPI, Kind: requestKind, Image: image})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, pluginTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, pl.path, pl.args...)
	cmd.Env = pl.env
	cmd.Stdin = bytes.NewReader(req)
	stdout := &limitedBuffer{max: maxPluginOutput}
	stderr := &limitedBuffer{max: maxPluginOutput}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.WaitDelay = time.Second // a child holding the pipes open does not hold us
	if err := cmd.Run(); err != nil {
		// stderr is the plugin's own message; it is not expected to carry
		// secrets, but only its start is kept.
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 512 {
			msg = msg[:512]
		}
		return nil, fmt.Errorf("credential provider %s: %w: %s", pl.name, err, msg)
	}
	if stdout.overflow {
		return nil, fmt.Errorf("credential provider %s: response longer than %d bytes", pl.name, maxPluginOutput)
	}
	var resp pluginResponse
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	if err := dec.Decode(&resp); err != nil {
		return nil, fmt.Errorf("credential provider %s: response: %w", pl.name, err)
	}
	if resp.APIVersion != pluginAPI || resp.Kind != responseKind {
		return nil, fmt.Errorf("credential provider %s: response apiVersion %q kind %q: want %s %s", pl.name, resp.APIVersion, resp.Kind, pluginAPI, responseKind)
	}
	switch resp.CacheKeyType {
	case "Image", "Registry", "Global":
	default:
		return nil, fmt.Errorf("credential provider %s: cacheKeyType %q: want Image, Registry or Global", pl.name, resp.CacheKeyType)
	}
	return &resp, nil
}

// limitedBuffer keeps the first max bytes written to it and notes whether
// more came.
type limitedBuffer struct {
	bytes.Buffer
	max      int
	overflow bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); len(p) > room {
		b.overflow = true
		b.Buffer.Write(p[:max(room, 0)])
		return len(p), nil
	}
	return b.Buffer.Write(p)
}

var _ io.Writer = (*limitedBuffer)(nil)

// registryOf is the host[:port] of image.
func registryOf(image string) string {
	host, _, _ := strings.Cut(image, "/")
	return host
}

// matchesAny reports whether image matches one of patterns.
func matchesAny(patterns []string, image string) bool {
	for _, p := range patterns {
		if match(p, image) {
			return true
		}
	}
	return false
}

// match is kubelet's URLsMatchStr: pattern and image are read as URLs
// without a scheme; their ports must be equal, their host names have as
// many dot-separated labels and each label of the pattern matches the
// image's as a glob (filepath.Match: "*" within one label), and the
// pattern's path is a prefix of the image's.
func match(pattern, image string) bool {
	g, err := parseSchemeless(pattern)
	if err != nil {
		return false
	}
	t, err := parseSchemeless(image)
	if err != nil {
		return false
	}
	if g.Port() != t.Port() {
		return false
	}
	gl, tl := strings.Split(g.Hostname(), "."), strings.Split(t.Hostname(), ".")
	if len(gl) != len(tl) {
		return false
	}
	for i := range gl {
		if ok, err := filepath.Match(gl[i], tl[i]); err != nil || !ok {
			return false
		}
	}
	return strings.HasPrefix(t.Path, g.Path)
}

func parseSchemeless(s string) (*url.URL, error) {
	return url.Parse("https://" + s)
}
