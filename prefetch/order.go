package prefetch

import (
	"cmp"
	"path"
	"slices"
	"strings"
)

const (
	// HeaderBytes is how much of each *.safetensors file ModelOrder puts
	// early: the 8-byte header length and the JSON header behind it, which
	// is well under 1 MiB even for shards of thousands of tensors.
	HeaderBytes = 1 << 20
	// MetaMaxBytes bounds a file ModelOrder treats as metadata by its name.
	MetaMaxBytes = 64 << 20
)

// File is one regular file of a layer and the blob range holding its bytes.
type File struct {
	Name  string // path in the layer
	Range Range
}

// ModelOrder orders a blob of blobSize bytes for background fill so that a
// model loader waits as little as possible: first the small metadata files
// (config.json, generation_config.json, tokenizer*, *.json, *.txt,
// *.model, *.jinja), then the first HeaderBytes of every *.safetensors
// file, then the rest of every file in path order, then every byte of the
// blob no file holds (archive headers, padding, the index). The ranges
// cover [0, blobSize) exactly once; where files share bytes, the bytes go
// with the file starting first in the blob.
func ModelOrder(files []File, blobSize int64) []Range {
	type entry struct {
		name string
		r    Range
	}
	// Make the files' ranges disjoint, in blob order.
	byOff := make([]entry, 0, len(files))
	for _, f := range files {
		if r := f.Range.clip(blobSize); r.Len > 0 {
			byOff = append(byOff, entry{f.Name, r})
		}
	}
	slices.SortStableFunc(byOff, func(a, b entry) int { return cmp.Compare(a.r.Off, b.r.Off) })
	var (
		owned []entry
		gaps  []Range
		pos   int64
	)
	for _, e := range byOff {
		if e.r.Off > pos {
			gaps = append(gaps, Range{Off: pos, Len: e.r.Off - pos})
		}
		if e.r.End() <= pos {
			continue
		}
		start := max(e.r.Off, pos)
		owned = append(owned, entry{e.name, Range{Off: start, Len: e.r.End() - start}})
		pos = e.r.End()
	}
	if pos < blobSize {
		gaps = append(gaps, Range{Off: pos, Len: blobSize - pos})
	}
	slices.SortStableFunc(owned, func(a, b entry) int { return strings.Compare(a.name, b.name) })

	var out []Range
	add := func(r Range) {
		if r.Len <= 0 {
			return
		}
		if n := len(out); n > 0 && out[n-1].End() == r.Off {
			out[n-1].Len += r.Len
			return
		}
		out = append(out, r)
	}
	var rest []Range
	for _, e := range owned {
		if isMeta(e.name, e.r.Len) {
			add(e.r)
		}
	}
	for _, e := range owned {
		switch {
		case isMeta(e.name, e.r.Len):
		case strings.HasSuffix(e.name, ".safetensors"):
			h := min(int64(HeaderBytes), e.r.Len)
			add(Range{Off: e.r.Off, Len: h})
			rest = append(rest, Range{Off: e.r.Off + h, Len: e.r.Len - h})
		default:
			rest = append(rest, e.r)
		}
	}
	for _, r := range rest {
		add(r)
	}
	for _, r := range gaps {
		add(r)
	}
	return out
}

// isMeta reports whether a file is one a loader reads before the weights.
func isMeta(name string, size int64) bool {
	if size > MetaMaxBytes {
		return false
	}
	base := strings.ToLower(path.Base(name))
	if strings.HasPrefix(base, "tokenizer") {
		return true
	}
	switch path.Ext(base) {
	case ".json", ".txt", ".model", ".jinja":
		return true
	}
	return false
}
