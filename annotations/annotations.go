// Package annotations keeps weightsnap's layer annotations (chunk tables,
// tar headers) in the image config instead of the manifest.
//
// A chunk table grows with its layer: 171 KiB of manifest for a 16 GiB
// weights file. Everything that handles an image parses its manifest,
// many times over: the registry on every GET and HEAD, containerd while it
// pulls and about ten times more as its CRI plugin records the image, this
// node too. That cost was most of what a 16 GiB image added to the time to
// first read over a 2 GiB one. The config is pinned by the manifest as
// firmly as an annotation is (the manifest names it by digest), a
// registry serves it as a blob without parsing it, and containerd reads it
// a few times where it reads the manifest many, so the manifest stays the
// same size whatever the model's.
//
// The config gets one more top-level member, ConfigKey, mapping a layer's
// digest to that layer's weightsnap annotations. Other tools ignore a
// member they do not know, as they do an annotation.
package annotations

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ConfigKey is the config member that holds layer annotations, by layer
// digest.
const ConfigKey = "dev.weightsnap.layer-annotations"

// Prefix is what every weightsnap annotation key starts with. Only such
// keys are moved into the config, and only such keys are read from it.
const Prefix = "dev.weightsnap."

// Split divides a layer descriptor's annotations into those that stay in
// the manifest and weightsnap's, which go into the config. Either may be
// nil.
func Split(ann map[string]string) (manifest, config map[string]string) {
	for k, v := range ann {
		m := &manifest
		if strings.HasPrefix(k, Prefix) {
			m = &config
		}
		if *m == nil {
			*m = map[string]string{}
		}
		(*m)[k] = v
	}
	return manifest, config
}

// FromConfig returns the layer annotations the raw config holds for
// layers (a manifest's), by layer digest. Entries for other digests are
// skipped unread, so a config cannot make a reader hold more than its own
// layers' annotations. A config that is not a JSON object, or whose member
// is not a map of maps of strings where a wanted layer's entry is, has
// none: a layer whose table cannot be read is a layer without one. Keys
// without Prefix are dropped. The member's name is matched exactly (as
// SetInConfig writes it, unlike encoding/json's field matching).
func FromConfig(raw []byte, layers []v1.Descriptor) map[string]map[string]string {
	want := make(map[string]bool, len(layers))
	for _, l := range layers {
		want[l.Digest.String()] = true
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil
	}
	var found map[string]map[string]string
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil
		}
		if t != ConfigKey {
			if skip(dec) != nil {
				return nil
			}
			continue
		}
		// The last member of the name counts, as with encoding/json.
		if found, err = wanted(dec, want); err != nil {
			return nil
		}
	}
	if len(found) == 0 {
		return nil
	}
	return found
}

// wanted decodes the member's value, at dec, keeping the entries of the
// wanted digests.
func wanted(dec *json.Decoder, want map[string]bool) (map[string]map[string]string, error) {
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, fmt.Errorf("%s is not an object", ConfigKey)
	}
	layers := map[string]map[string]string{}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		d, _ := t.(string)
		if !want[d] {
			if err := skip(dec); err != nil {
				return nil, err
			}
			continue
		}
		var ann map[string]string
		if err := dec.Decode(&ann); err != nil {
			return nil, err
		}
		maps.DeleteFunc(ann, func(k, _ string) bool { return !strings.HasPrefix(k, Prefix) })
		if len(ann) > 0 {
			layers[d] = ann
		}
	}
	_, err := dec.Token() // the closing brace
	return layers, err
}

// skip reads past the value at dec.
func skip(dec *json.Decoder) error {
	var v json.RawMessage
	return dec.Decode(&v)
}

// Merge returns the annotations of a layer whose descriptor has manifest
// and whose config entry has config. A key in both keeps the manifest's
// value, which is what versions that read only the manifest use.
func Merge(manifest, config map[string]string) map[string]string {
	if len(config) == 0 {
		return manifest
	}
	out := maps.Clone(config)
	maps.Copy(out, manifest)
	return out
}

// SetInConfig returns raw, a config, with its layer annotations replaced
// by layers (removed when layers is empty). Every other member keeps its
// value; the config is encoded again, members sorted by name and without
// spaces, as encoding/json writes them, so the same input gives the same
// bytes.
func SetInConfig(raw []byte, layers map[string]map[string]string) ([]byte, error) {
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if cfg == nil {
		return nil, fmt.Errorf("config is null")
	}
	delete(cfg, ConfigKey)
	if len(layers) > 0 {
		b, err := json.Marshal(layers)
		if err != nil {
			return nil, err
		}
		cfg[ConfigKey] = b
	}
	return json.Marshal(cfg)
}
