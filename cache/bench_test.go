package cache

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/weightsnap/weightsnap/chunks"
)

// BenchmarkColdRead reads a 256 MiB blob through a new store, in 1 MiB
// reads, each missing chunk fetched from memory, with the default chunk
// and fetch sizes: what checking every fetched table chunk (4 MiB, the
// default) costs a cold read. The whole-content hash that follows the
// last fetch is not timed.
func BenchmarkColdRead(b *testing.B) {
	const size = 256 << 20
	data, key := content(400, size)
	tbl, err := chunks.Compute(bytes.NewReader(data), size, chunks.DefaultChunkSize, chunks.BLAKE3)
	if err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts []BlobOption
	}{{"plain", nil}, {"table", []BlobOption{WithTable(tbl)}}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			p := make([]byte, 1<<20)
			b.SetBytes(size)
			b.ReportAllocs()
			root := b.TempDir()
			i := 0
			for b.Loop() {
				dir := filepath.Join(root, string(rune('a'+i%26)))
				i++
				s, err := Open(dir)
				if err != nil {
					b.Fatal(err)
				}
				blob, err := s.Blob(key, size, newSource(data).fetch, tc.opts...)
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < size; off += int64(len(p)) {
					if _, err := blob.ReadAt(ctx, p, off); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				blob.Close()
				s.Close()
				os.RemoveAll(dir)
				b.StartTimer()
			}
		})
	}
}
