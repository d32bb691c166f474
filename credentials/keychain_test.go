package credentials

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

// refuse tells the authenticator of repo that the registry refused what it
// gave last, as remote does, and returns what it gives next.
func TestKeychainSourcesInOrderAndRefusalMovesOn(t *testing.T) {
	dir := t.TempDir()
	testPlugin(t, dir, "eu-provider")
	testPlugin(t, dir, "other")
	alice := authn.AuthConfig{Username: "alice", Password: "kubelet-secret"}
	bob := authn.AuthConfig{Username: "bob", Password: "plugin-secret"}
	carol := authn.AuthConfig{Username: "carol", Password: "docker-secret"}
	respond(t, dir, "eu-provider", response("Registry", "", map[string]authn.AuthConfig{"*.registry.test": bob}))
	p, now := loadTestPlugins(t, dir, twoProviders)
	k := New(hostKeychain{"eu.registry.test": carol}, WithPlugins(p))
	put(t, k, "eu.registry.test/models/llama", alice)

	r, _ := name.NewRepository("eu.registry.test/models/llama")
	a, err := k.Resolve(r)
	if err != nil {
		t.Fatal(err)
	}
	next := func(want authn.AuthConfig) {
		t.Helper()
		got, err := a.Authorization()
		if err != nil || *got != want {
			t.Fatalf("Authorization = %v, %v; want %v", got, err, want)
		}
	}
	refused := a.(interface{ Refused(context.Context) bool })
	next(alice)
	if !refused.Refused(context.Background()) {
		t.Fatal("Refused of kubelet's credential says there is nothing after it")
	}
	next(bob)
	if n := len(runs(t, dir, "eu-provider")); n != 1 {
		t.Fatalf("plugin ran %d times, want 1", n)
	}
	// The refused plugin answer is dropped: the plugin runs again, and as
	// it gives the same refused password, the docker config's comes next.
	if !refused.Refused(context.Background()) {
		t.Fatal("Refused of the plugin's credential says there is nothing after it")
	}
	next(carol)
	if n := len(runs(t, dir, "eu-provider")); n != 2 {
		t.Fatalf("plugin ran %d times, want 2 (its refused answer dropped)", n)
	}
	// Once the plugin's answer expired, its renewed password is taken
	// before the docker config's.
	dave := authn.AuthConfig{Username: "bob", Password: "renewed"}
	respond(t, dir, "eu-provider", response("Registry", "", map[string]authn.AuthConfig{"*.registry.test": dave}))
	*now = now.Add(11 * time.Minute)
	if !refused.Refused(context.Background()) {
		t.Fatal("Refused of the docker config's credential says there is nothing after it")
	}
	next(dave)
	// Everything refused: start over from the first source.
	if refused.Refused(context.Background()) {
		t.Fatal("Refused says there is more after every source was refused")
	}
	next(alice)
}

func TestKeychainRereadsDockerConfig(t *testing.T) {
	home, dcfg := t.TempDir(), t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("DOCKER_CONFIG", dcfg)
	write := func(user, pass string) {
		t.Helper()
		b := fmt.Sprintf(`{"auths":{"registry.test":{"username":%q,"password":%q}}}`, user, pass)
		if err := os.WriteFile(filepath.Join(dcfg, "config.json"), []byte(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("carol", "old")
	k := New(nil)
	r, _ := name.NewRepository("registry.test/models/llama")
	a, err := k.Resolve(r)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := a.Authorization(); got.Password != "old" {
		t.Fatalf("password %q, want old", got.Password)
	}
	write("carol", "rotated")
	if got, _ := a.Authorization(); got.Password != "rotated" {
		t.Fatalf("password %q after the config changed, want rotated", got.Password)
	}
}
