// Package imagebuild makes weightsnapd's OCI image without a container
// engine: one layer holding the static binary (and, if given, a CA
// bundle), on an empty base, as ko does. The same inputs give the same
// digest: every timestamp in the layer and the config is fixed, and the
// entries are written in one order.
package imagebuild

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	// BinaryPath is where the daemon's binary lives in the image, and the
	// image's entrypoint.
	BinaryPath = "/usr/bin/weightsnapd"
	// CACertsPath is where a CA bundle goes: the first file Go's
	// crypto/x509 looks for on Linux.
	CACertsPath = "/etc/ssl/certs/ca-certificates.crt"
)

// epoch is the time of every file and of the config: a fixed one, so that
// a rebuild of the same source is the same image.
var epoch = time.Unix(0, 0).UTC()

// Spec is what goes into the image.
type Spec struct {
	// Binary is the static linux binary of weightsnapd (CGO_ENABLED=0).
	Binary []byte
	// CACerts is a PEM bundle of registry CAs; empty: none, and HTTPS
	// registries then need one mounted at CACertsPath.
	CACerts []byte
	// Arch is the GOARCH the binary was built for (amd64, arm64).
	Arch string
	// Labels are the config's labels (org.opencontainers.image.revision,
	// say).
	Labels map[string]string
}

// Build returns the image.
func Build(s Spec) (v1.Image, error) {
	if len(s.Binary) == 0 {
		return nil, errors.New("imagebuild: no binary")
	}
	if s.Arch == "" {
		return nil, errors.New("imagebuild: no architecture")
	}
	layerTar, err := rootfs(s)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("imagebuild: layer: %w", err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "weightsnap imagebuild",
			Comment:   BinaryPath,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("imagebuild: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", s.Arch
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{BinaryPath}
	// HOME locates the docker config.json that weightsnapd reads
	// credentials from (/root/.docker in the DaemonSet).
	cf.Config.Env = []string{"PATH=/usr/bin:/bin", "HOME=/root"}
	cf.Config.Labels = s.Labels
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("imagebuild: config: %w", err)
	}
	return img, nil
}

// BuildFiles is Build with the binary and CA bundle read from files;
// caCerts may be empty.
func BuildFiles(binary, caCerts, arch string, labels map[string]string) (v1.Image, error) {
	s := Spec{Arch: arch, Labels: labels}
	var err error
	if s.Binary, err = os.ReadFile(binary); err != nil {
		return nil, err
	}
	if caCerts != "" {
		if s.CACerts, err = os.ReadFile(caCerts); err != nil {
			return nil, err
		}
	}
	return Build(s)
}

// rootfs is the layer's tar: the directories the daemon needs (/tmp for
// temporary files, /root for HOME, the mount points the DaemonSet uses
// exist anyway as volumes) and the files.
func rootfs(s Spec) ([]byte, error) {
	type entry struct {
		name string
		mode int64
		data []byte
		dir  bool
	}
	entries := []entry{{name: "etc/", mode: 0o755, dir: true}}
	if len(s.CACerts) > 0 {
		entries = append(entries,
			entry{name: "etc/ssl/", mode: 0o755, dir: true},
			entry{name: "etc/ssl/certs/", mode: 0o755, dir: true},
			entry{name: CACertsPath[1:], mode: 0o644, data: s.CACerts})
	}
	entries = append(entries, []entry{
		{name: "root/", mode: 0o700, dir: true},
		{name: "tmp/", mode: 0o1777, dir: true},
		{name: "usr/", mode: 0o755, dir: true},
		{name: "usr/bin/", mode: 0o755, dir: true},
		{name: BinaryPath[1:], mode: 0o755, data: s.Binary},
	}...)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: e.mode, ModTime: epoch}
		if e.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
