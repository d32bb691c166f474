package testutil

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
)

// manifestAccept is what DeleteImage accepts for a tag: the image
// manifests the tests push.
var manifestAccept = []string{
	"application/vnd.oci.image.manifest.v1+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

// DeleteImage deletes the image repo:tag through the registry's API: its
// manifest by digest (which drops every tag naming it) and the
// repository's links to the manifest's config and layers. The registry
// keeps the blobs' data on disk until GarbageCollect; a blob another
// repository or manifest names stays. It returns the digests of the
// blobs the manifest named.
func (r *Registry) DeleteImage(ctx context.Context, repo, tag string) ([]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.URL()+"/v2/"+repo+"/manifests/"+tag, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", strings.Join(manifestAccept, ", "))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("delete %s:%s: %w", repo, tag, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("delete %s:%s: reading its manifest: %w", repo, tag, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("delete %s:%s: GET manifest: %s", repo, tag, resp.Status)
	}
	dgst := resp.Header.Get("Docker-Content-Digest")
	var m struct {
		Config struct {
			Digest string `json:"digest"`
		} `json:"config"`
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(body, &m); err != nil || dgst == "" || m.Config.Digest == "" {
		return nil, fmt.Errorf("delete %s:%s: not an image manifest with a digest (%v): %.200s", repo, tag, err, bytes.TrimSpace(body))
	}
	if err := r.delete(ctx, "/v2/"+repo+"/manifests/"+dgst); err != nil {
		return nil, fmt.Errorf("delete %s:%s: %w", repo, tag, err)
	}
	blobs := []string{m.Config.Digest}
	for _, l := range m.Layers {
		blobs = append(blobs, l.Digest)
	}
	for _, b := range blobs {
		if err := r.delete(ctx, "/v2/"+repo+"/blobs/"+b); err != nil {
			return nil, fmt.Errorf("delete %s:%s: %w", repo, tag, err)
		}
	}
	return blobs, nil
}

// delete sends DELETE path; a 404 (a blob listed twice, already unlinked)
// is not an error.
func (r *Registry) delete(ctx context.Context, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, r.URL()+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted && resp.StatusCode != http.StatusNotFound {
		return fmt.Errorf("DELETE %s: %s", path, resp.Status)
	}
	return nil
}

// GarbageCollect runs the registry's garbage collector over its storage
// (`docker-registry garbage-collect`): the data of every blob no manifest
// names is deleted from disk. It must not run while an image is being
// pushed, whose blobs no manifest names yet.
func (r *Registry) GarbageCollect(ctx context.Context) error {
	cmd := exec.CommandContext(ctx, r.bin, "garbage-collect", r.config)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("registry garbage-collect: %w\n%s", err, out)
	}
	return nil
}
