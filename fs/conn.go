package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/weightsnap/weightsnap/layer"
)

// A FUSE connection lives as long as some process holds its /dev/fuse
// descriptor, not as long as the process serving it. While a descriptor
// is held (by a successor, or by a holder process in between), requests
// wait in the kernel: a reader blocks instead of failing with ENOTCONN.
// Resume serves such a connection in a new process: it gives go-fuse the
// INIT the kernel sent at mount (go-fuse insists on reading one, and the
// kernel sends it only once), then has the kernel send again the requests
// the former process had read but not answered (FUSE_NOTIFY_RESEND, Linux
// ≥ 6.9). Node IDs and handles mean the same to every process serving a
// layer (see fsys), and the open table carries the rest.

// Conn is a mount's FUSE connection as a successor needs it: its
// /dev/fuse descriptor and the kernel's INIT request.
type Conn struct {
	File *os.File
	Init []byte
}

// Close closes the descriptor; the connection lives on in other holders.
func (c Conn) Close() error {
	if c.File == nil {
		return nil
	}
	return c.File.Close()
}

// Conn returns the mount's connection, with a descriptor of its own that
// the caller closes; handed to another process, it keeps the mount alive
// and servable after this process is gone.
func (m *Mount) Conn() (Conn, error) {
	f, err := dupFUSE(m.conn.File.Fd())
	return Conn{File: f, Init: m.conn.Init}, err
}

// dupFUSE returns a descriptor of its own of the connection fd.
func dupFUSE(fd uintptr) (*os.File, error) {
	dup, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicating the FUSE descriptor: %w", err)
	}
	return os.NewFile(uintptr(dup), "/dev/fuse"), nil
}

// mountFUSE opens /dev/fuse and mounts a FUSE file system at mountpoint
// served through it, read-only. default_permissions makes the kernel
// enforce the entries' modes and owners, as it would for a disk file
// system.
func mountFUSE(mountpoint, source string) (int, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=0,group_id=0,max_read=%d,allow_other,default_permissions", fd, unix.S_IFDIR, maxRequest)
	flags := uintptr(unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	if err := unix.Mount(source, mountpoint, "fuse."+fuseSubtype, flags, data); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// newConn keeps a descriptor of dev's connection and the INIT request the
// kernel sent on it (rebuilt from what go-fuse kept of it).
func newConn(dev int, init *fuse.InitIn) (Conn, error) {
	f, err := dupFUSE(uintptr(dev))
	return Conn{File: f, Init: initRequest(init)}, err
}

// pollHackName is the name go-fuse answers, in any file system it serves,
// with a file whose poll it refuses (ENOSYS).
const pollHackName = ".go-fuse-epoll-hack"

// stopPolls has the kernel learn, on a new connection, that this file
// system does not implement poll, so that it never asks again. Otherwise
// a file of the mount opened in this process (the Go runtime adds files
// to its epoll set) sends the kernel into epoll_ctl, holding the epoll
// lock, to ask this process for a POLL answer, which a server goroutine
// waiting for that same lock never gives: go-fuse does this itself for
// the mounts it makes, not for a descriptor it is handed.
func stopPolls(mountpoint string) error {
	fd, err := unix.Open(mountpoint+"/"+pollHackName, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	return err
}

// opInit is FUSE_INIT's opcode.
const opInit = 26

// initRequest is the bytes of an INIT request carrying in (which holds
// its header).
func initRequest(in *fuse.InitIn) []byte {
	r := *in
	r.Length = uint32(unsafe.Sizeof(r))
	r.Opcode = opInit
	r.Unique = 1
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(&r)), unsafe.Sizeof(r))...)
}

// ErrNoResend means the kernel could not be asked to send again the
// requests a former server had read: readers waiting on one of them wait
// until interrupted (Linux < 6.9).
var ErrNoResend = errors.New("the kernel cannot resend requests in flight (FUSE_NOTIFY_RESEND needs Linux 6.9)")

// Resume serves l on the live connection c, mounted at mountpoint by a
// process that is gone, with the options it used (the same name, and the
// same WithOpenTable file). Requests that waited meanwhile are answered
// now. Resume takes c.File; the caller keeps c.Init. An ErrNoResend
// error comes with a working Mount.
func Resume(ctx context.Context, l *layer.Opened, mountpoint string, c Conn, opts ...Option) (*Mount, error) {
	f, opt, err := prepare(ctx, l, mountpoint, opts, true)
	if err != nil {
		return nil, err
	}
	if len(c.Init) < int(unsafe.Sizeof(fuse.InHeader{})) || binary.LittleEndian.Uint32(c.Init[4:8]) != opInit {
		return nil, fmt.Errorf("resume layer %s: not an INIT request", opt.name)
	}
	server, slot, err := serverFromInit(f, c.Init, opt)
	if err != nil {
		return nil, fmt.Errorf("resume layer %s at %s: %w", opt.name, mountpoint, err)
	}
	// go-fuse serves the descriptor number it was given: put the
	// connection in its place.
	if err := unix.Dup3(int(c.File.Fd()), slot, unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("resume layer %s: %w", opt.name, err)
	}
	conn := Conn{File: c.File, Init: c.Init}
	m, err := start(f, server, conn, mountpoint)
	if err != nil {
		return nil, err
	}
	if err := resend(c.File); err != nil {
		return m, err
	}
	return m, nil
}

// serverFromInit has go-fuse read the INIT request init from a socket and
// answer it there, and returns the server and the socket's descriptor,
// which the caller replaces with the connection's.
func serverFromInit(f *fsys, init []byte, opt options) (*fuse.Server, int, error) {
	// SOCK_SEQPACKET keeps the request one message, as /dev/fuse does.
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, -1, err
	}
	defer unix.Close(sp[1])
	if _, err := unix.Write(sp[1], init); err != nil {
		unix.Close(sp[0])
		return nil, -1, err
	}
	server, err := fuse.NewServer(f, fmt.Sprintf("/dev/fd/%d", sp[0]), mountOptions(opt))
	if err != nil {
		unix.Close(sp[0])
		return nil, -1, err
	}
	return server, sp[0], nil
}

// notifyResend is FUSE_NOTIFY_RESEND's code.
const notifyResend = 7

// resend asks the kernel to queue again every request read from the
// connection and not answered.
func resend(dev *os.File) error {
	var h [16]byte // fuse_out_header: len, error = the notification's code, unique = 0
	binary.LittleEndian.PutUint32(h[0:4], uint32(len(h)))
	binary.LittleEndian.PutUint32(h[4:8], notifyResend)
	_, err := unix.Write(int(dev.Fd()), h[:])
	if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOSYS) {
		return ErrNoResend
	}
	return err
}
