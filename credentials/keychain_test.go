package credentials

import (
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// hostKeychain answers the credentials of each registry host it has, as
// the docker config.json does.
type hostKeychain map[string]authn.AuthConfig

func (k hostKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.RegistryStr()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}

func authOf(t *testing.T, k authn.Keychain, repo string) authn.AuthConfig {
	t.Helper()
	r, err := name.NewRepository(repo)
	if err != nil {
		t.Fatal(err)
	}
	a, err := k.Resolve(r)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := a.Authorization()
	if err != nil {
		t.Fatal(err)
	}
	return *cfg
}

func put(t *testing.T, k *Keychain, image string, cfg authn.AuthConfig) {
	t.Helper()
	reg, repo, err := Repository(image)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Put(reg, repo, cfg); err != nil {
		t.Fatal(err)
	}
}

func TestKeychainMatchesRegistryAndRepository(t *testing.T) {
	alice := authn.AuthConfig{Username: "alice", Password: "a-secret"}
	k := New(hostKeychain{})
	put(t, k, "registry.test:5000/models/llama:8b", alice)

	for _, tc := range []struct {
		repo string
		want authn.AuthConfig
	}{
		{"registry.test:5000/models/llama", alice},
		{"registry.test:5000/models/mistral", authn.AuthConfig{}},     // another repository
		{"registry.test:5000/models", authn.AuthConfig{}},             // a prefix is another repository
		{"mirror.test:5000/models/llama", authn.AuthConfig{}},         // another host: a mirror
		{"registry.test/models/llama", authn.AuthConfig{}},            // another port
		{"registry.test:5000/models/llama/extra", authn.AuthConfig{}}, // a longer name
	} {
		if got := authOf(t, k, tc.repo); got != tc.want {
			t.Errorf("%s: got %+v, want %+v", tc.repo, got, tc.want)
		}
	}
}

func TestKeychainNormalizesDockerHub(t *testing.T) {
	bob := authn.AuthConfig{Username: "bob", Password: "b-secret"}
	k := New(hostKeychain{})
	put(t, k, "nginx", bob)
	for _, repo := range []string{"docker.io/library/nginx", "index.docker.io/library/nginx", "nginx"} {
		if got := authOf(t, k, repo); got != bob {
			t.Errorf("%s: got %+v, want %+v", repo, got, bob)
		}
	}
}

func TestKeychainMostRecentWins(t *testing.T) {
	k := New(hostKeychain{})
	r, _ := name.NewRepository("registry.test/models/llama")
	// An authenticator resolved before the newer credentials arrive (a
	// login already made) answers with them at its next use.
	a, err := k.Resolve(r)
	if err != nil {
		t.Fatal(err)
	}
	put(t, k, "registry.test/models/llama:v1", authn.AuthConfig{Username: "alice", Password: "old"})
	put(t, k, "registry.test/models/llama@sha256:"+sixtyFour, authn.AuthConfig{Username: "alice", Password: "new"})
	cfg, err := a.Authorization()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Password != "new" {
		t.Errorf("got password %q, want the most recent, %q", cfg.Password, "new")
	}
}

func TestKeychainFallsBackToDockerConfig(t *testing.T) {
	fromFile := authn.AuthConfig{Username: "file", Password: "f-secret"}
	kubelet := authn.AuthConfig{Username: "kubelet", Password: "k-secret"}
	k := New(hostKeychain{"registry.test": fromFile})
	put(t, k, "registry.test/models/llama", kubelet)

	if got := authOf(t, k, "registry.test/models/llama"); got != kubelet {
		t.Errorf("kept repository: got %+v, want kubelet's %+v", got, kubelet)
	}
	if got := authOf(t, k, "registry.test/models/other"); got != fromFile {
		t.Errorf("other repository: got %+v, want the docker config's %+v", got, fromFile)
	}
	// A target naming no repository gets the fallback's answer.
	reg, _ := name.NewRegistry("registry.test")
	a, err := k.Resolve(reg)
	if err != nil {
		t.Fatal(err)
	}
	if cfg, _ := a.Authorization(); *cfg != fromFile {
		t.Errorf("registry: got %+v, want the docker config's %+v", *cfg, fromFile)
	}
	// Forgetting falls back again.
	put(t, k, "registry.test/models/llama", authn.AuthConfig{})
	if got := authOf(t, k, "registry.test/models/llama"); got != fromFile {
		t.Errorf("forgotten: got %+v, want the docker config's %+v", got, fromFile)
	}
}

func TestAuthenticatorDoesNotPrintCredentials(t *testing.T) {
	k := New(hostKeychain{})
	put(t, k, "registry.test/models/llama", authn.AuthConfig{Username: "alice", Password: "a-secret"})
	r, _ := name.NewRepository("registry.test/models/llama")
	a, _ := k.Resolve(r)
	if s := fmt.Sprintf("%v %+v %s", a, a, a); strings.Contains(s, "a-secret") {
		t.Errorf("authenticator prints its password: %s", s)
	}
}

const sixtyFour = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
