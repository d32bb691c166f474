package layer

// Indexes are kept in the MetaStore as records, so that a remount or a
// restart does not build them again.

import (
	"bytes"
	"context"
	"encoding/gob"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"
	"strings"
)

// indexRecord is the serialized form of a complete index.
type indexRecord struct {
	Version int
	Entries []*Entry // every name, sorted
	NextIno uint64
	Data    map[uint64]int64
	Chunks  map[uint64][]chunkRef
	Refused int
}

func (x *index) marshal() ([]byte, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	rec := indexRecord{Version: indexVersion, NextIno: x.nextIno, Data: map[uint64]int64{}, Chunks: map[uint64][]chunkRef{}, Refused: x.refused}
	for _, e := range x.byName {
		rec.Entries = append(rec.Entries, e)
		if off, ok := x.data[e.Ino]; ok {
			rec.Data[e.Ino] = off
		}
		if c, ok := x.chunks[e.Ino]; ok {
			rec.Chunks[e.Ino] = c
		}
	}
	slices.SortFunc(rec.Entries, func(a, b *Entry) int { return strings.Compare(a.Name, b.Name) })
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(&rec); err != nil {
		return nil, fmt.Errorf("encode index: %w", err)
	}
	return buf.Bytes(), nil
}

// unmarshalIndex rebuilds a complete index from a record, checking that
// it is a well-formed tree so a damaged record is rejected rather than
// served.
func unmarshalIndex(layer string, b []byte) (*index, error) {
	var rec indexRecord
	if err := gob.NewDecoder(bytes.NewReader(b)).Decode(&rec); err != nil {
		return nil, fmt.Errorf("decode index: %w", err)
	}
	if rec.Version != indexVersion {
		return nil, fmt.Errorf("index version %d, want %d", rec.Version, indexVersion)
	}
	x := newIndex(layer)
	x.nextIno, x.refused = rec.NextIno, rec.Refused
	for _, e := range rec.Entries {
		if e == nil {
			return nil, errors.New("index: nil entry")
		}
		if c, ok := cleanName(e.Name); !ok || c != e.Name {
			return nil, fmt.Errorf("index: bad name %q", e.Name)
		}
		if e.Name == "" {
			x.byName[""] = e
			continue
		}
		x.byName[e.Name] = e
	}
	for _, e := range rec.Entries {
		if e.Name == "" {
			continue
		}
		if p := x.byName[parentOf(e.Name)]; p == nil || p.Type != TypeDir {
			return nil, fmt.Errorf("index: %q has no parent directory", e.Name)
		}
		x.insert(e)
	}
	if rec.Data != nil {
		x.data = rec.Data
	}
	if rec.Chunks != nil {
		x.chunks = rec.Chunks
	}
	x.finish(nil)
	return x, nil
}

// loadIndex reads the record name from meta; a missing or unusable
// record is not an error, the caller rebuilds the index.
func loadIndex(ctx context.Context, meta MetaStore, name, layer string) *index {
	if meta == nil || name == "" {
		return nil
	}
	b, err := meta.GetMeta(name)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			slog.WarnContext(ctx, "layer: reading index record", "layer", layer, "record", name, "error", err)
		}
		return nil
	}
	x, err := unmarshalIndex(layer, b)
	if err != nil {
		slog.WarnContext(ctx, "layer: ignoring unusable index record", "layer", layer, "record", name, "error", err)
		return nil
	}
	return x
}

// saveIndex stores a complete index; failing to is logged, not fatal: the
// index is rebuilt next time.
func saveIndex(ctx context.Context, meta MetaStore, name string, x *index) {
	if meta == nil || name == "" {
		return
	}
	b, err := x.marshal()
	if err == nil {
		err = meta.PutMeta(name, b)
	}
	if err != nil {
		slog.WarnContext(ctx, "layer: saving index record", "layer", x.layer, "record", name, "error", err)
	}
}
