package fs

import (
	"context"
	"errors"
	"io"
	iofs "io/fs"
	"log/slog"
	"os"
	"path"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
)

// opaqueXattr marks a directory that hides the contents of lower layers.
// overlayfs reads it from its lower directories with getxattr.
const opaqueXattr = "trusted.overlay.opaque"

const (
	// blockSize is reported as st_blksize and the statfs block size.
	blockSize = 4096
	// dirSize is the st_size of a directory, as on most disk file systems.
	dirSize = 4096
)

// The read latency series are resolved once: WithLabelValues takes a lock
// and a map lookup that every read would otherwise pay.
var (
	readLatencyOK    = metrics.ReadLatency.WithLabelValues("ok")
	readLatencyError = metrics.ReadLatency.WithLabelValues("error")
	opensPassthrough = metrics.FileOpens.WithLabelValues("passthrough")
	opensFUSE        = metrics.FileOpens.WithLabelValues("fuse")
	openPassthrough  = metrics.OpenFiles.WithLabelValues("passthrough")
	openFUSE         = metrics.OpenFiles.WithLabelValues("fuse")
)

// fsys is the state shared by every node of one mount. It is written once
// before the mount and read concurrently after, so it needs no locks; the
// only mutable field is the first-read flag, an atomic.
type fsys struct {
	layer      layer.Layer
	name       string
	mountpoint string // labels the time to first read
	onRead     func(e *layer.Entry, off, n int64)
	// files is set when the layer can hand out the local file holding a
	// read's bytes: reads are then spliced from the node cache into FUSE
	// without passing through this process's memory.
	files layer.FileReader
	// passthrough finds a local file holding a regular file's content
	// (WithPassthrough); noPassthrough is set once the kernel is
	// known not to support it.
	passthrough   func(e *layer.Entry) (*os.File, bool)
	noPassthrough atomic.Bool
	log           *slog.Logger
	mounted       time.Time

	// firstRead flips once, on the first successful content read, to
	// record the mount's time to first read.
	firstRead atomic.Bool
}

// node is one inode of the layer. Its entry is immutable, so every
// operation answers from it without locking. Hard links share one node:
// go-fuse finds the existing Inode by StableAttr.Ino.
type node struct {
	gofs.Inode
	fs *fsys
	e  *layer.Entry

	// The kernel fails the open of a file in passthrough mode while it is
	// open in caching mode, and the other way round, so every open of a
	// node is of the mode of those still open.
	openMu      sync.Mutex
	cachedOpens int      // open handles served by Read
	passOpens   int      // open handles the kernel reads from passFile
	passFile    *os.File // set while passOpens > 0
}

var (
	_ = (gofs.NodeLookuper)((*node)(nil))
	_ = (gofs.NodeReaddirer)((*node)(nil))
	_ = (gofs.NodeGetattrer)((*node)(nil))
	_ = (gofs.NodeReadlinker)((*node)(nil))
	_ = (gofs.NodeGetxattrer)((*node)(nil))
	_ = (gofs.NodeListxattrer)((*node)(nil))
	_ = (gofs.NodeStatfser)((*node)(nil))
	_ = (gofs.NodeOpener)((*node)(nil))
	_ = (gofs.NodeReader)((*node)(nil))
)

// Lookup finds a child in the layer's index; for a streamed layer this may
// wait until the entry has arrived.
func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	p := childPath(n.e.Name, name)
	e, err := n.fs.layer.Lookup(ctx, p)
	if err != nil {
		return nil, n.fs.errno(ctx, "lookup", p, err)
	}
	fillAttr(e, &out.Attr)
	child := &node{fs: n.fs, e: e}
	return n.NewInode(ctx, child, gofs.StableAttr{Mode: typeBits(e.Type), Ino: e.Ino}), 0
}

// Readdir lists the directory from the layer's index.
func (n *node) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	ents, err := n.fs.layer.ReadDir(ctx, n.e.Name)
	if err != nil {
		return nil, n.fs.errno(ctx, "readdir", n.e.Name, err)
	}
	list := make([]fuse.DirEntry, 0, len(ents))
	for _, e := range ents {
		list = append(list, fuse.DirEntry{Name: path.Base(e.Name), Mode: typeBits(e.Type), Ino: e.Ino})
	}
	return gofs.NewListDirStream(list), 0
}

// Getattr answers from the entry; content never changes.
func (n *node) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	fillAttr(n.e, &out.Attr)
	return 0
}

// Readlink returns a symlink's target verbatim.
func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if n.e.Type != layer.TypeSymlink {
		return nil, syscall.EINVAL
	}
	return []byte(n.e.Linkname), 0
}

// Getxattr serves the entry's PAX xattrs plus the overlay opaque marker.
func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	var v string
	switch {
	case attr == opaqueXattr && n.e.Opaque:
		v = "y"
	default:
		var ok bool
		if v, ok = n.e.Xattrs[attr]; !ok {
			return 0, syscall.ENODATA
		}
	}
	// A too small buffer (including the size-0 probe, which go-fuse turns
	// into a size answer) gets ERANGE and the size needed.
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

// Listxattr lists the names Getxattr answers, each NUL-terminated.
func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	size := 0
	for k := range n.e.Xattrs {
		size += len(k) + 1
	}
	_, dup := n.e.Xattrs[opaqueXattr]
	opaque := n.e.Opaque && !dup
	if opaque {
		size += len(opaqueXattr) + 1
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	b := dest[:0]
	for k := range n.e.Xattrs {
		b = append(append(b, k...), 0)
	}
	if opaque {
		b = append(append(b, opaqueXattr...), 0)
	}
	return uint32(len(b)), 0
}

// Statfs describes a full, read-only file system: nothing is free.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	*out = fuse.StatfsOut{}
	out.Bsize = blockSize
	out.Frsize = blockSize
	out.NameLen = 255
	if sz := n.fs.layer.Size(); sz > 0 {
		out.Blocks = uint64((sz + blockSize - 1) / blockSize)
	}
	return 0
}

// Open allows reading only. A file whose content is all in a local file
// is passed through to it; otherwise the page cache is kept across opens,
// because the content of a layer never changes.
func (n *node) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND|syscall.O_CREAT) != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.e.Type != layer.TypeReg {
		return nil, 0, syscall.EINVAL
	}
	n.openMu.Lock()
	defer n.openMu.Unlock()
	if n.passOpens == 0 && n.cachedOpens == 0 && n.fs.passthrough != nil && !n.fs.noPassthrough.Load() {
		n.passFile, _ = n.fs.passthrough(n.e)
	}
	if n.passFile != nil {
		// Every handle carries the file: go-fuse registers it for
		// whichever open it finishes first and reuses it for the others.
		n.passOpens++
		opensPassthrough.Inc()
		openPassthrough.Inc()
		return &passthroughHandle{n: n, f: n.passFile}, 0, 0
	}
	n.cachedOpens++
	opensFUSE.Inc()
	openFUSE.Inc()
	return &cachedHandle{n: n}, fuse.FOPEN_KEEP_CACHE, 0
}

// passthroughHandle is an open file the kernel reads from f itself.
type passthroughHandle struct {
	n *node
	f *os.File
}

var (
	_ = (gofs.FilePassthroughFder)((*passthroughHandle)(nil))
	_ = (gofs.FileReleaser)((*passthroughHandle)(nil))
)

// PassthroughFd is asked by go-fuse when the node has no backing file
// registered; the kernel keeps its own reference to the file.
func (h *passthroughHandle) PassthroughFd() (int, bool) {
	return int(h.f.Fd()), true
}

func (h *passthroughHandle) Release(ctx context.Context) syscall.Errno {
	h.n.openMu.Lock()
	h.n.passOpens--
	if h.n.passOpens == 0 {
		h.n.passFile = nil
	}
	h.n.openMu.Unlock()
	openPassthrough.Dec()
	return 0
}

// cachedHandle is an open file served by Read.
type cachedHandle struct{ n *node }

func (h *cachedHandle) Release(ctx context.Context) syscall.Errno {
	h.n.openMu.Lock()
	h.n.cachedOpens--
	h.n.openMu.Unlock()
	openFUSE.Dec()
	return 0
}

// Read fills go-fuse's own (pooled) request buffer from the layer and
// hands it back in a pooled ReadResult, so a read allocates nothing.
func (n *node) Read(ctx context.Context, f gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	e := n.e
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= e.Size || len(dest) == 0 {
		return newReadResult(nil), 0
	}
	want := min(int64(len(dest)), e.Size-off)
	if n.fs.onRead != nil {
		n.fs.onRead(e, off, want)
	}
	start := time.Now()
	var res fuse.ReadResult
	var err error
	if n.fs.files != nil {
		res, err = n.readFile(ctx, off, want)
	} else {
		err = readFull(ctx, n.fs.layer, e, dest[:want], off)
		res = newReadResult(dest[:want])
	}
	elapsed := time.Since(start).Seconds()
	if err != nil {
		readLatencyError.Observe(elapsed)
		return nil, n.fs.readErrno(ctx, e, off, want, err)
	}
	readLatencyOK.Observe(elapsed)
	if !n.fs.firstRead.Load() && n.fs.firstRead.CompareAndSwap(false, true) {
		metrics.TimeToFirstRead.WithLabelValues(n.fs.mountpoint).Set(time.Since(n.fs.mounted).Seconds())
	}
	return res, 0
}

// readFile answers a read with the range of a local file holding it;
// go-fuse splices it into the kernel.
func (n *node) readFile(ctx context.Context, off, want int64) (fuse.ReadResult, error) {
	f, fileOff, length, release, err := n.fs.files.ReadFile(ctx, n.e, off, int(want))
	if err != nil {
		return nil, err
	}
	if int64(length) < want {
		release()
		return nil, errShortContent
	}
	return &fileResult{ReadResult: fuse.ReadResultFd(f.Fd(), fileOff, length), fd: f.Fd(), off: fileOff, size: length, release: release}, nil
}

// fileResult is a read answered from a range of a local file; go-fuse
// splices it (Seekable) and calls Done once it has been sent, which lets
// the cache reuse the range.
type fileResult struct {
	fuse.ReadResult
	fd      uintptr
	off     int64
	size    int
	release func()
}

func (r *fileResult) Seekable() (uintptr, int64, int) { return r.fd, r.off, r.size }

func (r *fileResult) Done() {
	r.ReadResult.Done()
	r.release()
}

// errShortContent means the layer's content ended before the size its
// index gives the file: serving the short read would make the kernel
// believe the file is smaller, so it is an I/O error instead.
var errShortContent = errors.New("content shorter than the file's size")

// readFull fills p entirely from e at off. io.ReaderAt promises an error
// with every short read, but a layer that returns a short read without
// one is asked again rather than trusted to be at the end.
func readFull(ctx context.Context, l layer.Layer, e *layer.Entry, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := l.ReadAt(ctx, e, p, off)
		p, off = p[n:], off+int64(n)
		switch {
		case len(p) == 0:
			return nil
		case errors.Is(err, io.EOF):
			return errShortContent
		case err != nil:
			return err
		case n == 0:
			return io.ErrNoProgress
		}
	}
	return nil
}

// errno maps an index error (lookup, readdir) to the errno a caller gets.
func (f *fsys) errno(ctx context.Context, op, name string, err error) syscall.Errno {
	switch {
	case errors.Is(err, iofs.ErrNotExist):
		return syscall.ENOENT
	case isCanceled(ctx, err):
		return syscall.EINTR
	}
	f.log.Error("layer index error", "op", op, "file", name, "err", err)
	return syscall.EIO
}

// readErrno maps a content read error to the errno the reader gets.
func (f *fsys) readErrno(ctx context.Context, e *layer.Entry, off, n int64, err error) syscall.Errno {
	switch {
	case errors.Is(err, iofs.ErrNotExist):
		return syscall.ENOENT
	case isCanceled(ctx, err):
		return syscall.EINTR
	}
	f.log.Error("layer read error", "file", e.Name, "offset", off, "len", n, "err", err)
	return syscall.EIO
}

// isCanceled reports whether err comes from the reader giving up (the
// kernel interrupting the request), not from the content.
func isCanceled(ctx context.Context, err error) bool {
	return errors.Is(err, context.Canceled) || (ctx.Err() != nil && errors.Is(err, ctx.Err()))
}

func childPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// typeBits is the S_IFMT part of an entry's mode. A whiteout is a
// character device 0/0, which is how overlayfs recognises one.
func typeBits(t layer.Type) uint32 {
	switch t {
	case layer.TypeDir:
		return syscall.S_IFDIR
	case layer.TypeSymlink:
		return syscall.S_IFLNK
	case layer.TypeChar, layer.TypeWhiteout:
		return syscall.S_IFCHR
	case layer.TypeBlock:
		return syscall.S_IFBLK
	case layer.TypeFifo:
		return syscall.S_IFIFO
	default:
		return syscall.S_IFREG
	}
}

// fillAttr converts an entry to FUSE attributes.
func fillAttr(e *layer.Entry, a *fuse.Attr) {
	a.Ino = e.Ino
	a.Mode = typeBits(e.Type) | e.Mode&07777
	a.Uid, a.Gid = e.UID, e.GID
	a.Nlink = max(e.Nlink, 1)
	a.Rdev = 0
	switch e.Type {
	case layer.TypeReg:
		a.Size = uint64(max(e.Size, 0))
	case layer.TypeDir:
		a.Size = dirSize
		// A directory's link count would need every subdirectory;
		// 1 is the Linux convention for "not counted", which tools
		// like find understand (no leaf optimisation).
		if e.Nlink < 2 {
			a.Nlink = 1
		}
	case layer.TypeSymlink:
		a.Size = uint64(len(e.Linkname))
	case layer.TypeChar, layer.TypeBlock:
		// FUSE carries the kernel's 32-bit new_encode_dev form, which is
		// the low half of glibc's 64-bit encoding.
		a.Rdev = uint32(unix.Mkdev(e.Devmajor, e.Devminor))
	}
	a.Blksize = blockSize
	a.Blocks = (a.Size + 511) / 512
	var sec, nsec uint64
	if t := e.ModTime; !t.IsZero() && t.Unix() >= 0 {
		sec, nsec = uint64(t.Unix()), uint64(t.Nanosecond())
	}
	a.Atime, a.Mtime, a.Ctime = sec, sec, sec
	a.Atimensec, a.Mtimensec, a.Ctimensec = uint32(nsec), uint32(nsec), uint32(nsec)
}

// readResult is a fuse.ReadResult over a slice of go-fuse's request
// buffer. The struct is recycled once go-fuse has written the reply.
type readResult struct {
	data []byte
}

var readResultPool = sync.Pool{New: func() any { return new(readResult) }}

func newReadResult(p []byte) *readResult {
	r := readResultPool.Get().(*readResult)
	r.data = p
	return r
}

// Bytes returns the data read.
func (r *readResult) Bytes(buf []byte) ([]byte, fuse.Status) { return r.data, fuse.OK }

// Size is the number of bytes read.
func (r *readResult) Size() int { return len(r.data) }

// Done recycles r; go-fuse calls it after sending the reply.
func (r *readResult) Done() {
	r.data = nil
	readResultPool.Put(r)
}
