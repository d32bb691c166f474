package cache

import (
	"errors"
	iofs "io/fs"
	"os"
	"path/filepath"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

// TestInspect fills a store with a whole verified blob, a partial one, a
// blob kept under a key of its own and a sealed stream, and checks what
// Inspect reads of them, with the store open and after it closed.
func TestInspect(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testOptions()...)
	whole, wholeKey := content(1, 5*testChunk+100)
	part, partKey := content(2, 8*testChunk)
	own, ownDigest := content(3, 3*testChunk)
	ownKey := digest.FromString("unverified example.com/repo@" + ownDigest.String())

	b := openBlob(t, s, wholeKey, int64(len(whole)), newSource(whole).fetch)
	readAll(t, b, whole, testChunk)
	verify(t, b)
	p := openBlob(t, s, partKey, int64(len(part)), newSource(part).fetch)
	if _, err := readRange(p, 2*testChunk, testChunk+1); err != nil { // chunks 2 and 3
		t.Fatal(err)
	}
	o := openBlob(t, s, ownKey, int64(len(own)), newSource(own).fetch, WithContentDigest(ownDigest))
	verify(t, o)
	stData, stKey := content(4, 3000)
	st := openStream(t, s, stKey, true)
	if _, err := st.Write(stData); err != nil {
		t.Fatal(err)
	}
	if err := st.Seal(); err != nil {
		t.Fatal(err)
	}
	for _, h := range []interface{ Close() error }{b, p, o, st} {
		h.Close() // flushes the records
	}

	check := func(got []EntryInfo) {
		t.Helper()
		want := map[digest.Digest]EntryInfo{
			wholeKey: {Kind: KindBlob, Key: wholeKey, Size: int64(len(whole)), Present: int64(len(whole)), Complete: true},
			partKey:  {Kind: KindBlob, Key: partKey, Size: int64(len(part)), Present: 2 * testChunk},
			ownKey:   {Kind: KindBlob, Key: ownKey, Size: int64(len(own)), Present: int64(len(own)), Complete: true},
			stKey:    {Kind: KindStream, Key: stKey, Size: 3000, Present: 3000, Complete: true},
		}
		if len(got) != len(want) {
			t.Fatalf("Inspect: %d entries, want %d: %+v", len(got), len(want), got)
		}
		for i, e := range got {
			w := want[e.Key]
			if e.Kind != w.Kind || e.Size != w.Size || e.Present != w.Present || e.Complete != w.Complete {
				t.Errorf("entry %s: %+v, want %+v", e.Key, e, w)
			}
			if e.DiskBytes < e.Present {
				t.Errorf("entry %s: %d bytes on disk, fewer than the %d present", e.Key, e.DiskBytes, e.Present)
			}
			if i > 0 && (got[i-1].Kind > e.Kind || got[i-1].Kind == e.Kind && got[i-1].Key >= e.Key) {
				t.Errorf("entries not sorted: %s before %s", got[i-1].Key, e.Key)
			}
		}
		for _, e := range got {
			switch e.Key {
			case wholeKey, stKey:
				if !e.VerifiedAgainst(e.Key) {
					t.Errorf("%s: not verified against its key", e.Key)
				}
			case ownKey:
				if e.VerifiedAgainst(ownKey) || !e.VerifiedAgainst(ownDigest) {
					t.Errorf("%s: VerifiedAgainst(key) = %v, VerifiedAgainst(content digest) = %v, want false, true",
						e.Key, e.VerifiedAgainst(ownKey), e.VerifiedAgainst(ownDigest))
				}
			case partKey:
				if e.VerifiedAgainst(partKey) {
					t.Errorf("%s: partial blob VerifiedAgainst its key", e.Key)
				}
			}
		}
	}
	got, err := s.Entries()
	if err != nil {
		t.Fatal(err)
	}
	check(got) // while the store holds the lock
	var sum int64
	for _, e := range got {
		sum += e.Present
	}
	if sum != s.Usage() {
		t.Errorf("present bytes add up to %d, Usage is %d", sum, s.Usage())
	}
	s.Close()
	got, err = Inspect(dir)
	if err != nil {
		t.Fatal(err)
	}
	check(got)
}

// TestInspectChangesNothing: files the Store would clean up at Open are
// left where they are, and left out.
func TestInspectChangesNothing(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testOptions()...)
	s.Close()
	_, key := content(1, 10)
	data, rec := blobFiles(dir, key)
	os.MkdirAll(filepath.Dir(data), 0o700)
	os.WriteFile(data, []byte("orphan"), 0o600) // data without records
	os.WriteFile(rec+".x", nil, 0o600)
	damaged := filepath.Join(filepath.Dir(data), digest.FromString("x").Encoded()+".rec")
	os.WriteFile(damaged, []byte("not a header"), 0o600)
	got, err := Inspect(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 0 {
		t.Errorf("Inspect: %+v, want nothing", got)
	}
	for _, p := range []string{data, rec + ".x", damaged} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("Inspect changed the directory: %v", err)
		}
	}
	if _, err := Inspect(filepath.Join(dir, "none")); err == nil {
		t.Error("Inspect of a missing directory: no error")
	}
}

func TestReadMeta(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testOptions()...)
	for name, v := range map[string]string{"image/sha256-a.json": "a", "image/sha256-b.json": "b", "layer/x.json": "x"} {
		if err := s.PutMeta(name, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, "meta", "image", ".tmp-1"), []byte("half"), 0o600)
	got, err := ReadMeta(dir, "image/")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || string(got["image/sha256-a.json"]) != "a" || string(got["image/sha256-b.json"]) != "b" {
		t.Errorf("ReadMeta: %q", got)
	}
	if got, err := ReadMeta(t.TempDir(), "image/"); err != nil || len(got) != 0 {
		t.Errorf("ReadMeta of an empty directory: %q, %v", got, err)
	}
}

func TestRemove(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testOptions()...)
	data, key := content(1, 4*testChunk)
	b := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	readAll(t, b, data, testChunk)
	verify(t, b) // so that no verification run holds the blob after Close
	stData, stKey := content(2, 100)
	st := openStream(t, s, stKey, true)
	st.Write(stData)
	st.Seal()
	st.Close()

	if _, err := s.Remove(KindBlob, key); !errors.Is(err, ErrInUse) {
		t.Fatalf("Remove of an open blob: %v, want ErrInUse", err)
	}
	b.Close()
	n, err := s.Remove(KindBlob, key)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("Remove = %d, %v; want %d", n, err, len(data))
	}
	if _, err := s.Remove(KindBlob, key); !errors.Is(err, iofs.ErrNotExist) {
		t.Errorf("second Remove: %v, want ErrNotExist", err)
	}
	if n, err := s.Remove(KindStream, stKey); err != nil || n != 100 {
		t.Errorf("Remove stream = %d, %v; want 100", n, err)
	}
	if s.Usage() != 0 {
		t.Errorf("Usage after removing everything: %d", s.Usage())
	}
	if got, _ := s.Entries(); len(got) != 0 {
		t.Errorf("Entries after removing everything: %+v", got)
	}
	dataPath, recPath := blobFiles(dir, key)
	for _, p := range []string{dataPath, recPath} {
		if _, err := os.Stat(p); !errors.Is(err, iofs.ErrNotExist) {
			t.Errorf("%s still there: %v", p, err)
		}
	}
	// The key can be cached again.
	b2 := openBlob(t, s, key, int64(len(data)), newSource(data).fetch)
	readAll(t, b2, data, testChunk)
}
