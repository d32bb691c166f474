// Package prefetch decides when and how much of a lazily pulled blob to
// fetch ahead of its readers: read-ahead for sequential readers of a file,
// and a background fill of the whole blob, in an order that serves model
// loaders first (metadata, then safetensors headers, then tensors).
//
// It knows nothing of FUSE, tar or HTTP. It drives a [Target] (the node
// cache's *cache.Blob satisfies it), and a single node-wide [Scheduler]
// shares the registry bandwidth between every target: read-ahead outranks
// background fill, and the fill runs under its own concurrency and
// bandwidth caps.
package prefetch

import (
	"context"
	"fmt"
)

// Target is a random-access blob whose byte ranges can be made present
// locally. *cache.Blob implements it.
type Target interface {
	// Fetch makes [off, off+n) present, fetching what is missing.
	Fetch(ctx context.Context, off, n int64) error
	// Present reports whether [off, off+n) is already present.
	Present(off, n int64) bool
	// Size is the blob's length in bytes.
	Size() int64
}

// Range is the byte range [Off, Off+Len) of a blob.
type Range struct{ Off, Len int64 }

// End returns the offset just past the range.
func (r Range) End() int64 { return r.Off + r.Len }

// String formats r as [off,end) for logs and errors.
func (r Range) String() string { return fmt.Sprintf("[%d,%d)", r.Off, r.End()) }

// clip returns r ∩ [0, size).
func (r Range) clip(size int64) Range {
	off := max(r.Off, 0)
	end := min(r.End(), size)
	if end <= off {
		return Range{Off: off}
	}
	return Range{Off: off, Len: end - off}
}

const (
	// DefaultSpanSize is the size of one fetch, one range request: large
	// enough that a request's latency (≈ 3–30 ms) is small next to its
	// transfer time, and that a registry's work per request is small
	// next to its work per byte (the CNCF registry spent 1.3–1.7 CPU-s
	// per GiB served in 8 MiB ranges, 0.85–0.96 in 32 MiB ranges or one
	// GET). The cache lands it in runs of 8 MiB as they arrive.
	DefaultSpanSize = 32 << 20
	// DefaultMaxWindow bounds a sequential reader's read-ahead: 2 spans
	// in flight, each landing in runs as it comes.
	DefaultMaxWindow = 64 << 20
	// DefaultWorkers is the node-wide number of concurrent fetches.
	DefaultWorkers = 16
	// DefaultBackgroundWorkers is how many of those the background fill may use.
	DefaultBackgroundWorkers = 4
)
