package testutil

// CompareTrees: the one comparison of a lazy tree with its oracle.

import (
	"archive/tar"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// CompareOption relaxes CompareTrees.
type CompareOption func(*compareConfig)

type compareConfig struct {
	secondMtimes bool
}

// WithSecondModTimes accepts a modification time equal to the expected one
// truncated or rounded to the second. Use it for file systems built from an
// index that stores only seconds: eStargz's TOC keeps RFC 3339 times rounded
// to the second.
func WithSecondModTimes() CompareOption {
	return func(c *compareConfig) { c.secondMtimes = true }
}

// CompareTrees reports, as one test error, every difference between want
// (usually from ExtractTree) and got (usually from ScanTree): missing and
// extra paths, each differing attribute, and hard-link groups that are not
// the same sets of names.
//
// Attributes compared are type, mode, owner, modification time to the
// nanosecond, user.* xattrs, and per type the size and SHA-256 of regular
// files, the target of symlinks and the numbers of devices. Relaxations, each
// because the attribute is not the image's to decide:
//   - symlink modes are not compared: Linux always reports 0777;
//   - xattrs outside user.* are ignored: trusted.* and security.* are not
//     readable or settable in every mount, and overlays add their own;
//   - an Implied directory's mode, owner, mtime and xattrs are not compared:
//     extractors invent the attributes of parents a layer lacks;
//   - sizes of non-regular files, link counts, inode numbers, atime and
//     ctime are not compared;
//   - with WithSecondModTimes, mtimes match to the second.
func CompareTrees(t testing.TB, want, got Tree, opts ...CompareOption) {
	t.Helper()
	var cfg compareConfig
	for _, o := range opts {
		o(&cfg)
	}
	var diffs []string
	report := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }

	paths := make([]string, 0, len(want)+len(got))
	for p := range want {
		paths = append(paths, p)
	}
	for p := range got {
		if want[p] == nil {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	wantGroups, gotGroups := linkGroups(want), linkGroups(got)

	for _, p := range paths {
		w, g := want[p], got[p]
		switch {
		case g == nil:
			report("missing %s (%s)", p, typeName(w.Type))
			continue
		case w == nil:
			report("extra %s (%s)", p, typeName(g.Type))
			continue
		case w.Type != g.Type:
			report("%s: type: want %s, got %s", p, typeName(w.Type), typeName(g.Type))
			continue
		}
		if !(w.Type == tar.TypeDir && w.Implied) {
			if w.Type != tar.TypeSymlink && w.Mode != g.Mode {
				report("%s: mode: want %#o, got %#o", p, w.Mode, g.Mode)
			}
			if w.UID != g.UID || w.GID != g.GID {
				report("%s: owner: want %d:%d, got %d:%d", p, w.UID, w.GID, g.UID, g.GID)
			}
			if !mtimeMatches(w.ModTime, g.ModTime, cfg.secondMtimes) {
				report("%s: mtime: want %s, got %s", p, w.ModTime.UTC().Format(time.RFC3339Nano), g.ModTime.UTC().Format(time.RFC3339Nano))
			}
			if wx, gx := userOnly(w.Xattrs), userOnly(g.Xattrs); !maps.Equal(wx, gx) {
				report("%s: user xattrs: want %v, got %v", p, wx, gx)
			}
		}
		switch w.Type {
		case tar.TypeReg:
			if w.Size != g.Size {
				report("%s: size: want %d, got %d", p, w.Size, g.Size)
			}
			if w.SHA256 != g.SHA256 {
				report("%s: content sha256: want %s, got %s", p, w.SHA256, g.SHA256)
			}
		case tar.TypeSymlink:
			if w.Linkname != g.Linkname {
				report("%s: symlink target: want %q, got %q", p, w.Linkname, g.Linkname)
			}
		case tar.TypeChar, tar.TypeBlock:
			if w.Devmajor != g.Devmajor || w.Devminor != g.Devminor {
				report("%s: device: want %d:%d, got %d:%d", p, w.Devmajor, w.Devminor, g.Devmajor, g.Devminor)
			}
		}
		if wg, gg := wantGroups[p], gotGroups[p]; !slices.Equal(wg, gg) {
			report("%s: hard-link group: want %s, got %s", p, groupString(wg), groupString(gg))
		}
	}
	if len(diffs) == 0 {
		return
	}
	n := len(diffs)
	if n > maxDiffLines {
		diffs = append(diffs[:maxDiffLines], fmt.Sprintf("… and %d more", n-maxDiffLines))
	}
	t.Errorf("trees differ in %d ways:\n\t%s", n, strings.Join(diffs, "\n\t"))
}

func mtimeMatches(want, got time.Time, seconds bool) bool {
	if want.Equal(got) {
		return true
	}
	return seconds && (got.Equal(want.Truncate(time.Second)) || got.Equal(want.Round(time.Second)))
}

// linkGroups maps each hard-linked path to the sorted names of its group.
func linkGroups(tree Tree) map[string][]string {
	byGroup := map[int][]string{}
	for p, n := range tree {
		if n.LinkGroup != 0 {
			byGroup[n.LinkGroup] = append(byGroup[n.LinkGroup], p)
		}
	}
	out := map[string][]string{}
	for _, names := range byGroup {
		if len(names) < 2 {
			continue
		}
		sort.Strings(names)
		for _, p := range names {
			out[p] = names
		}
	}
	return out
}

func groupString(names []string) string {
	if len(names) == 0 {
		return "none (not hard-linked)"
	}
	return "[" + strings.Join(names, ", ") + "]"
}

func userOnly(x map[string]string) map[string]string {
	var m map[string]string
	for k, v := range x {
		if strings.HasPrefix(k, "user.") {
			if m == nil {
				m = map[string]string{}
			}
			m[k] = v
		}
	}
	return m
}

func typeName(t byte) string {
	switch t {
	case tar.TypeReg:
		return "file"
	case tar.TypeDir:
		return "dir"
	case tar.TypeSymlink:
		return "symlink"
	case tar.TypeChar:
		return "char device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "fifo"
	default:
		return fmt.Sprintf("type %q", t)
	}
}
