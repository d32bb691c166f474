package layer

import (
	"archive/tar"
	"context"
	"fmt"
	"log/slog"
	"math"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/weightsnap/weightsnap/internal/wake"
)

// Index rules, shared by every format (tar, stream and eStargz feed the
// same builder with tar headers):
//
//   - Names are cleaned: leading "/" and "./" are stripped (as tar and
//     containerd do), then path.Clean. A name that still escapes the root
//     ("..") is refused. Refusing means the entry is skipped and a warning
//     logged; the rest of the layer is served. So are: a name or link
//     target longer than PATH_MAX (maxNameLen), an entry whose parent is
//     not a directory, a hard link whose target escapes, does not exist
//     earlier in the layer, is a directory or a whiteout or has maxLinks
//     names already, an unknown entry type, uid/gid/device numbers outside
//     uint32, and a non-directory at the root.
//   - Structural problems are errors that fail the whole layer: a truncated
//     or corrupt tar, a negative size or one past the end of the blob, a
//     sparse file (its bytes are not a contiguous range), more than
//     maxEntries names or maxIndexBytes of names, link targets and PAX
//     records.
//   - Missing parent directories are implied: mode 0755, owner 0:0, mtime
//     the Unix epoch. A later header for the directory sets its attributes.
//   - A later entry with the same name replaces the earlier one (tar
//     semantics); a directory replacing a directory keeps its children and
//     inode, anything else replacing a directory drops its subtree.
//   - ".wh.<name>" becomes <name> of TypeWhiteout; ".wh..wh..opq" marks its
//     directory Opaque and is not listed.
//   - Inode numbers follow the order of the headers (root = 1), so they are
//     stable across remounts; a hard link shares its target's inode.
//   - While a streamed layer is still being indexed, an entry is returned
//     as soon as it has been seen: a later header for the same name (rare
//     in a single layer) is not reflected in what was returned before;
//     lookups after completion see the final entry. Nlink is set when the
//     index is complete (setting it at each link would copy every name of
//     the group: quadratic in the links of a hostile layer). A directory
//     listing always waits for completion.

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	rootIno        = 1
	// indexVersion is part of the meta record name; bump it when the
	// record or the index rules change so old records are ignored.
	indexVersion = 2
)

var epoch = time.Unix(0, 0).UTC()

// index is the entry tree of one layer. It can be read while it is built
// (streamed layers): lookups wait on changed until the entry appears or
// the index is finished.
type index struct {
	layer string // for logs

	mu       sync.Mutex
	changed  wake.Signal // broadcast when an entry is added or the index ends
	done     bool
	err      error
	byName   map[string]*Entry
	children map[string]map[string]struct{} // dir → names of its entries
	names    map[uint64][]string            // non-dir inode → its names
	dirs     map[string][]*Entry            // sorted listings, set by finish
	nextIno  uint64
	// data is where an inode's content starts: an offset in the
	// uncompressed tar (tar and stream formats).
	data map[uint64]int64
	// chunks is an inode's content as verified compressed chunks
	// (eStargz).
	chunks map[uint64][]chunkRef
	// relinked holds the inodes whose names changed since their Nlink
	// was set; finish sets it.
	relinked map[uint64]struct{}
	refused  int
	held     int64 // bytes counted against maxIndexBytes
}

// chunkRef is one chunk of a file in an eStargz blob.
type chunkRef struct {
	FileOff  int64  // offset of the chunk in the file
	Size     int64  // uncompressed size
	Off      int64  // offset of the compressed stream in the blob
	End      int64  // end of the compressed stream in the blob
	InnerOff int64  // offset of the chunk in the decompressed stream
	Digest   string // digest of the uncompressed chunk
}

func newIndex(layer string) *index {
	x := &index{
		layer:    layer,
		byName:   map[string]*Entry{},
		children: map[string]map[string]struct{}{},
		names:    map[uint64][]string{},
		data:     map[uint64]int64{},
		chunks:   map[uint64][]chunkRef{},
		relinked: map[uint64]struct{}{},
		nextIno:  rootIno + 1,
	}
	x.byName[""] = &Entry{Name: "", Type: TypeDir, Mode: 0o755, ModTime: epoch, Ino: rootIno, Nlink: 1}
	x.children[""] = map[string]struct{}{}
	return x
}

// cleanName applies the naming rule above; ok is false for a name that
// escapes the root.
func cleanName(name string) (string, bool) {
	for {
		switch {
		case strings.HasPrefix(name, "/"):
			name = name[1:]
		case strings.HasPrefix(name, "./"):
			name = name[2:]
		default:
			name = path.Clean(name)
			switch {
			case name == ".":
				return "", true
			case name == ".." || strings.HasPrefix(name, "../") || strings.HasPrefix(name, "/"):
				return "", false
			}
			return name, true
		}
	}
}

// parentOf is the directory holding name ("" for the root's children).
func parentOf(name string) string {
	d := path.Dir(name)
	if d == "." {
		return ""
	}
	return d
}

func (x *index) refuse(ctx context.Context, hdr *tar.Header, reason string) {
	x.refused++
	switch {
	case x.refused <= maxRefusalsLogged:
		slog.WarnContext(ctx, "layer: refused tar entry", "layer", x.layer, "name", clip(hdr.Name), "linkname", clip(hdr.Linkname), "reason", reason)
	case x.refused == maxRefusalsLogged+1:
		slog.WarnContext(ctx, "layer: refusing more tar entries, no longer logged", "layer", x.layer)
	}
}

func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

func toUint32(v int64) (uint32, bool) {
	if v < 0 || v > math.MaxUint32 {
		return 0, false
	}
	return uint32(v), true
}

// add adds the entry of hdr, whose content starts at dataOff of the
// uncompressed tar (ignored for non-regular files, and for formats that
// locate content otherwise: dataOff < 0). It returns the entry
// added (nil if refused or not listed) or an error for a malformed layer.
func (x *index) add(ctx context.Context, hdr *tar.Header, dataOff int64) (*Entry, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	e, err := x.addLocked(ctx, hdr, dataOff)
	x.changed.Broadcast()
	return e, err
}

func (x *index) addLocked(ctx context.Context, hdr *tar.Header, dataOff int64) (*Entry, error) {
	if err := x.charge(hdr); err != nil {
		return nil, err
	}
	if hdr.Size < 0 {
		return nil, fmt.Errorf("%w: entry %q has negative size %d", ErrCorrupt, hdr.Name, hdr.Size)
	}
	if isSparse(hdr) {
		return nil, fmt.Errorf("%w: entry %q is a sparse file", ErrUnsupported, hdr.Name)
	}
	var typ Type
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeRegA, tar.TypeCont:
		typ = TypeReg
	case tar.TypeDir:
		typ = TypeDir
	case tar.TypeSymlink:
		typ = TypeSymlink
	case tar.TypeChar:
		typ = TypeChar
	case tar.TypeBlock:
		typ = TypeBlock
	case tar.TypeFifo:
		typ = TypeFifo
	case tar.TypeLink:
		// resolved below
	case tar.TypeXGlobalHeader:
		return nil, nil // its records were applied by archive/tar
	default:
		x.refuse(ctx, hdr, fmt.Sprintf("unknown type %q", hdr.Typeflag))
		return nil, nil
	}
	if len(hdr.Name) > maxNameLen || len(hdr.Linkname) > maxNameLen {
		x.refuse(ctx, hdr, "name or link target longer than PATH_MAX")
		return nil, nil
	}
	name, ok := cleanName(hdr.Name)
	if !ok {
		x.refuse(ctx, hdr, "name escapes the layer root")
		return nil, nil
	}
	uid, ok1 := toUint32(int64(hdr.Uid))
	gid, ok2 := toUint32(int64(hdr.Gid))
	major, ok3 := toUint32(hdr.Devmajor)
	minor, ok4 := toUint32(hdr.Devminor)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		x.refuse(ctx, hdr, "uid, gid or device number out of range")
		return nil, nil
	}
	base := path.Base(name)
	if name != "" && base == opaqueMarker {
		dir := parentOf(name)
		if !x.ensureDirs(ctx, hdr, dir) {
			return nil, nil
		}
		d := *x.byName[dir]
		d.Opaque = true
		x.byName[dir] = &d
		return nil, nil
	}
	if name != "" && strings.HasPrefix(base, whiteoutPrefix) {
		target := base[len(whiteoutPrefix):]
		if target == "" || target == "." || target == ".." {
			x.refuse(ctx, hdr, "malformed whiteout")
			return nil, nil
		}
		name = path.Join(parentOf(name), target)
		typ = TypeWhiteout
	}

	e := &Entry{
		Name:    name,
		Type:    typ,
		Mode:    uint32(hdr.Mode & 0o7777),
		UID:     uid,
		GID:     gid,
		ModTime: hdr.ModTime.UTC(),
		Nlink:   1,
	}
	for k, v := range hdr.PAXRecords {
		if xk, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if e.Xattrs == nil {
				e.Xattrs = map[string]string{}
			}
			e.Xattrs[xk] = v
		}
	}
	switch typ {
	case TypeReg:
		e.Size = hdr.Size
	case TypeSymlink:
		e.Linkname = hdr.Linkname
		e.Size = int64(len(hdr.Linkname))
	case TypeChar, TypeBlock:
		e.Devmajor, e.Devminor = major, minor
	case TypeWhiteout:
		// overlayfs recognises a whiteout as a char device 0/0 and
		// ignores its mode, but keep the owner and time from the tar.
		e.Mode = 0
		e.Xattrs = nil
	}

	if name == "" {
		if typ != TypeDir {
			x.refuse(ctx, hdr, "non-directory at the layer root")
			return nil, nil
		}
		old := x.byName[""]
		e.Ino, e.Opaque = old.Ino, old.Opaque
		x.byName[""] = e
		return e, nil
	}

	if hdr.Typeflag == tar.TypeLink {
		target, ok := cleanName(hdr.Linkname)
		if !ok {
			x.refuse(ctx, hdr, "hard link target escapes the layer root")
			return nil, nil
		}
		t := x.byName[target]
		if t == nil || target == name {
			x.refuse(ctx, hdr, "hard link target does not exist earlier in the layer")
			return nil, nil
		}
		if t.Type == TypeDir || t.Type == TypeWhiteout {
			x.refuse(ctx, hdr, "hard link to a directory or a whiteout")
			return nil, nil
		}
		if len(x.names[t.Ino]) >= maxLinks {
			x.refuse(ctx, hdr, fmt.Sprintf("target has %d names already", maxLinks))
			return nil, nil
		}
		if !x.ensureDirs(ctx, hdr, parentOf(name)) {
			return nil, nil
		}
		if x.byName[name] != nil {
			x.remove(name)
		}
		// The target may have been removed by the replacement above only
		// if it was inside a replaced directory; name is not a directory
		// prefix of target unless target is under name.
		t = x.byName[target]
		if t == nil {
			x.refuse(ctx, hdr, "hard link target replaced by the link")
			return nil, nil
		}
		l := *t
		l.Name = name
		x.insert(&l)
		l.Nlink = uint32(len(x.names[l.Ino]))
		x.relinked[l.Ino] = struct{}{}
		return &l, nil
	}

	if !x.ensureDirs(ctx, hdr, parentOf(name)) {
		return nil, nil
	}
	if old := x.byName[name]; old != nil {
		if old.Type == TypeDir && typ == TypeDir {
			e.Ino, e.Opaque = old.Ino, old.Opaque
			x.byName[name] = e
			return e, nil
		}
		x.remove(name)
	}
	e.Ino = x.nextIno
	x.nextIno++
	if typ == TypeReg && dataOff >= 0 {
		x.data[e.Ino] = dataOff
	}
	x.insert(e)
	return e, nil
}

// ensureDirs makes dir and its parents exist as directories, implying
// missing ones; it refuses hdr if one of them is not a directory.
func (x *index) ensureDirs(ctx context.Context, hdr *tar.Header, dir string) bool {
	if e := x.byName[dir]; e != nil {
		if e.Type != TypeDir {
			x.refuse(ctx, hdr, fmt.Sprintf("parent %q is not a directory", dir))
			return false
		}
		return true
	}
	if !x.ensureDirs(ctx, hdr, parentOf(dir)) {
		return false
	}
	d := &Entry{Name: dir, Type: TypeDir, Mode: 0o755, ModTime: epoch, Ino: x.nextIno, Nlink: 1}
	x.nextIno++
	x.insert(d)
	return true
}

func (x *index) insert(e *Entry) {
	x.byName[e.Name] = e
	p := parentOf(e.Name)
	if x.children[p] == nil {
		x.children[p] = map[string]struct{}{}
	}
	x.children[p][e.Name] = struct{}{}
	if e.Type == TypeDir {
		if x.children[e.Name] == nil {
			x.children[e.Name] = map[string]struct{}{}
		}
	} else {
		x.names[e.Ino] = append(x.names[e.Ino], e.Name)
	}
}

func (x *index) remove(name string) {
	e := x.byName[name]
	delete(x.byName, name)
	delete(x.children[parentOf(name)], name)
	if e.Type == TypeDir {
		for c := range x.children[name] {
			x.remove(c)
		}
		delete(x.children, name)
		return
	}
	x.names[e.Ino] = slices.DeleteFunc(x.names[e.Ino], func(n string) bool { return n == name })
	if len(x.names[e.Ino]) == 0 {
		delete(x.names, e.Ino)
		return
	}
	x.relinked[e.Ino] = struct{}{}
}

// setNlink sets Nlink of every name of ino to their number, copying the
// entries: an entry already returned is never modified.
func (x *index) setNlink(ino uint64) {
	names := x.names[ino]
	for _, n := range names {
		c := *x.byName[n]
		c.Nlink = uint32(len(names))
		x.byName[n] = &c
	}
}

// finish marks the index complete (err == nil) or failed and wakes all
// waiters.
func (x *index) finish(err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.done {
		return
	}
	x.done, x.err = true, err
	if err == nil {
		for ino := range x.relinked {
			x.setNlink(ino)
		}
		x.relinked = nil
		x.dirs = make(map[string][]*Entry, len(x.children))
		for d, cs := range x.children {
			l := make([]*Entry, 0, len(cs))
			for c := range cs {
				l = append(l, x.byName[c])
			}
			slices.SortFunc(l, func(a, b *Entry) int { return strings.Compare(a.Name, b.Name) })
			x.dirs[d] = l
		}
		x.children = nil
	}
	x.changed.Broadcast()
}
