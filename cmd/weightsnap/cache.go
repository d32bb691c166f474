package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"

	digest "github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/bytesize"
)

// defaultCacheDir is the node cache of weightsnapd with its default root,
// and weightsnap mount's default.
const defaultCacheDir = "/var/lib/weightsnap/cache"

// runCache runs `weightsnap cache [flags] list|usage|prune|verify [DIGEST...]`.
// list and usage only read the directory, so they work while weightsnapd
// runs; prune and verify open the store, which takes its lock, so they
// refuse to run while another process has the cache open.
func runCache(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("cache", flag.ContinueOnError)
	dir := fl.String("cache-dir", defaultCacheDir, "node cache directory")
	maxBytes := fl.String("max-bytes", "0", "usage: the cache's bound (weightsnapd's [cache] max_bytes, which is not read); 0 = none given")
	all := fl.Bool("all", false, "prune: remove all cached data, also what image records name")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() == 0 {
		return errors.New("want list, usage, prune or verify")
	}
	sub := fl.Arg(0)
	if err := fl.Parse(fl.Args()[1:]); err != nil { // flags may follow the subcommand too
		return err
	}
	operands := fl.Args()
	if sub != "verify" && len(operands) > 0 {
		return fmt.Errorf("%s takes no arguments, got %q", sub, operands)
	}
	switch sub {
	case "list":
		return cacheList(os.Stdout, *dir)
	case "usage":
		bound, err := bytesize.Parse(*maxBytes)
		if err != nil {
			return fmt.Errorf("--max-bytes: %w", err)
		}
		return cacheUsage(os.Stdout, *dir, bound)
	case "prune":
		return cachePrune(os.Stdout, *dir, *all)
	case "verify":
		return cacheVerify(ctx, os.Stdout, *dir, operands)
	}
	return fmt.Errorf("unknown cache command %q: want list, usage, prune or verify", sub)
}

// images is what the image records in the cache's meta say: which image
// manifests name each layer digest.
type images map[digest.Digest][]digest.Digest

// readImages reads the image records the lazy layer manager keeps in the
// cache's meta (lazy/records.go: "image/<alg>-<hex>.json", the layers of
// one manifest).
func readImages(dir string) (images, error) {
	recs, err := cache.ReadMeta(dir, "image/")
	if err != nil {
		return nil, err
	}
	refs := make(images)
	for name, b := range recs {
		alg, hex, ok := strings.Cut(strings.TrimSuffix(strings.TrimPrefix(name, "image/"), ".json"), "-")
		manifest := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
		var rec struct {
			Layers []struct {
				Digest digest.Digest `json:"digest"`
			} `json:"layers"`
		}
		if !ok || manifest.Validate() != nil || json.Unmarshal(b, &rec) != nil {
			fmt.Fprintf(os.Stderr, "weightsnap cache: skipping unreadable image record %s\n", name)
			continue
		}
		for _, l := range rec.Layers {
			if !slices.Contains(refs[l.Digest], manifest) {
				refs[l.Digest] = append(refs[l.Digest], manifest)
			}
		}
	}
	for _, m := range refs {
		slices.Sort(m)
	}
	return refs, nil
}

// layerOf returns the layer digest whose content e holds and the manifests
// that name it: e's key, or for a blob kept under a key of its own (bytes
// of a layer served before it verified, keyed by their repository), the
// layer digest its complete record says it verified against. ok is false
// when no image record names it.
func (refs images) layerOf(e cache.EntryInfo) (layer digest.Digest, manifests []digest.Digest, ok bool) {
	if m, ok := refs[e.Key]; ok {
		return e.Key, m, true
	}
	if e.Kind == cache.KindBlob && e.Complete {
		for d, m := range refs {
			if e.VerifiedAgainst(d) {
				return d, m, true
			}
		}
	}
	return "", nil, false
}

func cacheList(w io.Writer, dir string) error {
	entries, err := cache.Inspect(dir)
	if err != nil {
		return err
	}
	refs, err := readImages(dir)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tKEY\tSIZE\tPRESENT\tVERIFIED\tON DISK\tIMAGES")
	for _, e := range entries {
		verified := "no"
		if e.Complete {
			verified = "yes"
		}
		imgs := "-"
		if layer, m, ok := refs.layerOf(e); ok {
			imgs = joinDigests(m)
			if layer != e.Key {
				imgs += " (layer " + layer.String() + ")"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Kind, e.Key, formatBytes(e.Size),
			percent(e.Present, e.Size), verified, formatBytes(e.DiskBytes), imgs)
	}
	return tw.Flush()
}

func cacheUsage(w io.Writer, dir string, bound int64) error {
	entries, err := cache.Inspect(dir)
	if err != nil {
		return err
	}
	var present, disk int64
	var blobs, streams int
	for _, e := range entries {
		present += e.Present
		disk += e.DiskBytes
		if e.Kind == cache.KindBlob {
			blobs++
		} else {
			streams++
		}
	}
	fmt.Fprintf(w, "data     %s (%d bytes) in %d blobs and %d streams\n", formatBytes(present), present, blobs, streams)
	fmt.Fprintf(w, "on disk  %s (%d bytes, records included)\n", formatBytes(disk), disk)
	if bound > 0 {
		fmt.Fprintf(w, "bound    %s (%d bytes, --max-bytes): %s used\n", formatBytes(bound), bound, percent(present, bound))
	} else {
		fmt.Fprintln(w, "bound    not given: pass weightsnapd's [cache] max_bytes as --max-bytes (its config is not read)")
	}
	return nil
}

// openExclusive opens the store for a command that changes it, which must
// not run while weightsnapd's FUSE manager or weightsnap mount has it open.
func openExclusive(dir string) (*cache.Store, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, err
	}
	// No bound: opening with one would evict.
	s, err := cache.Open(dir)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, fmt.Errorf("cache %s is in use by another process (weightsnapd's FUSE manager or weightsnap mount): stop it first", dir)
	}
	return s, err
}

// openWithEntries opens the cache in dir for a change (see
// openExclusive) with what it holds and the images that name it.
func openWithEntries(dir string) (*cache.Store, images, []cache.EntryInfo, error) {
	s, err := openExclusive(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	refs, err := readImages(dir)
	if err == nil {
		var entries []cache.EntryInfo
		if entries, err = s.Entries(); err == nil {
			return s, refs, entries, nil
		}
	}
	s.Close()
	return nil, nil, nil, err
}

func cachePrune(w io.Writer, dir string, all bool) error {
	s, refs, entries, err := openWithEntries(dir)
	if err != nil {
		return err
	}
	defer s.Close()
	var freed int64
	var removed, kept int
	for _, e := range entries {
		if _, _, named := refs.layerOf(e); named && !all {
			kept++
			continue
		}
		n, err := s.Remove(e.Kind, e.Key)
		if err != nil {
			return err
		}
		freed += e.DiskBytes
		removed++
		fmt.Fprintf(w, "removed %s %s (%s of data)\n", e.Kind, e.Key, formatBytes(n))
	}
	what := "what no image record names"
	if all {
		what = "everything"
	}
	fmt.Fprintf(w, "pruned %s: %d removed, %s freed on disk; %d kept\n", what, removed, formatBytes(freed), kept)
	return nil
}

// errNotOnDisk is what the fetch of verify answers: it checks only what is
// on disk.
var errNotOnDisk = errors.New("not on disk (verify fetches nothing)")

func cacheVerify(ctx context.Context, w io.Writer, dir string, keys []string) error {
	var want []digest.Digest
	for _, k := range keys {
		d, err := digest.Parse(k)
		if err != nil {
			return fmt.Errorf("%q: %w", k, err)
		}
		want = append(want, d)
	}
	s, refs, entries, err := openWithEntries(dir)
	if err != nil {
		return err
	}
	defer s.Close()
	var ok, bad, skipped int
	for _, d := range want {
		if !slices.ContainsFunc(entries, func(e cache.EntryInfo) bool { return e.Kind == cache.KindBlob && e.Key == d }) {
			fmt.Fprintf(w, "missing   %s: no such blob in the cache\n", d)
			bad++
		}
	}
	for _, e := range entries {
		if e.Kind != cache.KindBlob || len(want) > 0 && !slices.Contains(want, e.Key) {
			continue
		}
		if e.Present != e.Size {
			fmt.Fprintf(w, "skipped   %s: %s present, not whole\n", e.Key, percent(e.Present, e.Size))
			skipped++
			continue
		}
		// A key is not always the digest of its content (cache.WithContentDigest):
		// what the content must hash to is then the layer an image record
		// names, or nothing this command can know.
		content := e.Key
		if !e.VerifiedAgainst(e.Key) {
			layer, _, named := refs.layerOf(e)
			if !named {
				fmt.Fprintf(w, "skipped   %s: no image record names it, so its content digest is unknown\n", e.Key)
				skipped++
				continue
			}
			content = layer
		}
		if err := verifyBlob(ctx, s, e, content); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			bad++
			if _, rerr := s.Remove(cache.KindBlob, e.Key); rerr != nil {
				fmt.Fprintf(w, "mismatch  %s: %v; not removed: %v\n", e.Key, err, rerr)
				continue
			}
			fmt.Fprintf(w, "mismatch  %s: %v; removed\n", e.Key, err)
			continue
		}
		ok++
		fmt.Fprintf(w, "ok        %s (%s)\n", e.Key, formatBytes(e.Size))
	}
	fmt.Fprintf(w, "verified %d ok, %d failed, %d skipped\n", ok, bad, skipped)
	if bad > 0 {
		return fmt.Errorf("%d blob(s) failed verification", bad)
	}
	return nil
}

// verifyBlob checks the whole blob e, which must hash to content, from
// disk. The cache's Verify hashes a blob whose records do not say it
// verified yet; one they say verified it trusts, so its content is then
// read back whole, each chunk checked against the checksum stored with it
// (a corrupt chunk is dropped and, since nothing is fetched, fails the
// read), and hashed here.
func verifyBlob(ctx context.Context, s *cache.Store, e cache.EntryInfo, content digest.Digest) error {
	var opts []cache.BlobOption
	if content != e.Key {
		opts = append(opts, cache.WithContentDigest(content))
	}
	h, err := s.Blob(e.Key, e.Size, func(context.Context, []byte, int64) error { return errNotOnDisk }, opts...)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := h.Verify(ctx); err != nil {
		return err
	}
	hash := content.Algorithm().Hash()
	buf := make([]byte, 8<<20)
	for off := int64(0); off < e.Size; {
		n, err := h.ReadAt(ctx, buf, off)
		hash.Write(buf[:n])
		off += int64(n)
		if errors.Is(err, errNotOnDisk) {
			// The blob was whole: the chunk was dropped.
			return fmt.Errorf("a chunk at or after offset %d does not match the checksum stored with it", off)
		}
		if err != nil && !(errors.Is(err, io.EOF) && off == e.Size) {
			return err
		}
	}
	if got := digest.NewDigest(content.Algorithm(), hash); got != content {
		return fmt.Errorf("content hashes to %s, want %s", got, content)
	}
	return nil
}

func percent(n, of int64) string {
	if of == 0 {
		return "100%"
	}
	p := float64(n) * 100 / float64(of)
	if p > 99.9 && n < of {
		p = 99.9 // never round a partial blob up to 100%
	}
	return fmt.Sprintf("%.1f%%", p)
}

func joinDigests(ds []digest.Digest) string {
	s := make([]string, len(ds))
	for i, d := range ds {
		s[i] = d.String()
	}
	return strings.Join(s, ",")
}
