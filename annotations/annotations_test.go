package annotations

import (
	"encoding/json"
	"maps"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// descs returns descriptors of layers of the digests ds ("sha256:…").
func descs(ds ...string) []v1.Descriptor {
	var out []v1.Descriptor
	for _, d := range ds {
		alg, hex, _ := strings.Cut(d, ":")
		out = append(out, v1.Descriptor{Digest: v1.Hash{Algorithm: alg, Hex: hex}})
	}
	return out
}

func TestSplit(t *testing.T) {
	m, c := Split(map[string]string{
		"dev.weightsnap.chunks.v2":       "t",
		"org.opencontainers.image.title": "w.bin",
		"dev.weightsnap.tarheaders.v1":   "h",
		"dev.weightsnapper.not-ours.v1":  "x",
	})
	if want := map[string]string{"org.opencontainers.image.title": "w.bin", "dev.weightsnapper.not-ours.v1": "x"}; !maps.Equal(m, want) {
		t.Errorf("manifest %v, want %v", m, want)
	}
	if want := map[string]string{"dev.weightsnap.chunks.v2": "t", "dev.weightsnap.tarheaders.v1": "h"}; !maps.Equal(c, want) {
		t.Errorf("config %v, want %v", c, want)
	}
	if m, c := Split(nil); m != nil || c != nil {
		t.Errorf("Split(nil) = %v, %v", m, c)
	}
}

// SetInConfig and FromConfig round-trip, keep every other member of the
// config, and give the same bytes for the same input.
func TestConfigRoundTrip(t *testing.T) {
	raw := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:a"]},"x-other":{"kept":[1,2]}}`)
	layers := map[string]map[string]string{"sha256:a": {"dev.weightsnap.chunks.v2": "t"}}
	out, err := SetInConfig(raw, layers)
	if err != nil {
		t.Fatal(err)
	}
	if got := FromConfig(out, descs("sha256:a")); !reflect.DeepEqual(got, layers) {
		t.Errorf("FromConfig = %v, want %v", got, layers)
	}
	var before, after map[string]any
	json.Unmarshal(raw, &before)
	json.Unmarshal(out, &after)
	delete(after, ConfigKey)
	if !reflect.DeepEqual(before, after) {
		t.Errorf("other members changed:\n%v\nwas\n%v", after, before)
	}
	again, err := SetInConfig(raw, layers)
	if err != nil || string(again) != string(out) {
		t.Errorf("a second encoding differs: %s, was %s (%v)", again, out, err)
	}
	// Setting none removes the member.
	none, err := SetInConfig(out, nil)
	if err != nil {
		t.Fatal(err)
	}
	if FromConfig(none, descs("sha256:a")) != nil {
		t.Errorf("%s: the member is still there", none)
	}
	if _, err := SetInConfig([]byte("null"), layers); err == nil {
		t.Error("SetInConfig(null): no error")
	}
}

// A member of the wrong shape, or holding only other keys, is no
// annotations at all.
func TestFromConfigMalformed(t *testing.T) {
	for _, raw := range []string{
		`{"dev.weightsnap.layer-annotations": "a string"}`,
		`{"dev.weightsnap.layer-annotations": {"sha256:x": ["a"]}}`,
		`{"dev.weightsnap.layer-annotations": {"sha256:x": {"other.key": "v"}}}`,
		`not json`,
		`{}`,
	} {
		if got := FromConfig([]byte(raw), descs("sha256:x")); got != nil {
			t.Errorf("FromConfig(%s) = %v, want none", raw, got)
		}
	}
}

// Only the wanted layers' entries are read; the member is found by its
// exact name, and the last of that name counts.
func TestFromConfigReadsTheWantedLayers(t *testing.T) {
	raw := `{"x":[1,{"y":2}],
		"DEV.WEIGHTSNAP.LAYER-ANNOTATIONS": {"sha256:a": {"dev.weightsnap.k": "case"}},
		"dev.weightsnap.layer-annotations": {"sha256:a": {"dev.weightsnap.k": "first"}},
		"dev.weightsnap.layer-annotations": {
			"sha256:other": ["not", "read"],
			"sha256:a": {"dev.weightsnap.k": "v", "org.x": "dropped"},
			"sha256:b": {"dev.weightsnap.k": "b"}
		}}`
	got := FromConfig([]byte(raw), descs("sha256:a", "sha256:c"))
	want := map[string]map[string]string{"sha256:a": {"dev.weightsnap.k": "v"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("FromConfig = %v, want %v", got, want)
	}
}

func TestMergeKeepsTheManifestsValue(t *testing.T) {
	got := Merge(map[string]string{"k": "manifest", "m": "1"}, map[string]string{"k": "config", "c": "2"})
	if want := map[string]string{"k": "manifest", "m": "1", "c": "2"}; !maps.Equal(got, want) {
		t.Errorf("Merge = %v, want %v", got, want)
	}
	m := map[string]string{"k": "v"}
	if got := Merge(m, nil); !maps.Equal(got, m) {
		t.Errorf("Merge(m, nil) = %v", got)
	}
}
