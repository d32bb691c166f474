// Package pack turns a model directory into an OCI image made for lazy
// loading, without a container engine.
//
// The image has uncompressed tar layers (application/vnd.oci.image.layer.v1.tar),
// so every file's bytes are one contiguous range of its layer blob and can be
// fetched with HTTP Range requests. The first layer holds every directory
// and every small file and symlink; each large file (≥
// Options.LargeFileThreshold) then gets a layer of its own, in path order, so
// a node can fetch, cache and share each weight file independently.
//
// Builds are deterministic: the same directory contents (names, bytes,
// executable bits, symlink targets) give the same manifest digest, wherever
// the directory lives and whatever its owners and times.
package pack

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// DefaultLargeFileThreshold is the file size from which a file gets its own
// layer when Options.LargeFileThreshold is zero.
const DefaultLargeFileThreshold int64 = 64 << 20

// AnnotationTitle is the manifest layer annotation naming, for a layer that
// holds one large file, that file's path inside the image (no leading "/").
const AnnotationTitle = "org.opencontainers.image.title"

// Options controls how Build lays out the image. The zero value is valid.
type Options struct {
	// LargeFileThreshold is the size from which a regular file gets a layer
	// of its own. Zero means DefaultLargeFileThreshold.
	LargeFileThreshold int64

	// Prefix is the directory inside the image that receives the contents
	// of the model directory. Empty means "models/<base name of dir>"; "/"
	// puts the contents at the image root. Leading and trailing slashes are
	// ignored, and ".." cannot climb above the image root.
	Prefix string

	// Platform is written to the image config. A zero OS means "linux" and
	// a zero Architecture the one this binary runs on: containerd on the
	// node refuses a single-platform image whose config names another.
	Platform v1.Platform

	// KeepMtime keeps the files' modification times (whole seconds). By
	// default every entry has mtime 0 (1970-01-01), which is what makes a
	// copy of a directory build to the same digests.
	KeepMtime bool
}

// epoch is the time written for every entry and the image creation date,
// so that builds do not depend on when or where they ran.
var epoch = time.Unix(0, 0).UTC()

// entry is one tar entry of a layer. Regular files are read from src when
// the layer is streamed; their size is fixed when the directory is walked.
type entry struct {
	name  string // path in the tar; directories end in "/"
	typ   byte   // tar.TypeDir, tar.TypeReg or tar.TypeSymlink
	mode  int64
	size  int64
	link  string // symlink target
	src   string // file on disk, for regular files
	mtime time.Time
}

// Build walks dir and returns the image described in the package comment.
// Every layer is read once here to compute its digest; the returned image
// reads the files again, as a stream, only when a layer's contents are
// asked for (by Push, say), and fails if a file changed in between.
// Regular files, directories and symlinks are supported; symlinks are
// stored, not followed (dir itself may be a symlink); other file types are
// an error.
func Build(ctx context.Context, dir string, opt Options) (v1.Image, error) {
	threshold := opt.LargeFileThreshold
	if threshold <= 0 {
		threshold = DefaultLargeFileThreshold
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	}
	root, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	}
	if fi, err := os.Stat(root); err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("pack %s: not a directory", dir)
	}
	prefix := imagePrefix(opt.Prefix, abs)

	small, large, err := walk(ctx, root, prefix, threshold, opt.KeepMtime)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	}

	layers := make([]*layer, 0, 1+len(large))
	layers = append(layers, &layer{entries: small})
	for _, e := range large {
		layers = append(layers, &layer{
			entries:     []entry{e},
			annotations: map[string]string{AnnotationTitle: e.name},
		})
	}
	if err := hashLayers(ctx, layers); err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	}

	plat := opt.Platform
	if plat.OS == "" {
		plat.OS = "linux"
	}
	if plat.Architecture == "" {
		plat.Architecture = runtime.GOARCH
	}
	img, err := newImage(layers, plat)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	}
	return img, nil
}

// imagePrefix returns the cleaned in-image directory for Options.Prefix,
// "" meaning the image root.
func imagePrefix(opt, absDir string) string {
	if opt == "" {
		base := filepath.Base(absDir)
		if base == "/" || base == "." {
			base = "model"
		}
		opt = "models/" + base
	}
	// Cleaning a rooted path drops every "..", so nothing escapes the root.
	return strings.TrimPrefix(path.Clean("/"+filepath.ToSlash(opt)), "/")
}

// walk lists the entries of root: small holds the directories (including
// the parents of prefix), small files and symlinks, large the regular files
// of at least threshold bytes. Both are sorted by name, which puts every
// directory before what it contains.
func walk(ctx context.Context, root, prefix string, threshold int64, keepMtime bool) (small, large []entry, err error) {
	// Parents of the prefix; the prefix itself is the walk's root entry.
	if prefix != "" {
		parts := strings.Split(prefix, "/")
		for i := 1; i < len(parts); i++ {
			small = append(small, entry{
				name: strings.Join(parts[:i], "/") + "/", typ: tar.TypeDir, mode: 0o755, mtime: epoch,
			})
		}
	}

	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		name := path.Join(prefix, filepath.ToSlash(rel))
		if rel == "." && prefix == "" {
			return nil // the image root needs no entry
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e := entry{name: name, mtime: epoch}
		if keepMtime {
			e.mtime = fi.ModTime().Truncate(time.Second).UTC()
		}
		switch {
		case fi.IsDir():
			e.name += "/"
			e.typ, e.mode = tar.TypeDir, 0o755
			small = append(small, e)
		case fi.Mode().IsRegular():
			e.typ, e.size, e.src = tar.TypeReg, fi.Size(), p
			// Only the executable bit survives; owners and umasks differ
			// between copies of the same model.
			e.mode = 0o644
			if fi.Mode().Perm()&0o111 != 0 {
				e.mode = 0o755
			}
			if e.size >= threshold {
				large = append(large, e)
			} else {
				small = append(small, e)
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			e.typ, e.mode, e.link = tar.TypeSymlink, 0o777, link
			small = append(small, e)
		default:
			return fmt.Errorf("%s: unsupported file type %s", p, fi.Mode().Type())
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	sortEntries(small)
	sortEntries(large)
	if err := checkDuplicates(small, large); err != nil {
		return nil, nil, err
	}
	return small, large, nil
}

func sortEntries(es []entry) {
	sort.Slice(es, func(i, j int) bool { return es[i].name < es[j].name })
}

// checkDuplicates guards against two entries for one path, which a name
// mapping bug would otherwise turn into a silently shadowed file.
func checkDuplicates(lists ...[]entry) error {
	seen := map[string]bool{}
	for _, es := range lists {
		for _, e := range es {
			n := strings.TrimSuffix(e.name, "/")
			if seen[n] {
				return errors.New("duplicate path in image: " + n)
			}
			seen[n] = true
		}
	}
	return nil
}
