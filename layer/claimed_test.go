package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/weightsnap/weightsnap/tarheaders"
)

// annotate returns the tar header annotation of the tar tarb.
func annotate(t testing.TB, tarb []byte) string {
	t.Helper()
	rec := tarheaders.NewRecorder()
	rec.Write(tarb)
	regions, err := rec.Finish()
	if err != nil {
		t.Fatal(err)
	}
	s, err := tarheaders.Encode(regions)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func claimedDesc(tarb []byte, ann string) Descriptor {
	return Descriptor{Digest: sha(tarb), Size: int64(len(tarb)), MediaType: mtTar,
		Annotations: map[string]string{tarheaders.Annotation: ann}}
}

// gatedSource is a memSource whose reads wait until open is closed, and
// that logs the offset of every read.
type gatedSource struct {
	memSource
	open chan struct{}
	mu   sync.Mutex
	log  []int64
}

func newGatedSource(b []byte) *gatedSource {
	return &gatedSource{memSource: memSource{b: b}, open: make(chan struct{})}
}

func (s *gatedSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.mu.Lock()
	s.log = append(s.log, off)
	s.mu.Unlock()
	select {
	case <-s.open:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return s.memSource.ReadAt(ctx, p, off)
}

func (s *gatedSource) offsets() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.log)
}

// tree lists every entry of l with what a mount shows of it, and the
// blob range of each regular file.
func tree(t *testing.T, ctx context.Context, op *Opened) string {
	t.Helper()
	var b strings.Builder
	var walk func(dir string)
	walk = func(dir string) {
		ents, err := op.ReadDir(ctx, dir)
		if err != nil {
			t.Fatalf("readdir %q: %v", dir, err)
		}
		for _, e := range ents {
			r, _ := op.Ranges.DataRange(e)
			fmt.Fprintf(&b, "%+v %v\n", *e, r)
			if e.Type == TypeDir {
				walk(e.Name)
			}
		}
	}
	walk("")
	return b.String()
}

// Open reads nothing of the blob when the annotation holds the headers,
// and builds the index the walk of the blob builds; file content waits
// for the claim to be confirmed, which reads the annotated regions only.
func TestClaimedIndexReadsNothing(t *testing.T) {
	ctx := testCtx(t)
	for name, tarb := range map[string][]byte{"rich": buildTar(t, richFiles()), "big": func() []byte { b, _ := bigTar(t); return b }()} {
		t.Run(name, func(t *testing.T) {
			ann := annotate(t, tarb)
			walked, err := Open(ctx, claimedDesc(tarb, ""), &memSource{b: tarb})
			if err != nil {
				t.Fatal(err)
			}
			defer walked.Close()

			src := newGatedSource(tarb)
			op, err := Open(ctx, claimedDesc(tarb, ann), src, WithTarHeaders())
			if err != nil {
				t.Fatal(err)
			}
			defer op.Close()
			if op.Confirm == nil {
				t.Fatal("the annotation was not used")
			}
			if got, want := tree(t, ctx, op), tree(t, ctx, walked); got != want {
				t.Fatalf("claimed tree\n%s\nwalked tree\n%s", got, want)
			}
			if n := src.bytesRead.Load(); n != 0 {
				t.Fatalf("Open and the listing read %d bytes of the blob", n)
			}

			// A read of content waits for the confirmation, which is held
			// at the gate; it reads only when every region has been read.
			files := op.Ranges.Files()
			last := files[len(files)-1]
			e, err := op.Lookup(ctx, last.Name)
			if err != nil {
				t.Fatal(err)
			}
			got := make(chan []byte)
			go func() { got <- readAll(t, ctx, op, e) }()
			close(src.open)
			<-op.Confirm.Done()
			if err := op.Confirm.Err(); err != nil {
				t.Fatalf("an honest annotation was not confirmed: %v", err)
			}
			if b := <-got; !bytes.Equal(b, tarb[last.Off:last.Off+last.Len]) {
				t.Fatal("content read differs from the blob")
			}
			// The confirmation reads its regions a few at once, in any
			// order, and all of them before the content.
			regions, _ := tarheaders.Parse(ann, int64(len(tarb)))
			offs := src.offsets()
			if len(offs) < len(regions) || !slices.Equal(slices.Sorted(slices.Values(offs[:len(regions)])), offsetsOf(regions)) {
				t.Fatalf("reads at %v; the confirmation reads %v first", offs, offsetsOf(regions))
			}
			for _, off := range offs[len(regions):] {
				if off < last.Off || off >= last.Off+last.Len {
					t.Fatalf("read at %d, outside the file read", off)
				}
			}
		})
	}
}

func offsetsOf(regions []tarheaders.Region) []int64 {
	var offs []int64
	for _, r := range regions {
		offs = append(offs, r.Off)
	}
	return offs
}

// Without WithTarHeaders (no chunk table checks the Source) the
// annotation is not used.
func TestClaimedIndexNeedsOption(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	src := &memSource{b: tarb}
	op, err := Open(ctx, claimedDesc(tarb, annotate(t, tarb)), src)
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if op.Confirm != nil || src.reads.Load() == 0 {
		t.Fatalf("annotation used without WithTarHeaders (Confirm %v, %d reads)", op.Confirm, src.reads.Load())
	}
}

// swapped returns the annotation of a tar like tarb's but with the first
// two files' names swapped: the same lengths, so the same regions, but
// each name claims the other's bytes.
func swappedTars(t *testing.T) (real, lie []byte) {
	a := bytes.Repeat([]byte("A"), 1000)
	b := bytes.Repeat([]byte("B"), 1000)
	real = buildTar(t, []tarFile{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "x", Mode: 0o644}, data: a},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "y", Mode: 0o644}, data: b},
	})
	lie = buildTar(t, []tarFile{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "y", Mode: 0o644}, data: a},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "x", Mode: 0o644}, data: b},
	})
	return real, lie
}

// An annotation the blob contradicts is served as names (the manifest
// says so), but no byte of content: every read fails, and is never the
// bytes the lie points at.
func TestClaimedIndexLieFails(t *testing.T) {
	ctx := testCtx(t)
	real, lie := swappedTars(t)
	ann := annotate(t, lie)
	meta := newMemMeta()
	src := &memSource{b: real}
	op, err := Open(ctx, claimedDesc(real, ann), src, WithTarHeaders(), WithMeta(meta), WithVerifiedSource())
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if op.Confirm == nil {
		t.Fatal("the annotation was not used")
	}
	e, err := op.Lookup(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 10)
	n, err := op.ReadAt(ctx, e, p, 0)
	if !errors.Is(err, ErrVerify) || n != 0 {
		t.Fatalf("read of a file the annotation lies about: %d bytes %q, %v; want ErrVerify", n, p[:n], err)
	}
	if op.Files != nil {
		t.Fatal("a memSource gave Files")
	}
	if err := op.Confirm.Err(); !errors.Is(err, ErrVerify) {
		t.Fatalf("Confirm.Err() = %v, want ErrVerify", err)
	}
	if len(meta.m) != 0 {
		t.Fatal("the index of a lie was kept")
	}
}

// A confirmed index of a verified Source is kept and reused, as a walked
// one is.
func TestClaimedIndexSavedOnceConfirmed(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	d := claimedDesc(tarb, annotate(t, tarb))
	meta := newMemMeta()
	op, err := Open(ctx, d, &memSource{b: tarb}, WithTarHeaders(), WithMeta(meta), WithVerifiedSource())
	if err != nil {
		t.Fatal(err)
	}
	op.Confirm.Start()
	<-op.Confirm.Done()
	want := tree(t, ctx, op)
	op.Close()

	src := &memSource{b: tarb}
	op2, err := Open(ctx, d, src, WithTarHeaders(), WithMeta(meta), WithVerifiedSource())
	if err != nil {
		t.Fatal(err)
	}
	defer op2.Close()
	if op2.Confirm != nil || src.reads.Load() != 0 {
		t.Fatalf("reopen did not use the kept index (Confirm %v, %d reads)", op2.Confirm, src.reads.Load())
	}
	if got := tree(t, ctx, op2); got != want {
		t.Fatal("the kept index differs")
	}

	// Not kept when the Source is not verified.
	meta2 := newMemMeta()
	op3, err := Open(ctx, d, &memSource{b: tarb}, WithTarHeaders(), WithMeta(meta2))
	if err != nil {
		t.Fatal(err)
	}
	op3.Confirm.Start()
	<-op3.Confirm.Done()
	op3.Close()
	if len(meta2.m) != 0 {
		t.Fatal("an index kept for an unverified Source")
	}
}

// flakySource fails its first failures reads.
type flakySource struct {
	memSource
	mu       sync.Mutex
	failures int
}

func (s *flakySource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.mu.Lock()
	fail := s.failures > 0
	s.failures--
	s.mu.Unlock()
	if fail {
		return 0, errors.New("registry unreachable")
	}
	return s.memSource.ReadAt(ctx, p, off)
}

// A blob that cannot be read yet leaves the claim unconfirmed, not
// failed: it is tried again.
func TestClaimedIndexRetriesReadErrors(t *testing.T) {
	old := confirmRetryMin
	confirmRetryMin = 0
	t.Cleanup(func() { confirmRetryMin = old })
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	src := &flakySource{memSource: memSource{b: tarb}, failures: 3}
	op, err := Open(ctx, claimedDesc(tarb, annotate(t, tarb)), src, WithTarHeaders())
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	op.Confirm.Start()
	<-op.Confirm.Done()
	if err := op.Confirm.Err(); err != nil {
		t.Fatalf("not confirmed after read errors: %v", err)
	}
	e, err := op.Lookup(ctx, "a/file.txt")
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, ctx, op, e); string(got) != "hello world\n" {
		t.Fatalf("read %q", got)
	}
}

// The claim is checked only once something needs it: names and
// attributes are served from it meanwhile, and a layer closed before
// settles without a byte of its blob read.
func TestClaimedConfirmationStartsWhenNeeded(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	src := &memSource{b: tarb}
	op, err := Open(ctx, claimedDesc(tarb, annotate(t, tarb)), src, WithTarHeaders())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := op.Lookup(ctx, "a/file.txt"); err != nil {
		t.Fatal(err)
	}
	if _, err := op.ReadDir(ctx, ""); err != nil {
		t.Fatal(err)
	}
	op.Close()
	<-op.Confirm.Done()
	if err := op.Confirm.Err(); err == nil || errors.Is(err, ErrVerify) {
		t.Fatalf("Confirm.Err() of a layer closed before its check = %v, want closed", err)
	}
	if n := src.reads.Load(); n != 0 {
		t.Fatalf("%d reads of the blob, though nothing needed the confirmation", n)
	}
}

// Close ends a confirmation in flight: reads then fail, and it is not a
// mismatch.
func TestClaimedIndexClose(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	src := newGatedSource(tarb) // never opened
	op, err := Open(ctx, claimedDesc(tarb, annotate(t, tarb)), src, WithTarHeaders())
	if err != nil {
		t.Fatal(err)
	}
	op.Confirm.Start()
	op.Close()
	<-op.Confirm.Done()
	if err := op.Confirm.Err(); err == nil || errors.Is(err, ErrVerify) {
		t.Fatalf("Confirm.Err() after Close = %v", err)
	}
}

// A hostile or useless annotation falls back to the walk of the blob,
// which gives the true index; nothing panics.
func TestClaimedIndexHostileFallsBack(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	good := annotate(t, tarb)
	regions, err := tarheaders.Parse(good, int64(len(tarb)))
	if err != nil {
		t.Fatal(err)
	}
	enc := func(rs []tarheaders.Region) string {
		s, err := tarheaders.Encode(rs)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// A corrupt header in the claim: not a tar the walk accepts.
	corrupt := slices.Clone(regions)
	corrupt[0].Data = bytes.Clone(corrupt[0].Data)
	corrupt[0].Data[148] ^= 1 // its checksum
	cases := map[string]string{
		"not base64":       "%%%",
		"not gzip":         "aGVsbG8=",
		"overlapping":      enc([]tarheaders.Region{{Off: 0, Data: make([]byte, 512)}, {Off: 100, Data: make([]byte, 512)}}),
		"past the end":     enc([]tarheaders.Region{{Off: int64(len(tarb)), Data: make([]byte, 512)}}),
		"a region missing": enc(slices.Delete(slices.Clone(regions), 1, 2)),
		"the end missing":  enc(regions[:len(regions)-1]),
		"no regions":       enc(nil),
		"corrupt header":   enc(corrupt),
	}
	walked, err := Open(ctx, claimedDesc(tarb, ""), &memSource{b: tarb})
	if err != nil {
		t.Fatal(err)
	}
	defer walked.Close()
	want := tree(t, ctx, walked)
	for name, ann := range cases {
		t.Run(name, func(t *testing.T) {
			src := &memSource{b: tarb}
			op, err := Open(ctx, claimedDesc(tarb, ann), src, WithTarHeaders())
			if err != nil {
				t.Fatal(err)
			}
			defer op.Close()
			if op.Confirm != nil {
				t.Fatal("a useless annotation was used")
			}
			if src.reads.Load() == 0 {
				t.Fatal("the blob was not walked")
			}
			if got := tree(t, ctx, op); got != want {
				t.Fatal("the walk gave another tree")
			}
		})
	}
}

// A claim of an empty tar is a tar the walk accepts: it is used, and the
// blob contradicts it.
func TestClaimedEmptyTarContradicted(t *testing.T) {
	ctx := testCtx(t)
	tarb := buildTar(t, richFiles())
	s, err := tarheaders.Encode([]tarheaders.Region{{Off: 0, Data: make([]byte, 1024)}})
	if err != nil {
		t.Fatal(err)
	}
	op, err := Open(ctx, claimedDesc(tarb, s), &memSource{b: tarb}, WithTarHeaders())
	if err != nil {
		t.Fatal(err)
	}
	defer op.Close()
	if op.Confirm == nil {
		t.Fatal("the claim of an empty tar was not used")
	}
	op.Confirm.Start()
	<-op.Confirm.Done()
	if err := op.Confirm.Err(); !errors.Is(err, ErrVerify) {
		t.Fatalf("Confirm.Err() = %v, want ErrVerify", err)
	}
}
