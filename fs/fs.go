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
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
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

// Mount is a layer served by Serve.
type Mount struct {
	server     *fuse.Server
	root       *node
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
	var opt options
	for _, o := range opts {
		o(&opt)
	}
	if opt.name == "" {
		opt.name = fuseSubtype
	}
	rootEntry, err := l.Lookup(ctx, "")
	if err != nil {
		return nil, fmt.Errorf("mount layer %s: look up root: %w", opt.name, err)
	}
	if rootEntry.Type != layer.TypeDir {
		return nil, fmt.Errorf("mount layer %s: root is not a directory", opt.name)
	}
	log := slog.Default().With("layer", opt.name)
	state := &fsys{layer: l.Layer, files: l.Files, name: opt.name, mountpoint: mountpoint, onRead: opt.onRead, passthrough: opt.passthrough, log: log}
	root := &node{fs: state, e: rootEntry}

	timeout := cacheTimeout
	options := &gofs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther: true,
			// default_permissions makes the kernel enforce the entries'
			// modes and owners, as it would for a disk file system.
			Options:           []string{"default_permissions"},
			DirectMountStrict: true,
			DirectMountFlags:  syscall.MS_RDONLY | syscall.MS_NOSUID | syscall.MS_NODEV,
			FsName:            opt.name,
			Name:              fuseSubtype,
			MaxWrite:          maxRequest,
			MaxReadAhead:      maxRequest,
			// The kernel's asynchronous reads (its read-ahead) are capped
			// by max_background; go-fuse's default of 12 starves a
			// sequential reader whose bytes come from the network.
			MaxBackground:        64,
			EnableSymlinkCaching: true,
			// Splice moves reads answered from a file (the node
			// cache) into the kernel without a copy in this process;
			// reads answered from memory gain nothing from its pipes.
			DisableSplice: state.files == nil,
			Debug:         opt.debug,
		},
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		// Permissions come verbatim from the layer; go-fuse must not
		// replace a 0000 mode with a default.
		NullPermissions: true,
		RootStableAttr:  &gofs.StableAttr{Ino: rootEntry.Ino},
	}

	state.mounted = time.Now()
	server, err := gofs.Mount(mountpoint, root, options)
	if err != nil {
		return nil, fmt.Errorf("mount layer %s at %s: %w", opt.name, mountpoint, err)
	}
	m := &Mount{server: server, root: root, mountpoint: mountpoint, log: log, done: make(chan struct{})}
	go func() {
		server.Wait()
		close(m.done)
	}()

	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		m.Unmount()
		return nil, fmt.Errorf("mount layer %s: stat %s: %w", opt.name, mountpoint, err)
	}
	m.dev = st.Dev
	m.raiseReadAhead()
	if state.passthrough != nil && server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		log.Info("kernel has no FUSE passthrough; cached files are served through the daemon")
		state.noPassthrough.Store(true)
	}
	return m, nil
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
	invalidate(&m.root.Inode)
}

func invalidate(n *gofs.Inode) {
	for name, child := range n.Children() {
		invalidate(child)
		n.NotifyEntry(name)
	}
	n.NotifyContent(0, 0) // 0 bytes from 0: the whole file
}

// DropPassthroughPages has the kernel drop the pages it cached of every
// file it knows that is now passed through (WithPassthrough). Those pages
// were read through this process before the file's content was all in a
// local file; a passthrough open does not keep them, so the kernel would
// drop them at the next open of the file, a cost on that open of about
// 0.1 s per GiB cached. Called once the files can be passed through, it
// takes that cost off the reader's path and frees the memory at once.
func (m *Mount) DropPassthroughPages() {
	if m.root.fs.passthrough == nil || m.root.fs.noPassthrough.Load() {
		return
	}
	dropPassthroughPages(&m.root.Inode)
}

func dropPassthroughPages(in *gofs.Inode) {
	for _, child := range in.Children() {
		dropPassthroughPages(child)
	}
	n, ok := in.Operations().(*node)
	if !ok || n.e.Type != layer.TypeReg {
		return
	}
	if _, ok := n.fs.passthrough(n.e); ok {
		in.NotifyContent(0, 0) // 0 bytes from 0: the whole file
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
