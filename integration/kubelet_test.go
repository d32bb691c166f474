package integration

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// credentialProvider is the test's kubelet credential provider plugin: it
// hands out the registry's current password (the file the registry front
// rotates), cached for 10 s, and a wrong one for images of the "denied/"
// repositories.
const credentialProvider = `#!/bin/sh
req=$(cat)
pass=$(cat "$WS_PASSWORD_FILE")
case "$req" in
*'/denied/'*) pass="$WS_WRONG_PASSWORD" ;;
esac
printf '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"10s","auth":{"%s":{"username":"%s","password":"%s"}}}\n' "$WS_REGISTRY" "$WS_USER" "$pass"
`

// credentialProviderConfig is kubelet's CredentialProviderConfig naming
// the plugin for the registry front's host and port.
const credentialProviderConfig = `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- name: ws-test-provider
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  matchImages: [%[1]q]
  defaultCacheDuration: 10s
  env:
  - {name: WS_PASSWORD_FILE, value: %[2]q}
  - {name: WS_WRONG_PASSWORD, value: %[3]q}
  - {name: WS_REGISTRY, value: %[1]q}
  - {name: WS_USER, value: %[4]q}
`

// staticReaderPod is a static pod whose container hashes the model of its image
// volume once and exits.
const staticReaderPod = `apiVersion: v1
kind: Pod
metadata:
  name: %[1]s
  namespace: default
spec:
  hostNetwork: true
  restartPolicy: Never
  containers:
  - name: reader
    image: %[2]s
    imagePullPolicy: IfNotPresent
    command: ["/tool", "sum", "/model/%[4]s"]
    volumeMounts:
    - {name: model, mountPath: /model, readOnly: true}
  volumes:
  - name: model
    image:
      reference: %[3]s
      pullPolicy: IfNotPresent
`

// TestKubeletPrivateModel runs a real kubelet (standalone, static pods)
// whose image service is weightsnapd's CRI socket, with an image
// credential provider plugin, against a registry with bearer-token auth
// whose tokens live 30 s and whose password is rotated a minute after its
// first use:
//   - a pod mounts a private model as an image volume and reads it in full,
//     lazily (the weights layer is not in containerd's content store, and
//     the registry had served little of it when the container started),
//     through the throttled registry over more than one token lifetime and
//     across the rotation, with the right sha256 and a single PullImage;
//   - a pod whose plugin answer is a wrong password fails with an error
//     naming the image, in kubelet's pod status and in weightsnapd's log;
//   - a pod mounting a public model without credentials reads it;
//   - no password, basic auth or token is in any file under the roots,
//     logs and state of kubelet, containerd and weightsnapd.
func TestKubeletPrivateModel(t *testing.T) {
	kubeletBin := requireKubelet(t)
	const (
		user     = "model-reader"
		tokenTTL = 30 * time.Second
		passTTL  = time.Minute
		// The weights layer is served at rate, so the read lasts ≥ 106 s
		// from the first login: the rotation comes at 60 s, the tokens
		// got before it expire by 90 s, and requests (1 MiB spans, a few
		// seconds each) go on after that with a token of the new password.
		modelSize = 40 << 20
		rate      = 384 << 10
	)
	gate := newTokenGate(t, user, tokenTTL)
	wrong := randomSecret("wrong-")
	gate.addSecret(wrong)

	provDir := t.TempDir()
	binDir := mkdir(t, filepath.Join(provDir, "bin"))
	if err := os.WriteFile(filepath.Join(binDir, "ws-test-provider"), []byte(credentialProvider), 0o755); err != nil {
		t.Fatal(err)
	}
	provConfig := filepath.Join(provDir, "credential-providers.yaml")
	if err := os.WriteFile(provConfig, []byte(fmt.Sprintf(credentialProviderConfig, gate.addr, gate.passFile, wrong, user)), 0o644); err != nil {
		t.Fatal(err)
	}

	var criSock string
	s := newStackWithConfig(t, nil, func(dir, containerdSock string) string {
		criSock = filepath.Join(dir, "cri.sock")
		// No background fill and few requests in flight: the layer is
		// read from the registry as the pod reads it, at the gate's pace.
		return fmt.Sprintf("[fetch]\nbackground_fill = false\nworkers = 2\nspan_bytes = 1048576\n"+
			"[cri_keychain]\nenable = true\nlisten = %q\nimage_service = %q\n"+
			"[credential_providers]\nconfig = %q\nbin_dir = %q\n", criSock, containerdSock, provConfig, binDir)
	})
	gate.setUpstream(t, s.origin.URL())
	writeHostsToml(t, s.hosts, gate.addr)

	private := s.pushModel(t, s.origin.Addr, "private/model:v1", modelSize, 21)
	s.pushModel(t, s.origin.Addr, "denied/model:v1", 1<<20, 22)
	public := s.pushModel(t, s.origin.Addr, "public/model:v1", 4<<20, 23)
	gate.throttle(private.weight, rate)
	privateRef := gate.addr + "/private/model:v1"
	deniedRef := gate.addr + "/denied/model:v1"

	k := startKubelet(t, kubeletBin, s.ctd, criSock, provConfig, binDir)
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()

	// The password is valid for a minute from its first use, then rotated.
	rotated := make(chan struct{})
	go func() {
		defer close(rotated)
		select {
		case <-gate.firstLogin:
		case <-ctx.Done():
			return
		}
		select {
		case <-time.After(passTTL): // the password's lifetime, not a synchronisation
			gate.rotate(t)
		case <-ctx.Done():
		}
	}()
	defer func() { cancel(); <-rotated }()

	start := time.Now()
	k.addStaticPod(t, "private", fmt.Sprintf(staticReaderPod, "private", s.tools.Ref, privateRef, modelPath))
	k.addStaticPod(t, "denied", fmt.Sprintf(staticReaderPod, "denied", s.tools.Ref, deniedRef, modelPath))
	k.addStaticPod(t, "public", fmt.Sprintf(staticReaderPod, "public", s.tools.Ref, public.Ref, modelPath))

	// The pull is lazy: when the reader container starts, the registry has
	// served a small part of the weights layer.
	rt, _ := s.ctd.cri(t)
	atStart := waitContainerStarted(t, ctx, rt, "private", gate.blobBytes)
	t.Logf("reader container of the private pod started %.1fs after its manifest; %d of %d bytes of the weights layer served by then",
		time.Since(start).Seconds(), atStart, private.size)
	if atStart > private.size/2 {
		t.Errorf("the registry had served %d of %d bytes of the weights layer when the reader started: the pull was not lazy", atStart, private.size)
	}
	s.requireLazy(t, ctx, criNamespace, private)

	succeeded := func(p podStatus) bool { return p.Status.Phase == "Succeeded" || p.Status.Phase == "Failed" }
	pub := k.waitPod(t, ctx, "public", "to finish", succeeded)
	if pub.Status.Phase != "Succeeded" {
		t.Errorf("public pod: %+v", pub.Status)
	} else if got := k.containerOutput(t, "public", "reader"); got != public.sum {
		t.Errorf("public pod read sha256 %q, want %q", got, public.sum)
	}

	// Wrong credentials: kubelet's status of the pod names the image and
	// the refusal, and so does weightsnapd's log.
	den := k.waitPod(t, ctx, "denied", "to report its failed pull", func(p podStatus) bool {
		for _, c := range p.Status.ContainerStatuses {
			if w := c.State.Waiting; w != nil && (w.Reason == "ErrImagePull" || w.Reason == "ImagePullBackOff") {
				return true
			}
		}
		return false
	})
	for _, c := range den.Status.ContainerStatuses {
		if w := c.State.Waiting; w != nil {
			t.Logf("kubelet's status of the denied pod: %s: %s", w.Reason, w.Message)
			if !strings.Contains(w.Message, deniedRef) || !strings.Contains(w.Message, "401") {
				t.Errorf("kubelet's status of the denied pod does not name the image %s and the 401: %s", deniedRef, w.Message)
			}
		}
	}
	if !logHas(s.ws.log, "pull failed", deniedRef, "401") {
		t.Errorf("weightsnapd's log does not say that the pull of %s was refused (401)", deniedRef)
	}

	priv := k.waitPod(t, ctx, "private", "to finish reading the model", succeeded)
	elapsed := time.Since(start)
	if priv.Status.Phase != "Succeeded" {
		t.Fatalf("private pod: %+v", priv.Status)
	}
	if got := k.containerOutput(t, "private", "reader"); got != private.sum {
		t.Errorf("private pod read sha256 %q, want %q", got, private.sum)
	}
	gate.mu.Lock()
	genBytes, tokens, gets, rangeless := fmt.Sprint(gate.genBytes), len(gate.blobTokens), gate.blobGets, gate.rangelessGs
	gens := len(gate.genBytes)
	gate.mu.Unlock()
	t.Logf("private model read in %.1fs after its manifest; weights layer bytes by password generation %s, in %d GETs with %d tokens",
		elapsed.Seconds(), genBytes, gets, tokens)
	if gens < 2 {
		t.Errorf("the weights layer was read with the tokens of %d password generation(s) (%s), want the read to span the rotation", gens, genBytes)
	}
	if tokens < 2 {
		t.Errorf("the weights layer was read with %d token(s), want the read to span token lifetimes", tokens)
	}
	if rangeless > 0 {
		t.Errorf("%d GETs of the weights layer had no Range: it was downloaded whole", rangeless)
	}
	if n := countLines(s.ctd.log, `PullImage \"`+privateRef+`\""`); n != 1 {
		t.Errorf("containerd got %d PullImage of %s, want 1: the credentials were renewed without a new pull", n, privateRef)
	}

	// No secret anywhere: logs, state and roots of the three daemons.
	secrets := gate.allSecrets()
	for _, root := range []string{s.dir, k.dir} {
		skip := mountsUnder(t, root)
		_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if d.IsDir() && slices.Contains(skip, path) {
				return filepath.SkipDir
			}
			if !d.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return nil
			}
			for _, sec := range secrets {
				if bytes.Contains(b, []byte(sec)) {
					t.Errorf("%s holds a credential (%s…)", path, sec[:6])
				}
			}
			return nil
		})
	}
}

// waitContainerStarted waits until the container of the static pod name
// runs (or ran) in containerd and returns bytes() at that moment.
func waitContainerStarted(t *testing.T, ctx context.Context, rt criapi.RuntimeServiceClient, name string, bytes func() int64) int64 {
	t.Helper()
	for {
		l, err := rt.ListContainers(ctx, &criapi.ListContainersRequest{})
		if err != nil {
			t.Fatalf("ListContainers: %v", err)
		}
		for _, c := range l.GetContainers() {
			if strings.HasPrefix(c.GetLabels()["io.kubernetes.pod.name"], name+"-") && c.GetState() != criapi.ContainerState_CONTAINER_CREATED {
				return bytes()
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the container of pod %s did not start: %v", name, ctx.Err())
		case <-time.After(100 * time.Millisecond): // containerd has no event for this here
		}
	}
}

// countLines counts the lines of the file at path that contain sub.
func countLines(path, sub string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return strings.Count(string(b), sub)
}
