package integration

// The benchmark's loader: the tool's "load" mode, checked against files
// whose header order is neither the order of their data nor sorted.

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestBenchLoaderFollowsHeaderOrder checks that "tool load" takes the
// tensors file after file in the order given and, within a file, in the
// order its header lists them, and that with one thread or four it touches
// one byte of every page of every tensor and reports the tensor bytes.
func TestBenchLoaderFollowsHeaderOrder(t *testing.T) {
	tool := toolBinary(t)
	dir := t.TempDir()
	const mib = 1 << 20
	type span struct {
		name       string
		start, end int64 // data offsets
	}
	shards := []struct {
		name   string
		header string
		spans  []span // in header order
		data   int64
	}{
		// The header lists zeta, alpha, mid; the data holds alpha, mid, zeta.
		{"model-00001-of-00002.safetensors",
			`{"zeta":{"dtype":"U8","shape":[3145728],"data_offsets":[3145728,6291456]},"__metadata__":{"format":"pt"},` +
				`"alpha":{"dtype":"U8","shape":[1048576],"data_offsets":[0,1048576]},"mid":{"dtype":"U8","shape":[2097152],"data_offsets":[1048576,3145728]}}   `,
			[]span{{"zeta", 3 * mib, 6 * mib}, {"alpha", 0, mib}, {"mid", mib, 3 * mib}}, 6 * mib},
		// b before a, data a then b.
		{"model-00002-of-00002.safetensors",
			`{"b":{"dtype":"U8","shape":[5],"data_offsets":[1048576,1048581]},"a":{"dtype":"U8","shape":[1048576],"data_offsets":[0,1048576]}}`,
			[]span{{"b", mib, mib + 5}, {"a", 0, mib}}, mib + 5},
	}
	files := []string{filepath.Join(dir, "config.json")}
	if err := os.WriteFile(files[0], []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	var want []string
	var wantBytes int64
	var wantSum uint64
	page := int64(os.Getpagesize())
	for i, sh := range shards {
		b := binary.LittleEndian.AppendUint64(nil, uint64(len(sh.header)))
		b = append(b, sh.header...)
		base := int64(len(b))
		for j := range sh.data {
			b = append(b, byte(j*7%251+1))
		}
		path := filepath.Join(dir, sh.name)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, path)
		for _, s := range sh.spans {
			want = append(want, fmt.Sprintf("%d %s", i, s.name))
			wantBytes += s.end - s.start
			// The first byte of the tensor, then one at each page boundary
			// of the file inside it.
			for p := base + s.start; p < base+s.end; p += page - p%page {
				wantSum += uint64(b[p])
			}
		}
	}
	load := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(tool, append(append([]string{"load"}, args...), files...)...).Output()
		if err != nil {
			t.Fatalf("tool load %v: %v", args, err)
		}
		return string(out)
	}

	var order []string
	for l := range strings.SplitSeq(load("-plan"), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "tensor" {
			order = append(order, fmt.Sprintf("%d %s", slices.Index(files, f[1])-1, f[2]))
		}
	}
	if !slices.Equal(order, want) {
		t.Errorf("load order %q, want the headers' %q", order, want)
	}

	for _, threads := range []string{"1", "4"} {
		out := load("-threads", threads)
		tr, err := parseToolOutput(strings.Split(out, "\n"))
		if err != nil {
			t.Fatal(err)
		}
		if tr.bytes != wantBytes {
			t.Errorf("%s threads: done after %d bytes, want the %d tensor bytes", threads, tr.bytes, wantBytes)
		}
		if tr.headers.IsZero() || tr.first.IsZero() || tr.first.Before(tr.headers) || tr.done.Before(tr.first) {
			t.Errorf("%s threads: events out of order: headers %v, first %v, done %v", threads, tr.headers, tr.first, tr.done)
		}
		if wantLine := fmt.Sprintf("touched %x\n", wantSum); !strings.Contains(out, wantLine) {
			t.Errorf("%s threads: no %q line:\n%s", threads, wantLine, out)
		}
	}
}
