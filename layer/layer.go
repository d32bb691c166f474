// Package layer turns an image layer blob into a file tree that can be read
// lazily: an index of every entry (name, attributes, where its bytes are)
// and reads of file contents mapped to byte ranges of the underlying
// content. It knows the layer formats (uncompressed tar, eStargz,
// gzip/zstd tar streamed once) and nothing of FUSE or containerd.
package layer

import (
	"context"
	"time"
)

// Type is the kind of an entry.
type Type uint8

const (
	// TypeReg is a regular file (a tar hard link is a TypeReg entry
	// sharing the Ino of its target).
	TypeReg Type = iota + 1
	// TypeDir is a directory.
	TypeDir
	// TypeSymlink is a symbolic link; Linkname is its target.
	TypeSymlink
	// TypeChar is a character device (Devmajor, Devminor).
	TypeChar
	// TypeBlock is a block device (Devmajor, Devminor).
	TypeBlock
	// TypeFifo is a named pipe.
	TypeFifo
	// TypeWhiteout is an OCI whiteout (".wh.<name>" in the tar), presented
	// under <name> the way overlayfs expects: a character device 0/0.
	TypeWhiteout
)

// Entry is one file of a layer. Entries are immutable once returned: when
// a streamed layer later changes an entry (a duplicate name replaces it,
// its hard links are counted when the index is complete) the index holds
// a new Entry and Lookup returns that from then on.
type Entry struct {
	// Name is the cleaned path relative to the layer root, "/"-separated,
	// without leading "/" or "./"; the root is "".
	Name string
	Type Type
	// Mode holds the permission bits plus setuid, setgid and sticky
	// (as in tar: 07777).
	Mode     uint32
	UID, GID uint32
	Size     int64
	ModTime  time.Time
	// Linkname is a symlink's target, verbatim.
	Linkname string
	Devmajor uint32
	Devminor uint32
	// Xattrs from PAX SCHILY.xattr.* records.
	Xattrs map[string]string
	// Opaque is set on a directory that held ".wh..wh..opq" in this layer;
	// it is presented as the xattr trusted.overlay.opaque=y.
	Opaque bool
	// Ino is a stable inode number, unique in the layer; hard links share
	// the Ino (and the content) of the entry they link to.
	Ino uint64
	// Nlink is the number of names sharing Ino (2+ for a directory is not
	// required; FUSE callers may compute it). This package sets 1 for
	// directories and for files without hard links.
	Nlink uint32
}

// Layer is the file tree of one layer.
type Layer interface {
	// Lookup returns the entry at name. For a layer whose index is still
	// being built (a streamed gzip/zstd layer) it waits until the entry
	// has been seen or the index is complete. It returns an error
	// satisfying errors.Is(err, fs.ErrNotExist) if there is no such entry.
	Lookup(ctx context.Context, name string) (*Entry, error)
	// ReadDir returns the entries directly under dir, sorted by name,
	// waiting for the index to be complete if it is not yet.
	ReadDir(ctx context.Context, dir string) ([]*Entry, error)
	// ReadAt reads the content of the regular file e at off, with
	// io.ReaderAt semantics (io.EOF at the end). A byte that cannot be
	// fetched or verified is an error, never a wrong byte.
	ReadAt(ctx context.Context, e *Entry, p []byte, off int64) (int, error)
	// Size is the size of the regular files' content, each hard-link
	// group once (of the entries seen so far, for a streamed layer).
	Size() int64
	// Close releases the layer's resources (cache references, background
	// work).
	Close() error
}
