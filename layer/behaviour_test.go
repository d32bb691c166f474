package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"reflect"
	"sync"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func bigTar(t testing.TB) ([]byte, []byte) {
	big := randBytes(7, 20<<20)
	return buildTar(t, []tarFile{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "before", Mode: 0o644}, data: []byte("b")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "models/weights.bin", Mode: 0o644}, data: big},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "after", Mode: 0o644}, data: []byte("a")},
	}), big
}

func TestTarIndexReadsOnlyHeaders(t *testing.T) {
	ctx := testCtx(t)
	tarb, big := bigTar(t)
	src := &memSource{b: tarb}
	meta := newMemMeta()
	d := Descriptor{Digest: sha(tarb), Size: int64(len(tarb)), MediaType: mtTar}
	l, err := openTar(ctx, d, src, meta, false)
	if err != nil {
		t.Fatal(err)
	}
	if n := src.bytesRead.Load(); n >= 64<<10 {
		t.Fatalf("indexing read %d bytes of a %d byte tar", n, len(tarb))
	}
	e, err := l.Lookup(ctx, "models/weights.bin")
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1<<20)
	if n, err := l.ReadAt(ctx, e, p, 5<<20); n != len(p) || err != nil || !bytes.Equal(p, big[5<<20:6<<20]) {
		t.Fatalf("read: n=%d err=%v", n, err)
	}
	if _, err := l.Lookup(ctx, "after"); err != nil {
		t.Fatal(err)
	}

	// Reopen: the index comes from meta, no header is read.
	src2 := &memSource{b: tarb}
	l2, err := openTar(ctx, d, src2, meta, false)
	if err != nil {
		t.Fatal(err)
	}
	if n := src2.reads.Load(); n != 0 {
		t.Fatalf("reopen with the index in meta made %d reads", n)
	}
	e2, err := l2.Lookup(ctx, "models/weights.bin")
	if err != nil || e2.Ino != e.Ino || e2.Size != e.Size {
		t.Fatalf("reopened entry %+v, %v; first %+v", e2, err, e)
	}
	if got := readAll(t, ctx, l2, e2); !bytes.Equal(got, big) {
		t.Fatal("reopened content differs")
	}
	ents, err := l2.ReadDir(ctx, "")
	if err != nil || len(ents) != 3 {
		t.Fatalf("readdir after reopen: %d entries, %v", len(ents), err)
	}
}

// A streamed layer serves an early file before the rest of the blob has
// arrived: the test holds the second half of the blob back until the read
// of the first file has returned.
func TestStreamReadBeforeComplete(t *testing.T) {
	ctx := testCtx(t)
	early := []byte("config contents")
	tarb := buildTar(t, []tarFile{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "config.json", Mode: 0o644}, data: early},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "weights.bin", Mode: 0o644}, data: randBytes(3, 4<<20)},
	})
	blob := compress(t, "gzip", tarb)
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.CloseWithError(errors.New("test over")) })
	release := make(chan struct{})
	var releaseOnce sync.Once
	releaseAll := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(releaseAll) // lets the feeder finish if the test fails early
	fed := make(chan error, 1)
	go func() {
		half := len(blob) / 2
		if _, err := pw.Write(blob[:half]); err != nil {
			fed <- err
			return
		}
		<-release
		_, err := pw.Write(blob[half:])
		pw.Close()
		fed <- err
	}()
	opens := 0
	open := func(context.Context) (io.ReadCloser, error) { opens++; return pr, nil }
	streams, meta := newMemStreams(), newMemMeta()
	d := Descriptor{Digest: sha(blob), MediaType: mtGzip, DiffID: sha(tarb)}
	l, err := openStream(ctx, d, options{open: open, streams: streams, meta: meta, expansion: defaultExpansion})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })

	e, err := l.Lookup(ctx, "config.json")
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 100)
	n, err := l.ReadAt(ctx, e, p, 0)
	if err != io.EOF || !bytes.Equal(p[:n], early) {
		t.Fatalf("early read: %q, %v", p[:n], err)
	}
	// The second half of the blob has not been handed over yet: the read
	// above was served from a stream that is not complete.
	if st := streams.m[d.Digest]; st.Done() || st.Written() >= int64(len(tarb)) {
		t.Fatalf("stream complete before the blob was: written %d of %d", st.Written(), len(tarb))
	}
	releaseAll()
	if err := <-fed; err != nil {
		t.Fatal(err)
	}
	ents, err := l.ReadDir(ctx, "")
	if err != nil || len(ents) != 2 {
		t.Fatalf("readdir: %d, %v", len(ents), err)
	}
	w, _ := l.Lookup(ctx, "weights.bin")
	if got := readAll(t, ctx, l, w); !bytes.Equal(got, tarb[1536:1536+4<<20]) {
		t.Fatal("weights content differs")
	}

	// A second opener of the same stream only reads; a third after
	// completion with the index in meta streams nothing.
	noOpen := func(context.Context) (io.ReadCloser, error) {
		t.Error("blob opened although the stream exists")
		return nil, errors.New("unexpected")
	}
	for i := range 2 {
		if i == 1 {
			delete(meta.m, tarIndexName(d.DiffID.String())) // index rebuilt from the stream
		}
		l2, err := openStream(ctx, d, options{open: noOpen, streams: streams, meta: meta, expansion: defaultExpansion})
		if err != nil {
			t.Fatal(err)
		}
		e2, err := l2.Lookup(ctx, "weights.bin")
		if err != nil || e2.Ino != w.Ino {
			t.Fatalf("second opener: %+v %v", e2, err)
		}
		if got := readAll(t, ctx, l2, e2); !bytes.Equal(got, tarb[1536:1536+4<<20]) {
			t.Fatal("second opener content differs")
		}
		if _, err := l2.ReadDir(ctx, ""); err != nil {
			t.Fatal(err)
		}
		l2.Close()
	}
	if opens != 1 {
		t.Fatalf("blob opened %d times", opens)
	}
}

func TestStreamFollowerWhileWriting(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	blob := compress(t, "zstd", tarb)
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.CloseWithError(errors.New("test over")) })
	streams := newMemStreams()
	d := Descriptor{Digest: sha(blob), MediaType: mtZstd, DiffID: sha(tarb)}
	writer, err := openStream(ctx, d, options{open: func(context.Context) (io.ReadCloser, error) { return pr, nil }, streams: streams, meta: newMemMeta(), expansion: defaultExpansion})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { writer.Close() })
	follower, err := openStream(ctx, d, options{open: nil, streams: streams, meta: newMemMeta(), expansion: defaultExpansion})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { follower.Close() })
	go func() {
		pw.Write(blob)
		pw.Close()
	}()
	for _, l := range []Layer{follower, writer} {
		a, err := l.ReadDir(ctx, "a")
		if err != nil || len(a) != 3 {
			t.Fatalf("readdir a: %d %v", len(a), err)
		}
	}
	e1, _ := writer.Lookup(ctx, "big.bin")
	e2, _ := follower.Lookup(ctx, "big.bin")
	if !reflect.DeepEqual(e1, e2) {
		t.Fatalf("entries differ: %+v %+v", e1, e2)
	}
}

func TestStreamFailures(t *testing.T) {
	tarb := buildTar(t, richFiles())
	gz := compress(t, "gzip", tarb)
	cases := []struct {
		name   string
		blob   []byte
		diffID []byte
	}{
		{"truncated gzip", gz[:len(gz)/2], tarb},
		{"corrupt gzip", append(append(bytes.Clone(gz[:100]), 0xff, 0xee, 0xdd), gz[103:]...), tarb},
		{"diff id mismatch", compress(t, "gzip", tarb), append(bytes.Clone(tarb), 0)},
		{"truncated tar", compress(t, "gzip", tarb[:len(tarb)-2048]), tarb[:len(tarb)-2048]},
		{"not compressed garbage", []byte("definitely not a tar archive, not even close........"), []byte("x")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := testCtx(t)
			streams := newMemStreams()
			d := Descriptor{Digest: sha(c.blob), MediaType: mtGzip, DiffID: sha(c.diffID)}
			l, err := openStream(ctx, d, options{open: opener(c.blob), streams: streams, meta: newMemMeta(), expansion: defaultExpansion})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			if _, err := l.ReadDir(ctx, ""); err == nil {
				t.Fatal("readdir succeeded")
			}
			if _, err := l.Lookup(ctx, "no/such/file"); err == nil || errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("lookup of a missing name after failure: %v", err)
			}
			// A follower sees the failure too.
			f, err := openStream(ctx, d, options{open: nil, streams: streams, meta: newMemMeta(), expansion: defaultExpansion})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.ReadDir(ctx, ""); err == nil {
				t.Fatal("follower readdir succeeded")
			}
		})
	}
}

func TestStargzChunkVerification(t *testing.T) {
	tarb := buildTar(t, richFiles())
	blob := buildStargz(t, tarb)
	b, err := io.ReadAll(blob)
	if err != nil {
		t.Fatal(err)
	}
	truth, _ := tarTruth(t, tarb)
	for _, healing := range []bool{true, false} {
		ctx := testCtx(t)
		src := &corruptSource{memSource: memSource{b: b}, healing: healing}
		d := Descriptor{Digest: sha(b), MediaType: mtGzip}
		l, err := openStargz(ctx, d, src, nil)
		if err != nil {
			t.Fatal(err)
		}
		e, err := l.Lookup(ctx, "big.bin")
		if err != nil {
			t.Fatal(err)
		}
		chunks := l.(*stargzLayer).idx.chunksOf(e.Ino)
		if len(chunks) < 3 {
			t.Fatalf("big.bin has %d chunks", len(chunks))
		}
		c := chunks[1]
		src.mu.Lock()
		src.badOff, src.badLen = c.Off+(c.End-c.Off)/2, 16
		src.mu.Unlock()
		p := make([]byte, c.Size)
		n, err := l.ReadAt(ctx, e, p, c.FileOff)
		if healing {
			if err != nil || !bytes.Equal(p[:n], truth["big.bin"].data[c.FileOff:c.FileOff+c.Size]) || src.invalidations != 1 {
				t.Fatalf("healing: n=%d err=%v invalidations=%d", n, err, src.invalidations)
			}
			continue
		}
		if !errors.Is(err, ErrVerify) || n != 0 {
			t.Fatalf("corrupt chunk: n=%d err=%v", n, err)
		}
		if src.invalidations != 1 {
			t.Fatalf("invalidations: %d", src.invalidations)
		}
		// The chunk before is still fine.
		if n, err := l.ReadAt(ctx, e, p[:10], 0); n != 10 || err != nil {
			t.Fatalf("good chunk: %d %v", n, err)
		}
	}

	// A TOC that does not match the annotation is refused.
	ctx := testCtx(t)
	d := Descriptor{Digest: sha(b), MediaType: mtGzip, Annotations: map[string]string{estargz.TOCJSONDigestAnnotation: sha([]byte("other")).String()}}
	if _, err := openStargz(ctx, d, &memSource{b: b}, nil); !errors.Is(err, ErrVerify) {
		t.Fatalf("TOC digest mismatch: %v", err)
	}
}

func TestStargzReopenFromMeta(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	blob := buildStargz(t, tarb)
	b, _ := io.ReadAll(blob)
	meta := newMemMeta()
	d := Descriptor{Digest: sha(b), MediaType: mtGzip}
	if _, err := openStargz(ctx, d, &memSource{b: b}, meta); err != nil {
		t.Fatal(err)
	}
	src := &memSource{b: b}
	l, err := openStargz(ctx, d, src, meta)
	if err != nil {
		t.Fatal(err)
	}
	if src.reads.Load() != 0 {
		t.Fatalf("reopen read the TOC again")
	}
	e, err := l.Lookup(ctx, "big.bin")
	if err != nil {
		t.Fatal(err)
	}
	truth, _ := tarTruth(t, tarb)
	if !bytes.Equal(readAll(t, ctx, l, e), truth["big.bin"].data) {
		t.Fatal("content differs after reopen")
	}
}

// Small files sharing one compressed stream (estargz's minimum chunk
// size) are read at their inner offsets.
func TestStargzSharedStreams(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	blob := buildStargz(t, tarb, estargz.WithMinChunkSize(1<<10))
	b, _ := io.ReadAll(blob)
	l, err := openStargz(ctx, Descriptor{Digest: sha(b), Size: int64(len(b))}, &memSource{b: b}, nil)
	if err != nil {
		t.Fatal(err)
	}
	truth, _ := tarTruth(t, tarb)
	inner := 0
	for name, w := range truth {
		e, err := l.Lookup(ctx, name)
		if err != nil || e.Type != TypeReg || e.Size == 0 {
			continue
		}
		for _, c := range l.(*stargzLayer).idx.chunksOf(e.Ino) {
			if c.InnerOff > 0 {
				inner++
			}
		}
		if !bytes.Equal(readAll(t, ctx, l, e), w.data) {
			t.Errorf("%q differs", name)
		}
	}
	if inner == 0 {
		t.Fatal("no file shares a compressed stream; the test does not test it")
	}
}

func TestOpenRejectsUnknownBlobs(t *testing.T) {
	ctx := testCtx(t)
	b := bytes.Repeat([]byte("not a layer "), 100)
	_, err := Open(ctx, Descriptor{Digest: sha(b), MediaType: mtGeneric}, &memSource{b: b}, WithStreams(opener(b), newMemStreams()))
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Open: %v", err)
	}
	tarb := buildTar(t, richFiles()[:3])
	if _, err := Open(ctx, Descriptor{Digest: sha(tarb), Size: 5, MediaType: mtTar}, &memSource{b: tarb}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("size mismatch: %v", err)
	}
}
