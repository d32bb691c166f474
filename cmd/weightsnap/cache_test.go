package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
)

// fillCache makes a cache in a new directory holding a whole verified
// blob that an image record names and a partial blob that none names,
// and returns the directory, the two keys and the manifest digest.
func fillCache(t *testing.T) (dir string, named, unnamed, manifest digest.Digest) {
	t.Helper()
	dir = t.TempDir()
	s, err := cache.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := func(seed uint64, n int) []byte {
		b := make([]byte, n)
		r := rand.New(rand.NewPCG(seed, seed))
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	a, b := data(1, 3<<20+5), data(2, 4<<20)
	named, unnamed = digest.FromBytes(a), digest.FromBytes(b)
	fetch := func(src []byte) cache.FetchFunc {
		return func(_ context.Context, p []byte, off int64) error { copy(p, src[off:]); return nil }
	}
	ha, err := s.Blob(named, int64(len(a)), fetch(a))
	if err != nil {
		t.Fatal(err)
	}
	if err := ha.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	ha.Close()
	hb, err := s.Blob(unnamed, int64(len(b)), fetch(b))
	if err != nil {
		t.Fatal(err)
	}
	if err := hb.Fetch(context.Background(), 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	hb.Close()
	manifest = digest.FromString("manifest")
	rec, _ := json.Marshal(map[string]any{"layers": []map[string]any{{"digest": named, "size": len(a)}}})
	if err := s.PutMeta("image/sha256-"+manifest.Encoded()+".json", rec); err != nil {
		t.Fatal(err)
	}
	return dir, named, unnamed, manifest
}

func TestCacheCommands(t *testing.T) {
	dir, named, unnamed, manifest := fillCache(t)
	ctx := context.Background()

	var out bytes.Buffer
	if err := cacheList(&out, dir); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("list printed %d lines, want a header and 2:\n%s", len(lines), out.String())
	}
	for _, want := range [][]string{
		{"blob", named.String(), "100.0%", "yes", manifest.String()},
		{"blob", unnamed.String(), "25.0%", "no", " -"},
	} {
		i := 1
		if !strings.Contains(lines[1], want[1]) {
			i = 2
		}
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("list line %q lacks %q", lines[i], w)
			}
		}
	}

	out.Reset()
	if err := cacheUsage(&out, dir, 10<<20); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "in 2 blobs and 0 streams") || !strings.Contains(out.String(), "(4194309 bytes)") ||
		!strings.Contains(out.String(), "40.0% used") {
		t.Errorf("usage:\n%s", out.String())
	}

	// prune and verify refuse while another Store has the cache open.
	s, err := cache.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, run := range []func() error{
		func() error { return cachePrune(&out, dir, false) },
		func() error { return cacheVerify(ctx, &out, dir, nil) },
	} {
		if err := run(); err == nil || !strings.Contains(err.Error(), "in use") {
			t.Errorf("while the cache is open: %v, want it refused as in use", err)
		}
	}
	s.Close()

	out.Reset()
	if err := cachePrune(&out, dir, false); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "removed blob "+unnamed.String()) || strings.Contains(out.String(), named.String()) ||
		!strings.Contains(out.String(), "1 removed") {
		t.Errorf("prune:\n%s", out.String())
	}
	if entries, _ := cache.Inspect(dir); len(entries) != 1 || entries[0].Key != named {
		t.Errorf("after prune: %+v", entries)
	}

	out.Reset()
	if err := cacheVerify(ctx, &out, dir, nil); err != nil {
		t.Fatalf("verify: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "ok        "+named.String()) {
		t.Errorf("verify:\n%s", out.String())
	}

	// One flipped byte in the data file.
	data := filepath.Join(dir, "blobs", "sha256", named.Encoded()+".data")
	f, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var c [1]byte
	f.ReadAt(c[:], 2<<20+7)
	c[0] ^= 0xff
	f.WriteAt(c[:], 2<<20+7)
	f.Close()
	out.Reset()
	if err := cacheVerify(ctx, &out, dir, []string{named.String()}); err == nil {
		t.Errorf("verify of a corrupt blob succeeded:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "mismatch  "+named.String()) || !strings.Contains(out.String(), "removed") {
		t.Errorf("verify:\n%s", out.String())
	}
	if entries, _ := cache.Inspect(dir); len(entries) != 0 {
		t.Errorf("after verify: %+v", entries)
	}

	out.Reset()
	fillDir, _, _, _ := fillCache(t)
	if err := cachePrune(&out, fillDir, true); err != nil {
		t.Fatal(err)
	}
	if entries, _ := cache.Inspect(fillDir); len(entries) != 0 || !strings.Contains(out.String(), "2 removed") {
		t.Errorf("prune --all:\n%s\nleft %+v", out.String(), entries)
	}
}
