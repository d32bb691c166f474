package testutil

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Node is the expected or observed state of one path of a file system tree.
type Node struct {
	// Type is a tar type flag: tar.TypeReg, TypeDir, TypeSymlink, TypeChar,
	// TypeBlock or TypeFifo. Hard links are TypeReg (or the target's type)
	// with a LinkGroup.
	Type byte
	// Mode holds the permission bits plus setuid, setgid and sticky (07777).
	Mode     uint32
	UID, GID int
	// Size is set for regular files only.
	Size    int64
	ModTime time.Time
	// Linkname is a symlink's target.
	Linkname string
	// Devmajor and Devminor are set for character and block devices.
	Devmajor, Devminor int64
	// Xattrs maps names ("user.x") to values.
	Xattrs map[string]string
	// SHA256 is the hex digest of a regular file's content.
	SHA256 string
	// LinkGroup is non-zero for paths that are hard links of one inode; all
	// names of one inode share the number. Numbers mean nothing across trees:
	// CompareTrees compares the groups as sets of names.
	LinkGroup int
	// Implied marks a directory whose attributes no entry of the topmost
	// layer that touched it defines (an extractor invents them), so
	// CompareTrees does not compare them.
	Implied bool
}

// Tree maps cleaned relative paths ("a/b", no leading "./" or "/") to nodes.
// The root directory itself is not in a Tree.
type Tree map[string]*Node

// Whiteout names of the OCI image layer specification.
const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// ExtractTree applies uncompressed tar layers, base first, to an empty tree
// in memory with OCI layer semantics, as the reference a mounted image is
// compared against. Within each layer, whiteouts apply to the lower layers
// only, wherever they sit in the tar:
//   - ".wh.NAME" removes NAME and its subtree;
//   - ".wh..wh..opq" removes the lower children of its directory;
//   - a non-directory entry replaces whatever was at its path (a directory
//     with its subtree); a directory entry replaces a non-directory, and over
//     a directory it replaces the attributes and keeps the children;
//   - a hard link shares its target's node attributes and link group.
//
// Parents a layer uses without an entry of its own are marked Implied.
// ExtractTree panics on a malformed layer: its input is test data, and a bad
// fixture is a bug in the test.
func ExtractTree(layers [][]byte) Tree {
	tree := Tree{}
	nextGroup := 1
	for i, layer := range layers {
		entries, err := readLayer(layer)
		if err != nil {
			panic(fmt.Sprintf("ExtractTree: layer %d: %v", i, err))
		}
		explicit := map[string]bool{}
		for _, e := range entries {
			dir, base := path.Split(e.name)
			dir = strings.TrimSuffix(dir, "/")
			switch {
			case base == whiteoutOpaque:
				tree.removeChildren(dir)
			case strings.HasPrefix(base, whiteoutPrefix):
				tree.removeSubtree(path.Join(dir, strings.TrimPrefix(base, whiteoutPrefix)))
			default:
				explicit[e.name] = true
			}
		}
		for _, e := range entries {
			if _, base := path.Split(e.name); strings.HasPrefix(base, whiteoutPrefix) {
				continue
			}
			if err := tree.apply(e, explicit, &nextGroup); err != nil {
				panic(fmt.Sprintf("ExtractTree: layer %d: %v", i, err))
			}
		}
	}
	tree.dropSingletonGroups()
	return tree
}

type layerEntry struct {
	name string
	hdr  *tar.Header
	node *Node
}

func readLayer(layer []byte) ([]layerEntry, error) {
	var entries []layerEntry
	tr := tar.NewReader(bytes.NewReader(layer))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return entries, nil
		}
		if err != nil {
			return nil, err
		}
		name := cleanName(hdr.Name)
		if name == "" {
			continue // the root directory
		}
		n := &Node{
			Type:    hdr.Typeflag,
			Mode:    uint32(hdr.Mode) & 0o7777,
			UID:     hdr.Uid,
			GID:     hdr.Gid,
			ModTime: hdr.ModTime,
		}
		for k, v := range hdr.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if n.Xattrs == nil {
					n.Xattrs = map[string]string{}
				}
				n.Xattrs[x] = v
			}
		}
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA: //nolint:staticcheck // old tars use TypeRegA
			n.Type = tar.TypeReg
			h := sha256.New()
			size, err := io.Copy(h, tr)
			if err != nil {
				return nil, fmt.Errorf("read %s: %w", hdr.Name, err)
			}
			n.Size = size
			n.SHA256 = hex.EncodeToString(h.Sum(nil))
		case tar.TypeSymlink:
			n.Linkname = hdr.Linkname
		case tar.TypeChar, tar.TypeBlock:
			n.Devmajor, n.Devminor = hdr.Devmajor, hdr.Devminor
		case tar.TypeLink:
			n = nil // resolved against the tree when applied
		case tar.TypeDir, tar.TypeFifo:
		default:
			return nil, fmt.Errorf("%s: unsupported tar type %q", hdr.Name, hdr.Typeflag)
		}
		entries = append(entries, layerEntry{name: name, hdr: hdr, node: n})
	}
}

// cleanName turns a tar entry name into a Tree key.
func cleanName(name string) string {
	name = path.Clean("/" + name)
	return strings.TrimPrefix(name, "/")
}

func (tree Tree) apply(e layerEntry, explicit map[string]bool, nextGroup *int) error {
	// Parents first: a missing one, or a non-directory in the way, becomes an
	// implied directory.
	var parents []string
	for dir := path.Dir(e.name); dir != "."; dir = path.Dir(dir) {
		parents = append(parents, dir)
	}
	slices.Reverse(parents)
	for _, dir := range parents {
		cur := tree[dir]
		if cur != nil && cur.Type != tar.TypeDir {
			tree.removeSubtree(dir)
			cur = nil
		}
		if cur == nil {
			tree[dir] = &Node{Type: tar.TypeDir, Mode: 0o755, Implied: true}
		} else if !explicit[dir] {
			cur.Implied = true
		}
	}

	n := e.node
	if e.hdr.Typeflag == tar.TypeLink {
		target := tree[cleanName(e.hdr.Linkname)]
		if target == nil {
			return fmt.Errorf("hard link %s: target %s not found", e.hdr.Name, e.hdr.Linkname)
		}
		if target.LinkGroup == 0 {
			target.LinkGroup = *nextGroup
			*nextGroup++
		}
		cp := *target
		n = &cp
	}
	if cur := tree[e.name]; cur != nil && (cur.Type == tar.TypeDir) != (n.Type == tar.TypeDir) {
		tree.removeSubtree(e.name)
	}
	tree[e.name] = n
	return nil
}

func (tree Tree) removeSubtree(p string) {
	delete(tree, p)
	tree.removeChildren(p)
}

func (tree Tree) removeChildren(dir string) {
	prefix := dir + "/"
	if dir == "" {
		prefix = ""
	}
	for k := range tree {
		if strings.HasPrefix(k, prefix) {
			delete(tree, k)
		}
	}
}

// dropSingletonGroups clears LinkGroup where whiteouts or overwrites left a
// single name of an inode: it is no longer a hard link.
func (tree Tree) dropSingletonGroups() {
	count := map[int]int{}
	for _, n := range tree {
		if n.LinkGroup != 0 {
			count[n.LinkGroup]++
		}
	}
	for _, n := range tree {
		if n.LinkGroup != 0 && count[n.LinkGroup] < 2 {
			n.LinkGroup = 0
		}
	}
}

// ScanTree walks the directory root (typically a mount) without following
// symlinks and records every path below it. Regular files are hashed, hard
// links are grouped by (device, inode), only user.* xattrs are read (a merged
// overlay also exposes trusted.overlay.*), and overlay whiteout devices
// (character 0/0) are skipped, since an overlay mount never shows them.
func ScanTree(t testing.TB, root string) Tree {
	t.Helper()
	tree := Tree{}
	type inode struct{ dev, ino uint64 }
	groups := map[inode][]*Node{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat: %w", err)
		}
		n := &Node{
			Mode:    st.Mode & 0o7777,
			UID:     int(st.Uid),
			GID:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			n.Type = tar.TypeReg
			n.Size = st.Size
			if n.SHA256, err = hashFile(p); err != nil {
				return err
			}
		case unix.S_IFDIR:
			n.Type = tar.TypeDir
		case unix.S_IFLNK:
			n.Type = tar.TypeSymlink
			if n.Linkname, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			n.Type = tar.TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				n.Type = tar.TypeBlock
			}
			n.Devmajor, n.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
			if n.Type == tar.TypeChar && st.Rdev == 0 {
				return nil // overlay whiteout
			}
		case unix.S_IFIFO:
			n.Type = tar.TypeFifo
		default:
			return fmt.Errorf("%s: unexpected file type %#o", p, st.Mode&unix.S_IFMT)
		}
		if n.Xattrs, err = userXattrs(p); err != nil {
			return err
		}
		if n.Type != tar.TypeDir {
			k := inode{uint64(st.Dev), st.Ino}
			groups[k] = append(groups[k], n)
		}
		tree[filepath.ToSlash(rel)] = n
		return nil
	})
	if err != nil {
		t.Fatalf("scan %s: %v", root, err)
	}
	group := 1
	for _, ns := range groups {
		if len(ns) < 2 {
			continue
		}
		for _, n := range ns {
			n.LinkGroup = group
		}
		group++
	}
	return tree
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// userXattrs returns p's user.* extended attributes (nil if none, or if the
// file system has no xattr support).
func userXattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil || size == 0 {
		if err == nil || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.ENODATA) {
			return nil, nil
		}
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	var m map[string]string
	for _, name := range strings.Split(string(buf[:size]), "\x00") {
		if !strings.HasPrefix(name, "user.") {
			continue
		}
		vsize, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		val := make([]byte, vsize)
		vsize, err = unix.Lgetxattr(p, name, val)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		if m == nil {
			m = map[string]string{}
		}
		m[name] = string(val[:vsize])
	}
	return m, nil
}

// maxDiffLines bounds the report so a wholly wrong tree stays readable.
const maxDiffLines = 100
