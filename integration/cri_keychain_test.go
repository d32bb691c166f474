package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// basicAuthGate is a registry front that answers 401 to any request
// without its user and password, and forwards the others.
type basicAuthGate struct {
	user, pass string
	next       http.Handler
	addr       string
	// authorizedBlob counts authorized requests for the blob named.
	blob           string
	authorizedBlob atomic.Int64
}

func startBasicAuthGate(t *testing.T, user, pass, upstream string) *basicAuthGate {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	g := &basicAuthGate{user: user, pass: pass, next: httputil.NewSingleHostReverseProxy(u)}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	g.addr = strings.TrimPrefix(srv.URL, "http://")
	return g
}

func (g *basicAuthGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if u, p, ok := r.BasicAuth(); !ok || u != g.user || p != g.pass {
		w.Header().Set("WWW-Authenticate", `Basic realm="weightsnap-test"`)
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	if g.blob != "" && strings.HasSuffix(r.URL.Path, "/blobs/"+g.blob) {
		g.authorizedBlob.Add(1)
	}
	g.next.ServeHTTP(w, r)
}

// TestCRIKeychainPrivateModel pulls a model image from a registry that
// wants a password through weightsnapd's CRI image service, the password
// given as the pull's auth (as kubelet passes an image pull secret), not in
// any docker config.json: the pull is lazy, a pod reads the weights
// through weightsnap's mount, which read them from the registry with that
// password, and the password appears in no log or file of weightsnapd.
func TestCRIKeychainPrivateModel(t *testing.T) {
	var criSock string
	s := newStackWithConfig(t, nil, func(dir, containerdSock string) string {
		criSock = filepath.Join(dir, "cri.sock")
		// No background fill and little read-ahead: most of a file the
		// pod has not read stays in the registry.
		return fmt.Sprintf("[cri_keychain]\nenable = true\nlisten = %q\nimage_service = %q\n[fetch]\nbackground_fill = false\nspan_bytes = 1048576\nmax_read_ahead_bytes = 1048576\n", criSock, containerdSock)
	})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	secret := make([]byte, 12)
	rand.Read(secret)
	user, pass := "alice", "pw-"+hex.EncodeToString(secret)
	gate := startBasicAuthGate(t, user, pass, s.origin.URL())
	writeHostsToml(t, s.hosts, gate.addr)

	m := s.pushModel(t, s.origin.Addr, "private/model:v1", 32<<20, 11)
	gate.blob = m.weight
	ref := gate.addr + "/private/model:v1"

	conn, err := grpc.NewClient("unix://"+criSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	is := criapi.NewImageServiceClient(conn)
	rt, _ := s.ctd.cri(t)

	// The registry is private: without the auth the pull fails.
	if _, err := is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: ref}}); err == nil {
		t.Fatal("PullImage without credentials succeeded: the registry is not private")
	}
	auth := &criapi.AuthConfig{Username: user, Password: pass}
	if _, err := is.PullImage(ctx, &criapi.PullImageRequest{Image: &criapi.ImageSpec{Image: ref}, Auth: auth}); err != nil {
		t.Fatalf("PullImage with credentials through weightsnapd: %v", err)
	}
	s.requireLazy(t, ctx, criNamespace, m)
	// Other calls pass through the same socket.
	pullImage(t, ctx, is, s.tools.Ref)
	if st, err := is.ImageStatus(ctx, &criapi.ImageStatusRequest{Image: &criapi.ImageSpec{Image: ref}}); err != nil || st.GetImage() == nil {
		t.Fatalf("ImageStatus through weightsnapd: %v, %v", st, err)
	}

	p := s.runPod(t, ctx, rt, "team-a", "infer", ref)
	if got := sumInPod(t, ctx, rt, p); got != m.sum {
		t.Fatalf("pod read sha256 %s, want %s", got, m.sum)
	}
	if gate.authorizedBlob.Load() == 0 {
		t.Error("no authorized request for the weights layer reached the registry: weightsnap did not read it with kubelet's credentials")
	}

	// Both processes die: the new manager does not have kubelet's
	// credentials, and needs none to resume the pod's mounts from the
	// cache. A file the pod never read needs the registry, which refuses
	// it: the read fails at once (not a hang) and the log says which
	// image and registry refused, and why.
	dockerDir := t.TempDir()
	s.ws.env = []string{"DOCKER_CONFIG=" + dockerDir}
	s.ws.killBoth(t)
	s.awaitSnapshotter(t, ctx)
	r, err := rt.ExecSync(ctx, &criapi.ExecSyncRequest{ContainerId: p.container, Cmd: []string{"/tool", "sum", "/models-volume/" + extraPath}, Timeout: 120})
	if err != nil {
		t.Fatalf("ExecSync: %v", err)
	}
	if r.ExitCode == 0 {
		t.Errorf("a read of bytes of a private layer no credential opens succeeded after the restart")
	}
	t.Logf("the pod's read without credentials: exit %d: %s", r.ExitCode, strings.TrimSpace(string(r.Stderr)))
	if !logHas(s.ws.log, "layer read error", gate.addr+"/private/model", "401") {
		t.Errorf("weightsnapd's log does not say that %s/private/model was refused with a 401\n%s", gate.addr, tailFile(s.ws.log, 20))
	}

	// With the credentials in the docker config.json (re-read when it
	// changes), the same read succeeds: no new pull, no restart.
	config := fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, gate.addr, base64.StdEncoding.EncodeToString([]byte(user+":"+pass)))
	if err := os.WriteFile(filepath.Join(dockerDir, "config.json"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := sumFileInPod(t, ctx, rt, p, extraPath); got != m.extraSum {
		t.Errorf("after both processes were killed, with credentials in config.json: sha256 of %s %s, want %s", extraPath, got, m.extraSum)
	}
	removePod(t, rt, p)

	basic := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	for _, secret := range []string{pass, basic} {
		if logHas(s.ws.log, secret) {
			t.Errorf("weightsnapd's log holds the credentials (%q)", secret[:6]+"…")
		}
		_ = filepath.WalkDir(filepath.Dir(s.ws.root), func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(path)
			if err == nil && bytes.Contains(b, []byte(secret)) {
				t.Errorf("%s holds the credentials", path)
			}
			return nil
		})
	}
}
