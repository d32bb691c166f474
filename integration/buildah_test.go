package integration

// buildah, run as a user of docker build would, in a private mount
// namespace so that nothing it writes reaches the host; and a registry
// front that counts what is uploaded.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/weightsnap/weightsnap/internal/testutil"
)

// writeConvertModel writes the build context: a safetensors file and a
// config.json under convertModelDir, and returns their contents by path
// in the image.
func writeConvertModel(t *testing.T, ctx context.Context, dir string) map[string][]byte {
	t.Helper()
	md := mkdir(t, filepath.Join(dir, convertModelDir))
	var tensors int
	if _, err := writeSafetensors(ctx, filepath.Join(md, "model.safetensors"), convertWeightsBytes, 77, &tensors); err != nil {
		t.Fatal(err)
	}
	cfg := []byte(fmt.Sprintf(`{"architectures": ["TinyForCausalLM"], "model_type": "tiny", "num_hidden_layers": %d}`, tensors))
	if err := os.WriteFile(filepath.Join(md, "config.json"), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, rel := range []string{convertWeights, convertConfig} {
		b, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil {
			t.Fatal(err)
		}
		files[rel] = b
	}
	return files
}

// buildah runs Debian's buildah with everything it writes under dir.
type buildah struct {
	bin, dir string
	env      []string
}

// newBuildah returns a buildah whose storage (the vfs driver), run state
// and temporary files are under a temporary directory of the test. It
// skips the test (fails it when CI=true) if buildah is not installed.
func newBuildah(t *testing.T) *buildah {
	t.Helper()
	b := &buildah{bin: testutil.RequireBinary(t, "buildah"), dir: t.TempDir()}
	testutil.RequireBinary(t, "unshare")
	for _, d := range []string{"tmp", "var-lib/upper", "var-lib/work", "run/upper", "run/work"} {
		mkdir(t, filepath.Join(b.dir, d))
	}
	conf := filepath.Join(b.dir, "registries.conf")
	if err := os.WriteFile(conf, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	b.env = append(os.Environ(),
		"TMPDIR="+filepath.Join(b.dir, "tmp"),
		"CONTAINERS_REGISTRIES_CONF="+conf, // no mirrors or aliases of the host's
		"BUILDAH_DIR="+b.dir,
	)
	return b
}

// run runs buildah with args and returns its stdout.
func (b *buildah) run(t *testing.T, args ...string) string {
	t.Helper()
	argv := append([]string{"--mount", "--propagation", "private", "sh", "-c", buildahNamespace, "sh",
		b.bin, "--root", filepath.Join(b.dir, "root"), "--runroot", filepath.Join(b.dir, "runroot"), "--storage-driver", "vfs"}, args...)
	cmd := exec.CommandContext(t.Context(), "unshare", argv...)
	cmd.Env = b.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("buildah %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(stdout.String())
}

// buildModelImage builds the image `docker build` would make of
//
//	FROM scratch
//	COPY tool /tool
//	COPY models/tiny /models/tiny
//	ENTRYPOINT ["/tool", "sleep"]
//
// (a layer per COPY) from the build context ctxDir, and pushes it to ref
// in manifest format ("v2s2" or "oci") with gzip layers.
func (b *buildah) buildModelImage(t *testing.T, tool, ctxDir, ref, format string) {
	t.Helper()
	commitFormat := map[string]string{"v2s2": "docker", "oci": "oci"}[format]
	base := b.run(t, "from", "scratch")
	b.run(t, "copy", "--chmod", "0755", base, tool, "/tool")
	b.run(t, "config", "--entrypoint", `["/tool", "sleep"]`, base)
	b.run(t, "commit", "--quiet", "--rm", "--format", commitFormat, base, "weightsnap-base")
	model := b.run(t, "from", "--pull=never", "containers-storage:localhost/weightsnap-base")
	b.run(t, "copy", model, filepath.Join(ctxDir, convertModelDir), "/"+convertModelDir)
	b.run(t, "commit", "--quiet", "--rm", "--format", commitFormat, model, "weightsnap-model")
	b.run(t, "push", "--quiet", "--tls-verify=false", "--format", format, "--compression-format", "gzip",
		"localhost/weightsnap-model", "docker://"+ref)
}

// uploadCounter is a reverse proxy in front of a registry that counts what
// clients upload (the body bytes of every request under /blobs/uploads/,
// the digests of the uploads completed, and manifest PUTs) and the blob
// bytes it serves, by digest.
type uploadCounter struct {
	Addr string

	mu     sync.Mutex
	counts uploadCounts
}

// uploadCounts is what an uploadCounter counted.
type uploadCounts struct {
	bytes     int64            // blob upload body bytes
	blobs     []string         // digests of the blob uploads completed
	manifests int              // manifest PUTs
	served    map[string]int64 // blob body bytes served, by digest
}

// startUploadCounter starts a counter in front of the registry at addr;
// it is stopped in t.Cleanup.
func startUploadCounter(t testing.TB, addr string) *uploadCounter {
	t.Helper()
	c := &uploadCounter{counts: uploadCounts{served: map[string]int64{}}}
	// The Host header is kept: the registry builds upload locations from
	// it, so that uploads come back through the counter.
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: addr})
	rp.ModifyResponse = func(resp *http.Response) error {
		if m := blobGetPath.FindStringSubmatch(resp.Request.URL.Path); m != nil && resp.Request.Method == http.MethodGet {
			resp.Body = &countingBody{ReadCloser: resp.Body, add: func(n int) { c.update(func(u *uploadCounts) { u.served[m[1]] += int64(n) }) }}
		}
		return nil
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.Contains(r.URL.Path, "/blobs/uploads/"):
			if r.Body != nil {
				r.Body = &countingBody{ReadCloser: r.Body, add: func(n int) { c.update(func(u *uploadCounts) { u.bytes += int64(n) }) }}
			}
			if d := r.URL.Query().Get("digest"); r.Method == http.MethodPut && d != "" {
				c.update(func(u *uploadCounts) { u.blobs = append(u.blobs, d) })
			}
		case r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/"):
			c.update(func(u *uploadCounts) { u.manifests++ })
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	c.Addr = strings.TrimPrefix(srv.URL, "http://")
	return c
}

func (c *uploadCounter) update(f func(*uploadCounts)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(&c.counts)
}

// take returns what was counted since the last take, and starts afresh.
func (c *uploadCounter) take() uploadCounts {
	c.mu.Lock()
	defer c.mu.Unlock()
	u := c.counts
	c.counts = uploadCounts{served: map[string]int64{}}
	return u
}

// countingBody reports the bytes read through it.
type countingBody struct {
	io.ReadCloser
	add func(int)
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.add(n)
	return n, err
}

// stderrOf returns the stderr an exec error carries, if any.
func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}
