package pack

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// TestGoldenDigests pins the bytes Build produces for modelSpec: a change
// of layout, encoding or defaults that would move every packed model to a
// new digest must be deliberate.
func TestGoldenDigests(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, modelSpec(), 0o644)
	img := build(t, dir, Options{Platform: v1.Platform{OS: "linux", Architecture: "amd64"}})

	const (
		wantManifest = "sha256:6359872c413470a30f9685997d38d22bcb24a21e781a848948e59a6c8537919e" // chunk tables and tar headers in the config
		wantConfig   = "sha256:808b0a31afa1ba90a87eb80eb975c3c02dc20f2248bad7f70e05d8079186149a" // with BLAKE3 chunk tables and tar headers
	)
	if d := digestOf(t, img); d.String() != wantManifest {
		t.Errorf("manifest digest %s, want %s", d, wantManifest)
	}
	if c, err := img.ConfigName(); err != nil || c.String() != wantConfig {
		t.Errorf("config digest %s (%v), want %s", c, err, wantConfig)
	}
}

func sha256Hash(b []byte) v1.Hash {
	s := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(s[:])}
}

// TestImageMethods checks that every v1.Image method agrees with the raw
// manifest and config.
func TestImageMethods(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tiny-llama")
	writeModel(t, dir, modelSpec(), 0o644)
	img := build(t, dir, Options{})

	rawMan, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if d := digestOf(t, img); d != sha256Hash(rawMan) {
		t.Errorf("Digest %s, sha256 of the manifest %s", d, sha256Hash(rawMan))
	}
	if n, err := img.Size(); err != nil || n != int64(len(rawMan)) {
		t.Errorf("Size %d (%v), manifest is %d bytes", n, err, len(rawMan))
	}
	if mt, err := img.MediaType(); err != nil || mt != types.OCIManifestSchema1 {
		t.Errorf("MediaType %q (%v)", mt, err)
	}
	cfgName, err := img.ConfigName()
	if err != nil || cfgName != sha256Hash(rawCfg) {
		t.Errorf("ConfigName %s (%v), sha256 of the config %s", cfgName, err, sha256Hash(rawCfg))
	}
	man, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if man.Config.Digest != cfgName || man.Config.Size != int64(len(rawCfg)) {
		t.Errorf("manifest config descriptor %+v", man.Config)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	// Parsed copies are fresh: changing one does not change the image.
	man.Layers, cfg.RootFS.DiffIDs = nil, nil
	if m2, _ := img.Manifest(); len(m2.Layers) == 0 {
		t.Error("Manifest returned a shared copy")
	}
	if c2, _ := img.ConfigFile(); len(c2.RootFS.DiffIDs) == 0 {
		t.Error("ConfigFile returned a shared copy")
	}

	// The config blob is reachable by digest, as ggcr's writers ask for it.
	cl, err := img.LayerByDigest(cfgName)
	if err != nil {
		t.Fatalf("LayerByDigest(config): %v", err)
	}
	if mt, _ := cl.MediaType(); mt != types.OCIConfigJSON {
		t.Errorf("config layer media type %q", mt)
	}
	rc, err := cl.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(b, rawCfg) {
		t.Errorf("config layer: %d bytes (%v), want the %d config bytes", len(b), err, len(rawCfg))
	}

	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	man, _ = img.Manifest()
	if len(layers) != len(man.Layers) {
		t.Fatalf("%d layers, manifest lists %d", len(layers), len(man.Layers))
	}
	for i, l := range layers {
		d, _ := l.Digest()
		for what, get := range map[string]func(v1.Hash) (v1.Layer, error){
			"LayerByDigest": img.LayerByDigest, "LayerByDiffID": img.LayerByDiffID,
		} {
			got, err := get(d)
			if err != nil {
				t.Errorf("%s(layer %d): %v", what, i, err)
				continue
			}
			gd, _ := got.Digest()
			gs, _ := got.Size()
			gm, _ := got.MediaType()
			if gd != man.Layers[i].Digest || gs != man.Layers[i].Size || gm != types.OCIUncompressedLayer {
				t.Errorf("%s(layer %d): %s, %d bytes, %q; manifest says %s, %d bytes",
					what, i, gd, gs, gm, man.Layers[i].Digest, man.Layers[i].Size)
			}
		}
	}
	missing := sha256Hash([]byte("no such blob"))
	if _, err := img.LayerByDigest(missing); err == nil {
		t.Error("LayerByDigest of an unknown digest succeeded")
	}
	if _, err := img.LayerByDiffID(missing); err == nil {
		t.Error("LayerByDiffID of an unknown diff ID succeeded")
	}
}
