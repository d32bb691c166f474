package integration

// A real kubelet, standalone (static pods from a directory, no API server),
// in a private mount namespace of its own so that it changes nothing on the
// host; and a registry front with bearer-token auth whose passwords rotate.

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// kubeletVersion is the kubelet `make kubelet` builds.
const kubeletVersion = "v1.36.3"

// requireKubelet returns the kubelet binary of `make kubelet`, skipping the
// test (failing it when CI=true) when it is missing or another version.
func requireKubelet(t *testing.T) string {
	t.Helper()
	testutil.RequireRoot(t)
	bin := testutil.RequireBinary(t, "kubelet")
	out, err := exec.Command(bin, "--version").Output()
	if got := strings.TrimSpace(string(out)); err != nil || got != "Kubernetes "+kubeletVersion {
		if os.Getenv("CI") == "true" {
			t.Fatalf("prerequisite missing (CI=true, not skipping): %s --version = %q (%v), want Kubernetes %s (make kubelet)", bin, got, err, kubeletVersion)
		}
		t.Skipf("prerequisite missing: %s --version = %q (%v), want Kubernetes %s (make kubelet)", bin, got, err, kubeletVersion)
	}
	testutil.RequireBinary(t, "unshare")
	return bin
}

// kubeletNS is run by unshare in kubelet's new mount namespace: the host
// paths kubelet writes to whatever its config says (/var/lib/kubelet/
// device-plugins, /var/log/containers, the sysctls it tunes) are covered
// with files and directories of the test, then kubelet is started. The
// mounts vanish with the namespace when kubelet exits.
//
// kubelet's root directory is made a shared mount point first. kubelet
// would otherwise bind-mount it onto itself at start, while another of its
// goroutines creates the pod-resources socket in it and renames it into
// place: a rename whose two paths are looked up across that mount fails
// with EXDEV ("invalid cross-device link"), and kubelet exits.
const kubeletNS = `set -eu
d=$1; r=$2; shift 2
mount --bind "$r" "$r"
mount --make-rshared "$r"
mkdir -p "$d/var-lib" "$d/var-log" "$d/sysctl"
mount --bind "$d/var-lib" /var/lib
mount --bind "$d/var-log" /var/log
for f in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
	n="$d/sysctl/$(echo "$f" | tr / _)"
	cat "/proc/sys/$f" > "$n"
	mount --bind "$n" "/proc/sys/$f"
done
exec "$@"
`

// kubeletConfig is a KubeletConfiguration for a standalone kubelet on
// this kind of machine (cgroup v1, no swap check, no iptables, no HTTPS
// server, no QoS cgroups): every path under the test's directory, its
// read-only port (/pods: static pods with their status) and healthz on
// loopback.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%[1]s
imageServiceEndpoint: unix://%[2]s
staticPodPath: %[3]s
fileCheckFrequency: 1s
syncFrequency: 10s
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
makeIPTablesUtilChains: false
enableServer: false
address: 127.0.0.1
readOnlyPort: %[4]d
healthzBindAddress: 127.0.0.1
healthzPort: %[5]d
podLogsDir: %[6]s
volumePluginDir: %[7]s
resolvConf: ""
oomScoreAdj: 0
localStorageCapacityIsolation: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
`

// kubelet is a running standalone kubelet.
type kubelet struct {
	dir, manifests, podLogs, log string
	readOnly                     string // host:port of the read-only server
	proc                         *process
}

// startKubelet starts kubelet with containerd's runtime service and the
// image service at imageSock, reading static pods from its manifests
// directory, with kubelet's image credential provider config and bin dir
// (both empty: none). In t.Cleanup: kubelet is stopped, then every pod
// sandbox containerd runs is stopped and removed (kubelet leaves its pods
// running when it exits).
func startKubelet(t *testing.T, bin string, ctd *containerd, imageSock, providerConfig, providerBinDir string) *kubelet {
	t.Helper()
	dir := t.TempDir()
	k := &kubelet{
		dir:       dir,
		manifests: mkdir(t, filepath.Join(dir, "manifests")),
		podLogs:   mkdir(t, filepath.Join(dir, "pod-logs")),
		log:       filepath.Join(dir, "kubelet.log"),
		readOnly:  freeLoopbackAddr(t),
	}
	health := freeLoopbackAddr(t)
	port := func(addr string) int {
		u, err := url.Parse("http://" + addr)
		if err != nil {
			t.Fatal(err)
		}
		var p int
		fmt.Sscan(u.Port(), &p)
		return p
	}
	cfg := fmt.Sprintf(kubeletConfig, ctd.sock, imageSock, k.manifests, port(k.readOnly), port(health),
		k.podLogs, mkdir(t, filepath.Join(dir, "volume-plugins")))
	cfgPath := filepath.Join(dir, "kubelet.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	nsScript := filepath.Join(dir, "ns.sh")
	if err := os.WriteFile(nsScript, []byte(kubeletNS), 0o755); err != nil {
		t.Fatal(err)
	}
	root := mkdir(t, filepath.Join(dir, "root"))
	args := []string{"--mount", "--propagation", "private", "/bin/sh", nsScript, mkdir(t, filepath.Join(dir, "ns")), root,
		bin, "--config", cfgPath, "--root-dir", root,
		"--cert-dir", filepath.Join(dir, "pki"), "--v", "2"}
	if providerConfig != "" {
		args = append(args, "--image-credential-provider-config", providerConfig, "--image-credential-provider-bin-dir", providerBinDir)
	}
	rt, _ := ctd.cri(t)
	t.Cleanup(func() { removeAllPods(t, rt) }) // after kubelet stopped
	k.proc = startProcess(t, "kubelet", k.log, nil, testutil.RequireBinary(t, "unshare"), args...)

	deadline := time.Now().Add(readyTimeout)
	for {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		body, err := httpGet(ctx, "http://"+health+"/healthz")
		cancel()
		if err == nil && strings.TrimSpace(body) == "ok" {
			return k
		}
		select {
		case <-k.proc.done:
			t.Fatalf("kubelet exited: %v\n%s", k.proc.err, tailFile(k.log, 40))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubelet not healthy within %v: %v\n%s", readyTimeout, err, tailFile(k.log, 40))
		}
		time.Sleep(200 * time.Millisecond) // no event for kubelet's readiness
	}
}

// removeAllPods stops and removes every pod sandbox of containerd's CRI.
func removeAllPods(t testing.TB, rt criapi.RuntimeServiceClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := rt.ListPodSandbox(ctx, &criapi.ListPodSandboxRequest{})
	if err != nil {
		t.Errorf("ListPodSandbox: %v", err)
		return
	}
	for _, sb := range l.GetItems() {
		removePod(t, rt, pod{sandbox: sb.GetId()})
	}
}

// addStaticPod writes a pod manifest into kubelet's static pod directory.
func (k *kubelet) addStaticPod(t *testing.T, name, manifest string) {
	t.Helper()
	tmp := filepath.Join(k.dir, "."+name+".yaml")
	if err := os.WriteFile(tmp, []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(k.manifests, name+".yaml")); err != nil {
		t.Fatal(err)
	}
}

// podStatus is the part of a v1.Pod's status the tests read.
type podStatus struct {
	Metadata struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Status struct {
		Phase             string `json:"phase"`
		ContainerStatuses []struct {
			Name  string `json:"name"`
			State struct {
				Waiting *struct {
					Reason  string `json:"reason"`
					Message string `json:"message"`
				} `json:"waiting"`
				Terminated *struct {
					ExitCode int    `json:"exitCode"`
					Reason   string `json:"reason"`
				} `json:"terminated"`
			} `json:"state"`
		} `json:"containerStatuses"`
	} `json:"status"`
}

// pods returns kubelet's own view of its pods: its read-only /pods
// endpoint, which for static pods of a kubelet without an API server
// carries the status kubelet's status manager holds.
func (k *kubelet) pods(ctx context.Context) (map[string]podStatus, error) {
	body, err := httpGet(ctx, "http://"+k.readOnly+"/pods")
	if err != nil {
		return nil, err
	}
	var l struct {
		Items []podStatus `json:"items"`
	}
	if err := json.Unmarshal([]byte(body), &l); err != nil {
		return nil, err
	}
	out := map[string]podStatus{}
	for _, p := range l.Items {
		// Static pods are named <manifest name>-<node name>.
		name, _, _ := strings.Cut(p.Metadata.Name, "-")
		out[name] = p
	}
	return out, nil
}

// waitPod polls kubelet's /pods until cond holds for the pod whose
// manifest is named name, and returns its status.
func (k *kubelet) waitPod(t *testing.T, ctx context.Context, name, what string, cond func(podStatus) bool) podStatus {
	t.Helper()
	var last podStatus
	var lastErr error
	for {
		pods, err := k.pods(ctx)
		lastErr = err
		if p, ok := pods[name]; ok {
			last = p
			if cond(p) {
				return p
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod %s: %s: %v; kubelet's last status %+v (error %v)\n%s", name, what, ctx.Err(), last.Status, lastErr, tailFile(k.log, 30))
		case <-time.After(time.Second): // kubelet publishes no event here
		}
	}
}

// containerOutput returns what the container of the static pod name
// wrote to stdout, from kubelet's pod log directory (CRI log format).
func (k *kubelet) containerOutput(t *testing.T, name, container string) string {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(k.podLogs, "*_"+name+"-*_*", container, "*.log"))
	if len(logs) == 0 {
		t.Fatalf("no log of container %s of pod %s under %s", container, name, k.podLogs)
	}
	b, err := os.ReadFile(logs[len(logs)-1])
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for line := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		// <time> <stream> <P|F> <text>
		f := strings.SplitN(line, " ", 4)
		if len(f) == 4 && f[1] == "stdout" {
			out = append(out, f[3])
		}
	}
	return strings.Join(out, "\n")
}

// tokenGate is a registry front with bearer-token auth, as a cloud
// registry does it: /v2/ wants a token, /token hands one out for the
// user's current password, valid tokenTTL. The password can be rotated:
// the old one is refused from then on, the tokens already given stay
// valid until they expire. Blob bodies of one layer can be throttled,
// all requests for it together, and are counted per password generation.
type tokenGate struct {
	addr     string
	user     string
	tokenTTL time.Duration
	passFile string // the current password, for the test's credential provider

	upstream atomic.Pointer[httputil.ReverseProxy]

	mu         sync.Mutex
	gen        int // generation of pass, from 1
	pass       string
	tokens     map[string]gateToken
	secrets    []string // every password, basic auth and token handed out
	firstLogin chan struct{}
	loggedIn   bool

	// The throttled layer.
	blob        string
	rate        float64 // bytes per second, all requests together
	next        time.Time
	genBytes    map[int]int64   // its body bytes by the password generation of the token
	blobTokens  map[string]bool // the tokens that fetched it
	blobGets    int
	rangelessGs int
}

type gateToken struct {
	gen     int
	expires time.Time
}

func newTokenGate(t *testing.T, user string, ttl time.Duration) *tokenGate {
	t.Helper()
	g := &tokenGate{
		user: user, tokenTTL: ttl,
		passFile:   filepath.Join(t.TempDir(), "password"),
		tokens:     map[string]gateToken{},
		firstLogin: make(chan struct{}),
		genBytes:   map[int]int64{},
		blobTokens: map[string]bool{},
	}
	g.rotate(t)
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	g.addr = strings.TrimPrefix(srv.URL, "http://")
	return g
}

// throttle paces the body bytes of blob to rate bytes per second, all its
// requests together, and counts them.
func (g *tokenGate) throttle(blob string, rate float64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.blob, g.rate = blob, rate
}

func (g *tokenGate) setUpstream(t *testing.T, upstream string) {
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	g.upstream.Store(httputil.NewSingleHostReverseProxy(u))
}

func randomSecret(prefix string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// rotate makes a new password the only one the token server accepts and
// writes it where the credential provider reads it.
func (g *tokenGate) rotate(t *testing.T) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.gen++
	g.pass = randomSecret(fmt.Sprintf("pw%d-", g.gen))
	g.secrets = append(g.secrets, g.pass, base64.StdEncoding.EncodeToString([]byte(g.user+":"+g.pass)))
	tmp := g.passFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(g.pass), 0o600); err != nil {
		t.Error(err)
	}
	if err := os.Rename(tmp, g.passFile); err != nil {
		t.Error(err)
	}
}

func (g *tokenGate) generation() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.gen
}

func (g *tokenGate) addSecret(s string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.secrets = append(g.secrets, s, base64.StdEncoding.EncodeToString([]byte(g.user+":"+s)))
}

func (g *tokenGate) allSecrets() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.secrets...)
}

// blobBytes returns the throttled layer's body bytes served so far.
func (g *tokenGate) blobBytes() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	var n int64
	for _, b := range g.genBytes {
		n += b
	}
	return n
}

func (g *tokenGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/token" {
		g.serveToken(w, r)
		return
	}
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	g.mu.Lock()
	info, valid := g.tokens[tok]
	valid = ok && valid && time.Now().Before(info.expires)
	blob := g.blob
	g.mu.Unlock()
	if !valid {
		scope := ""
		if rest, ok := strings.CutPrefix(r.URL.Path, "/v2/"); ok {
			for _, kind := range []string{"/manifests/", "/blobs/", "/tags/"} {
				if i := strings.Index(rest, kind); i > 0 {
					scope = fmt.Sprintf(`,scope="repository:%s:pull"`, rest[:i])
					break
				}
			}
		}
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="weightsnap-test"%s`, g.addr, scope))
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
		return
	}
	up := g.upstream.Load()
	if up == nil {
		http.Error(w, "no upstream yet", http.StatusServiceUnavailable)
		return
	}
	if blob != "" && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+blob) {
		g.mu.Lock()
		g.blobGets++
		if r.Header.Get("Range") == "" {
			g.rangelessGs++
		}
		g.blobTokens[tok] = true
		g.mu.Unlock()
		w = &throttledWriter{ResponseWriter: w, g: g, gen: info.gen, ctx: r.Context()}
	}
	up.ServeHTTP(w, r)
}

func (g *tokenGate) serveToken(w http.ResponseWriter, r *http.Request) {
	u, p, ok := r.BasicAuth()
	g.mu.Lock()
	defer g.mu.Unlock()
	if !ok || u != g.user || p != g.pass {
		w.Header().Set("WWW-Authenticate", `Basic realm="weightsnap-test"`)
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"invalid username or password"}]}`, http.StatusUnauthorized)
		return
	}
	tok := randomSecret("tok-")
	g.tokens[tok] = gateToken{gen: g.gen, expires: time.Now().Add(g.tokenTTL)}
	g.secrets = append(g.secrets, tok)
	if !g.loggedIn {
		g.loggedIn = true
		close(g.firstLogin)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"token": tok, "access_token": tok,
		"expires_in": int(g.tokenTTL / time.Second), "issued_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// throttledWriter paces the body of the throttled layer: every request
// for it shares the gate's rate.
type throttledWriter struct {
	http.ResponseWriter
	g   *tokenGate
	gen int
	ctx context.Context
}

func (w *throttledWriter) Write(p []byte) (int, error) {
	const piece = 16 << 10
	var n int
	for len(p) > 0 {
		k := min(len(p), piece)
		w.g.mu.Lock()
		if w.g.rate > 0 {
			now := time.Now()
			if w.g.next.Before(now) {
				w.g.next = now
			}
			at := w.g.next
			w.g.next = at.Add(time.Duration(float64(k) / w.g.rate * float64(time.Second)))
			w.g.mu.Unlock()
			select {
			case <-time.After(time.Until(at)): // the pace, not a synchronisation
			case <-w.ctx.Done():
				return n, w.ctx.Err()
			}
		} else {
			w.g.mu.Unlock()
		}
		m, err := w.ResponseWriter.Write(p[:k])
		n += m
		w.g.mu.Lock()
		w.g.genBytes[w.gen] += int64(m)
		w.g.mu.Unlock()
		if err != nil {
			return n, err
		}
		p = p[k:]
	}
	return n, nil
}

func (w *throttledWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
