// Package fs serves one image layer as a read-only FUSE file system and
// stacks such mounts with overlayfs. A layer's tree and contents come from
// a layer.Layer; nothing here knows about formats, caches or containerd.
package fs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/layer"
	"github.com/weightsnap/weightsnap/metrics"
)

const (
	// cacheTimeout is how long the kernel may keep entries, attributes and
	// negative lookups: a layer never changes once mounted.
	cacheTimeout = time.Hour
	// maxRequest is the largest read the kernel sends, and its read-ahead:
	// 1 MiB less two pages, so that a spliced reply (header, payload and
	// the page go-fuse adds) fits the default pipe-max-size of 1 MiB.
	maxRequest = 1<<20 - 8<<10
	// bdiReadAheadKB is the read-ahead window of the mount's backing
	// device; with maxRequest it roughly doubles sequential throughput
	// (go-fuse dd of 1 GiB: 1.6–1.8 GB/s with the defaults, 2.3–2.5 GB/s
	// with both; either alone did not help).
	bdiReadAheadKB = "4096"
	// fuseSubtype makes the mount show as type "fuse.weightsnap".
	fuseSubtype = "weightsnap"
)

// Option configures Serve.
type Option func(*options)

type options struct {
	name        string
	debug       bool
	onRead      func(e *layer.Entry, off, n int64)
	passthrough func(e *layer.Entry) (*os.File, bool)
	openTable   string
}

// WithName sets the name shown as the FUSE file system's source (e.g.
// "weightsnap:<digest>"); it labels the mount's metrics and logs.
func WithName(name string) Option { return func(o *options) { o.name = name } }

// WithDebug logs every FUSE request.
func WithDebug(on bool) Option { return func(o *options) { o.debug = on } }

// WithOnRead has fn told of every content read (entry, offset, length)
// before it is served, so a read-ahead engine can prefetch. fn runs on the
// read path and must not block.
func WithOnRead(fn func(e *layer.Entry, off, n int64)) Option {
	return func(o *options) { o.onRead = fn }
}

// WithPassthrough has fn asked, at the open of a regular file, for a local
// file holding exactly its content. When it returns one, the kernel reads
// that file directly (FUSE passthrough, Linux ≥ 6.9) and this process sees
// no reads of the open file; the file's content must stay in place for as
// long as the mount lives. Where the kernel cannot pass through, files are
// served as without this option.
func WithPassthrough(fn func(e *layer.Entry) (*os.File, bool)) Option {
	return func(o *options) { o.passthrough = fn }
}

// WithOpenTable keeps the mount's open table (see openTable) in the file
// at path, so that a process taking the connection over (Resume) knows how
// the files it did not open are open. Without it, a mount cannot be
// resumed safely where files are passed through.
func WithOpenTable(path string) Option { return func(o *options) { o.openTable = path } }

// Mount is a layer served by Serve or Resume.
type Mount struct {
	server     *fuse.Server
	fs         *fsys
	conn       Conn
	mountpoint string
	// dev is the mount's st_dev, taken while it was reachable.
	dev uint64
	log *slog.Logger

	unmountMu sync.Mutex
	unmounted bool          // a call of Unmount succeeded
	done      chan struct{} // closed when the server has exited
}

// Serve mounts l read-only at mountpoint and serves it until Unmount. It
// mounts directly (it must run as root, no fusermount). ctx bounds the
// lookup of the layer's root; the layer itself is not closed by Unmount.
func Serve(ctx context.Context, l *layer.Opened, mountpoint string, opts ...Option) (*Mount, error) {
	f, opt, err := prepare(ctx, l, mountpoint, opts, false)
	if err != nil {
		return nil, err
	}
	dev, err := mountFUSE(mountpoint, opt.name)
	if err != nil {
		return nil, fmt.Errorf("mount layer %s at %s: %w", opt.name, mountpoint, err)
	}
	// The server owns dev from here on (it closes it on failure too).
	server, err := fuse.NewServer(f, fmt.Sprintf("/dev/fd/%d", dev), mountOptions(opt))
	if err != nil {
		_ = unmountOrDetach(mountpoint, unix.MNT_FORCE)
		return nil, fmt.Errorf("mount layer %s at %s: %w", opt.name, mountpoint, err)
	}
	// The Mount keeps a descriptor of its own, for a successor (Conn).
	conn, err := newConn(dev, server.KernelSettings())
	if err != nil {
		_ = unmountOrDetach(mountpoint, unix.MNT_FORCE)
		go server.Serve() // to end with the connection
		return nil, fmt.Errorf("mount layer %s: %w", opt.name, err)
	}
	m, err := start(f, server, conn, mountpoint)
	if err != nil {
		return nil, err
	}
	if err := stopPolls(mountpoint); err != nil {
		m.log.Warn("cannot turn FUSE poll off: opening the mount's files in this process may hang", "err", err)
	}
	return m, nil
}

// prepare checks l's root and builds the file system serving it. A
// resumed connection continues the open table kept in its file; a new
// one starts an empty table there, whatever a former mount at the same
// place left (its backing IDs mean nothing on this connection).
func prepare(ctx context.Context, l *layer.Opened, mountpoint string, opts []Option, resumed bool) (*fsys, options, error) {
	var opt options
	for _, o := range opts {
		o(&opt)
	}
	if opt.name == "" {
		opt.name = fuseSubtype
	}
	rootEntry, err := l.Lookup(ctx, "")
	if err != nil {
		return nil, opt, fmt.Errorf("mount layer %s: look up root: %w", opt.name, err)
	}
	if rootEntry.Type != layer.TypeDir {
		return nil, opt, fmt.Errorf("mount layer %s: root is not a directory", opt.name)
	}
	f := newFsys(l, rootEntry, opt)
	f.mountpoint = mountpoint
	if f.opens, err = openTableAt(opt.openTable, resumed); err != nil {
		return nil, opt, fmt.Errorf("mount layer %s: %w", opt.name, err)
	}
	f.mounted = time.Now()
	return f, opt, nil
}

// start serves f on server, once the connection is set up.
func start(f *fsys, server *fuse.Server, conn Conn, mountpoint string) (*Mount, error) {
	m := &Mount{server: server, fs: f, conn: conn, mountpoint: mountpoint, log: f.log, done: make(chan struct{})}
	go func() {
		server.Serve()
		close(m.done)
	}()
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		m.Unmount()
		return nil, fmt.Errorf("mount layer %s: stat %s: %w", f.name, mountpoint, err)
	}
	m.dev = st.Dev
	m.raiseReadAhead()
	if f.passthrough != nil && server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		f.log.Info("kernel has no FUSE passthrough; cached files are served through the daemon")
		f.noPassthrough.Store(true)
	}
	return m, nil
}

// mountOptions are go-fuse's settings for every mount. A process resuming
// a connection must use the same, since the kernel keeps what was agreed
// at its INIT.
func mountOptions(opt options) *fuse.MountOptions {
	return &fuse.MountOptions{
		MaxWrite:     maxRequest,
		MaxReadAhead: maxRequest,
		// The kernel's asynchronous reads (its read-ahead) are capped
		// by max_background; go-fuse's default of 12 starves a
		// sequential reader whose bytes come from the network.
		MaxBackground:        64,
		EnableSymlinkCaching: true,
		// READDIRPLUS would hand out node IDs with lookup counts from
		// a listing; plain READDIR and LOOKUP are enough for a tree
		// that never changes and whose entries the kernel caches.
		DisableReadDirPlus: true,
		Debug:              opt.debug,
	}
}

// raiseReadAhead widens the kernel read-ahead of the mount's backing
// device. It is an optimisation: without a writable sysfs it is skipped.
func (m *Mount) raiseReadAhead() {
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(m.dev), unix.Minor(m.dev))
	if err := os.WriteFile(p, []byte(bdiReadAheadKB), 0); err != nil {
		m.log.Debug("cannot raise read-ahead", "path", p, "err", err)
	}
}

// Invalidate has the kernel drop what it cached of the layer: the pages
// of every file and the names under every directory it has looked up.
// After a layer's content is found wrong, the next access of any of it
// comes to this process again (and gets the error the layer gives now).
func (m *Mount) Invalidate() {
	for _, n := range m.fs.known() {
		if n.parent != 0 {
			m.server.EntryNotify(n.parent, n.name)
		}
		m.server.InodeNotify(n.e.Ino, 0, 0) // 0 bytes from 0: the whole file
	}
}

// DropPassthroughPages has the kernel drop the pages it cached of every
// file it knows that is now passed through (WithPassthrough). Those pages
// were read through this process before the file's content was all in a
// local file; a passthrough open does not keep them, so the kernel would
// drop them at the next open of the file, a cost on that open of about
// 0.1 s per GiB cached. Called once the files can be passed through, it
// takes that cost off the reader's path and frees the memory at once.
func (m *Mount) DropPassthroughPages() {
	f := m.fs
	if f.passthrough == nil || f.noPassthrough.Load() {
		return
	}
	for _, n := range f.known() {
		if n.e.Type != layer.TypeReg {
			continue
		}
		if _, ok := f.passthrough(n.e); ok {
			m.server.InodeNotify(n.e.Ino, 0, 0)
		}
	}
}

// Mountpoint is the directory the layer is mounted at.
func (m *Mount) Mountpoint() string { return m.mountpoint }

// Unmount removes the layer from the tree; it does not wait for the
// server to exit (see Done). If the mount is busy, it is detached lazily
// (MNT_DETACH). Once a call has succeeded, later calls return nil; after a
// failure, the next call tries again.
func (m *Mount) Unmount() error {
	m.unmountMu.Lock()
	defer m.unmountMu.Unlock()
	if m.unmounted {
		return nil
	}
	if err := m.unmount(); err != nil {
		return err
	}
	m.unmounted = true
	m.fs.opens.remove()
	m.conn.Close()
	// The series would otherwise outlive the mount, one per mount ever
	// made.
	metrics.TimeToFirstRead.DeleteLabelValues(m.mountpoint)
	return nil
}

func (m *Mount) unmount() error {
	// Not go-fuse's Server.Unmount: after a successful umount it waits for
	// the connection to end, which a mount still holding this one (the
	// overlay of a running container) puts off for as long as it lives.
	// Done tells when the connection ended.
	err := unix.Unmount(m.mountpoint, 0)
	if errors.Is(err, unix.EBUSY) {
		m.log.Info("mount busy, detaching lazily", "mountpoint", m.mountpoint)
		err = unix.Unmount(m.mountpoint, unix.MNT_DETACH)
	}
	if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: unmounted already
		return fmt.Errorf("unmount %s: %w", m.mountpoint, err)
	}
	return nil
}

// Done is closed when the mount's server has exited: moments after
// Unmount, or, while something still holds the file system (an open file,
// an overlay over it), once the last holder has let go.
func (m *Mount) Done() <-chan struct{} { return m.done }

// CleanupMount removes a stale FUSE mount at mountpoint, such as one left
// by a daemon killed with SIGKILL ("transport endpoint is not
// connected"). It force-unmounts: for FUSE that first aborts the
// connection, which also frees any process stuck waiting on a server
// that will never answer. A mountpoint that is not mounted is not an
// error.
func CleanupMount(mountpoint string) error {
	return unmountOrDetach(mountpoint, unix.MNT_FORCE)
}

// unmountOrDetach unmounts path with flags, or detaches it lazily if it
// is busy. EINVAL (not a mount point) and ENOENT count as already
// unmounted.
func unmountOrDetach(path string, flags int) error {
	err := unix.Unmount(path, flags)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.EBUSY):
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("detach %s: %w", path, err)
		}
		return nil
	default:
		return fmt.Errorf("unmount %s: %w", path, err)
	}
}
