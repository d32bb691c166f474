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

// fsys is the FUSE file system of one layer, served at the level of
// go-fuse's raw protocol rather than its node tree, for one reason: a
// restarted process must be able to take over a live connection (Resume),
// and the kernel then speaks of node IDs and file handles the new process
// never handed out. Here a node ID is the entry's inode number (the root
// is 1, FUSE_ROOT_ID) and a handle is the kind of open it is, so both mean
// the same thing to any process serving the same layer; the one state the
// kernel holds that cannot be derived from the layer, the kind of each
// file's open handles, is kept in the open table.
type fsys struct {
	fuse.RawFileSystem // ENOSYS for every write operation

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
	opens         *openTable
	log           *slog.Logger
	mounted       time.Time
	server        *fuse.Server // set by Init, before any request

	// nodes are the entries the kernel knows, by node ID. A Lookup adds
	// them; a resumed server, asked about a node a former process handed
	// out, fills the map from the whole tree once (walked).
	mu     sync.RWMutex
	nodes  map[uint64]*node
	walked bool

	// firstRead flips once, on the first successful content read, to
	// record the mount's time to first read.
	firstRead atomic.Bool
}

// node is an entry the kernel knows, with the place it was found (for
// invalidating its name). Hard links share the node of their inode.
type node struct {
	e      *layer.Entry
	parent uint64
	name   string
}

// Open handles carry their kind, so that a release (from this process's
// opens or a former one's) counts down the right one.
const (
	fhCached      = 1 // served by Read, the kernel caching pages
	fhPassthrough = 2 // the kernel reads a local file itself
)

func newFsys(l *layer.Opened, root *layer.Entry, opt options) *fsys {
	return &fsys{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		layer:         l.Layer,
		files:         l.Files,
		name:          opt.name,
		onRead:        opt.onRead,
		passthrough:   opt.passthrough,
		log:           slog.Default().With("layer", opt.name),
		nodes:         map[uint64]*node{fuse.FUSE_ROOT_ID: {e: root}},
	}
}

func (f *fsys) String() string          { return f.name }
func (f *fsys) Init(s *fuse.Server)     { f.server = s }
func (f *fsys) Forget(nodeid, n uint64) {} // nodes live as long as the mount

// node returns the node the kernel calls id. An ID this process has not
// handed out was handed out by the process it took over from: the whole
// tree is walked once to learn every ID.
func (f *fsys) node(ctx context.Context, id uint64) (*node, fuse.Status) {
	f.mu.RLock()
	n, walked := f.nodes[id], f.walked
	f.mu.RUnlock()
	if n != nil {
		return n, fuse.OK
	}
	if !walked {
		if err := f.walk(ctx); err != nil {
			return nil, fuse.Status(f.errno(ctx, "walk", "", err))
		}
		f.mu.RLock()
		n = f.nodes[id]
		f.mu.RUnlock()
	}
	if n == nil {
		f.log.Error("request for an unknown node", "node", id)
		return nil, fuse.Status(syscall.ESTALE)
	}
	return n, fuse.OK
}

// walk adds every entry of the layer to the nodes.
func (f *fsys) walk(ctx context.Context) error {
	var visit func(dir *node, ino uint64) error
	visit = func(dir *node, ino uint64) error {
		ents, err := f.layer.ReadDir(ctx, dir.e.Name)
		if err != nil {
			return err
		}
		for _, e := range ents {
			child := f.add(ino, path.Base(e.Name), e)
			if e.Type == layer.TypeDir {
				if err := visit(child, e.Ino); err != nil {
					return err
				}
			}
		}
		return nil
	}
	f.mu.RLock()
	root := f.nodes[fuse.FUSE_ROOT_ID]
	f.mu.RUnlock()
	if err := visit(root, fuse.FUSE_ROOT_ID); err != nil {
		return err
	}
	f.mu.Lock()
	f.walked = true
	f.mu.Unlock()
	return nil
}

// add records e, found as name in directory parent, unless its inode is
// known already.
func (f *fsys) add(parent uint64, name string, e *layer.Entry) *node {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := f.nodes[e.Ino]; n != nil {
		return n
	}
	n := &node{e: e, parent: parent, name: name}
	f.nodes[e.Ino] = n
	return n
}

// known returns every node the kernel knows.
func (f *fsys) known() []*node {
	f.mu.RLock()
	defer f.mu.RUnlock()
	ns := make([]*node, 0, len(f.nodes))
	for _, n := range f.nodes {
		ns = append(ns, n)
	}
	return ns
}

// Lookup finds a child in the layer's index; for a streamed layer this may
// wait until the entry has arrived. A name that does not exist is cached
// by the kernel as such (a negative entry).
func (f *fsys) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	ctx := requestContext(cancel)
	dir, st := f.node(ctx, h.NodeId)
	if !st.Ok() {
		return st
	}
	p := childPath(dir.e.Name, name)
	e, err := f.layer.Lookup(ctx, p)
	if errors.Is(err, iofs.ErrNotExist) {
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(cacheTimeout)
		return fuse.OK
	}
	if err != nil {
		return fuse.Status(f.errno(ctx, "lookup", p, err))
	}
	f.add(h.NodeId, name, e)
	out.NodeId = e.Ino
	out.Generation = 1
	fillAttr(e, &out.Attr)
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(cacheTimeout)
	return fuse.OK
}

// GetAttr answers from the entry; content never changes.
func (f *fsys) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, st := f.node(requestContext(cancel), in.NodeId)
	if !st.Ok() {
		return st
	}
	fillAttr(n.e, &out.Attr)
	out.SetTimeout(cacheTimeout)
	return fuse.OK
}

// OpenDir allows listing a directory; the kernel may keep the listing.
func (f *fsys) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n, st := f.node(requestContext(cancel), in.NodeId)
	if !st.Ok() {
		return st
	}
	if n.e.Type != layer.TypeDir {
		return fuse.ENOTDIR
	}
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR
	return fuse.OK
}

func (f *fsys) ReleaseDir(in *fuse.ReleaseIn) {}

// ReadDir lists the directory from the layer's index: ".", "..", then the
// entries sorted by name; an entry's offset is its place in that list, so
// any process serving the layer continues a listing where another left
// it.
func (f *fsys) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	ctx := requestContext(cancel)
	n, st := f.node(ctx, in.NodeId)
	if !st.Ok() {
		return st
	}
	ents, err := f.layer.ReadDir(ctx, n.e.Name)
	if err != nil {
		return fuse.Status(f.errno(ctx, "readdir", n.e.Name, err))
	}
	parent := n.parent
	if parent == 0 {
		parent = fuse.FUSE_ROOT_ID
	}
	list := make([]fuse.DirEntry, 0, len(ents)+2)
	list = append(list,
		fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: n.e.Ino},
		fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: parent})
	for _, e := range ents {
		list = append(list, fuse.DirEntry{Name: path.Base(e.Name), Mode: typeBits(e.Type), Ino: e.Ino})
	}
	for i := int(min(in.Offset, uint64(len(list)))); i < len(list); i++ {
		list[i].Off = uint64(i) + 1
		if !out.AddDirEntry(list[i]) {
			break
		}
	}
	return fuse.OK
}

// Readlink returns a symlink's target verbatim.
func (f *fsys) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	n, st := f.node(requestContext(cancel), h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	if n.e.Type != layer.TypeSymlink {
		return nil, fuse.EINVAL
	}
	return []byte(n.e.Linkname), fuse.OK
}

// GetXAttr serves the entry's PAX xattrs plus the overlay opaque marker.
// A too small buffer (including the size-0 probe) gets ERANGE and the
// size needed.
func (f *fsys) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	n, st := f.node(requestContext(cancel), h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	var v string
	switch {
	case attr == opaqueXattr && n.e.Opaque:
		v = "y"
	default:
		var ok bool
		if v, ok = n.e.Xattrs[attr]; !ok {
			return 0, fuse.ENOATTR
		}
	}
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

// ListXAttr lists the names GetXAttr answers, each NUL-terminated.
func (f *fsys) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	n, st := f.node(requestContext(cancel), h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	e := n.e
	size := 0
	for k := range e.Xattrs {
		size += len(k) + 1
	}
	_, dup := e.Xattrs[opaqueXattr]
	opaque := e.Opaque && !dup
	if opaque {
		size += len(opaqueXattr) + 1
	}
	if len(dest) < size {
		return uint32(size), fuse.ERANGE
	}
	b := dest[:0]
	for k := range e.Xattrs {
		b = append(append(b, k...), 0)
	}
	if opaque {
		b = append(append(b, opaqueXattr...), 0)
	}
	return uint32(len(b)), fuse.OK
}

// StatFs describes a full, read-only file system: nothing is free.
func (f *fsys) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	*out = fuse.StatfsOut{}
	out.Bsize = blockSize
	out.Frsize = blockSize
	out.NameLen = 255
	if sz := f.layer.Size(); sz > 0 {
		out.Blocks = uint64((sz + blockSize - 1) / blockSize)
	}
	return fuse.OK
}

// Open allows reading only. A file whose content is all in a local file
// is passed through to it; otherwise the page cache is kept across opens,
// because the content of a layer never changes.
func (f *fsys) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.Flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND|syscall.O_CREAT) != 0 {
		return fuse.EROFS
	}
	n, st := f.node(requestContext(cancel), in.NodeId)
	if !st.Ok() {
		return st
	}
	if n.e.Type != layer.TypeReg {
		return fuse.EINVAL
	}
	backing, err := f.opens.open(n.e.Ino, in.Unique, f.passFile(n.e), f.server)
	if err != nil {
		// Only a process taking over this connection would miss it.
		f.log.Warn("keeping the open table", "file", n.e.Name, "err", err)
	}
	if backing != 0 {
		opensPassthrough.Inc()
		openPassthrough.Inc()
		out.Fh = fhPassthrough
		out.BackingID = backing
		out.OpenFlags = fuse.FOPEN_PASSTHROUGH
		return fuse.OK
	}
	opensFUSE.Inc()
	openFUSE.Inc()
	out.Fh = fhCached
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

// passFile returns the function the open table asks for e's local file,
// or nil where files are not passed through.
func (f *fsys) passFile(e *layer.Entry) func() (*os.File, bool) {
	if f.passthrough == nil || f.noPassthrough.Load() {
		return nil
	}
	return func() (*os.File, bool) { return f.passthrough(e) }
}

// Release ends an open handle, of this process or of one it took over
// from.
func (f *fsys) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	if err := f.opens.release(in.NodeId, in.Unique, in.Fh == fhPassthrough, f.server); err != nil {
		f.log.Warn("release", "node", in.NodeId, "err", err)
	}
	if in.Fh == fhPassthrough {
		openPassthrough.Dec()
	} else {
		openFUSE.Dec()
	}
}

// Read serves a content read: spliced from the local file holding it
// where the layer has one, else copied into go-fuse's (pooled) request
// buffer, so a read allocates nothing.
func (f *fsys) Read(cancel <-chan struct{}, in *fuse.ReadIn, dest []byte) (fuse.ReadResult, fuse.Status) {
	ctx := requestContext(cancel)
	n, st := f.node(ctx, in.NodeId)
	if !st.Ok() {
		return nil, st
	}
	e, off := n.e, int64(in.Offset)
	if off < 0 {
		return nil, fuse.EINVAL
	}
	if off >= e.Size || len(dest) == 0 {
		return newReadResult(nil), fuse.OK
	}
	want := min(int64(len(dest)), e.Size-off)
	if f.onRead != nil {
		f.onRead(e, off, want)
	}
	start := time.Now()
	var res fuse.ReadResult
	var err error
	if f.files != nil {
		res, err = f.readFile(ctx, e, off, want)
	} else {
		err = readFull(ctx, f.layer, e, dest[:want], off)
		res = newReadResult(dest[:want])
	}
	elapsed := time.Since(start).Seconds()
	if err != nil {
		readLatencyError.Observe(elapsed)
		return nil, fuse.Status(f.readErrno(ctx, e, off, want, err))
	}
	readLatencyOK.Observe(elapsed)
	if !f.firstRead.Load() && f.firstRead.CompareAndSwap(false, true) {
		metrics.TimeToFirstRead.WithLabelValues(f.mountpoint).Set(time.Since(f.mounted).Seconds())
	}
	return res, fuse.OK
}

// readFile answers a read with the range of a local file holding it;
// go-fuse splices it into the kernel.
func (f *fsys) readFile(ctx context.Context, e *layer.Entry, off, want int64) (fuse.ReadResult, error) {
	file, fileOff, length, release, err := f.files.ReadFile(ctx, e, off, int(want))
	if err != nil {
		return nil, err
	}
	if int64(length) < want {
		release()
		return nil, errShortContent
	}
	return &fileResult{ReadResult: fuse.ReadResultFd(file.Fd(), fileOff, length), fd: file.Fd(), off: fileOff, size: length, release: release}, nil
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

// requestContext is the context of one FUSE request: done when the
// kernel interrupts it (the reader gave up).
func requestContext(cancel <-chan struct{}) context.Context {
	return cancelContext{Context: context.Background(), done: cancel}
}

type cancelContext struct {
	context.Context
	done <-chan struct{}
}

func (c cancelContext) Done() <-chan struct{} { return c.done }

func (c cancelContext) Err() error {
	select {
	case <-c.done:
		return context.Canceled
	default:
		return nil
	}
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
