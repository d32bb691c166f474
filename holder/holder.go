// Package holder keeps FUSE connections alive between the processes that
// serve them. A FUSE connection ends when the last descriptor of its
// /dev/fuse file closes, so while a small process holds one, the process
// serving it can die or be replaced, and the kernel keeps its requests
// waiting for the next server instead of failing them with ENOTCONN (see
// fs.Resume). The holder does nothing else: it reads no FUSE request, parses no
// image, talks to no registry, and so has no reason to crash or to be
// upgraded.
//
// The protocol is one message per request on a SOCK_SEQPACKET unix socket,
// JSON with the descriptor (if any) attached as SCM_RIGHTS.
package holder

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Held is a connection in the holder: its key (the mountpoint), what its
// server wrote about it, and a descriptor of it.
type Held struct {
	Key  string
	Meta []byte
	File *os.File
}

type request struct {
	Op   string `json:"op"` // put, drop, list, stop
	Key  string `json:"key,omitempty"`
	Meta []byte `json:"meta,omitempty"`
}

type reply struct {
	Err  string `json:"err,omitempty"`
	Key  string `json:"key,omitempty"`  // list: one entry
	Meta []byte `json:"meta,omitempty"` // list: one entry
	More bool   `json:"more,omitempty"` // list: an entry follows
}

// maxMessage bounds a message; metadata is a few hundred bytes.
const maxMessage = 64 << 10

// Server is the holder: it keeps the connections put in it until they are
// dropped or end (a connection that ends, by an unmount, is let go of by
// itself: see watch).
type Server struct {
	mu      sync.Mutex
	held    map[string]Held
	conns   map[*net.UnixConn]struct{} // the clients'; closed by Close
	changed chan struct{}              // wakes watch
	stop    chan struct{}
	once    sync.Once
}

// NewServer returns an empty holder.
func NewServer() *Server {
	return &Server{held: map[string]Held{}, conns: map[*net.UnixConn]struct{}{}, changed: make(chan struct{}, 1), stop: make(chan struct{})}
}

// Serve answers clients on lis until a stop request or Close.
func (s *Server) Serve(lis *net.UnixListener) error {
	go s.watch()
	go func() {
		<-s.stop
		lis.Close()
	}()
	for {
		c, err := lis.AcceptUnix()
		if err != nil {
			select {
			case <-s.stop:
				return nil
			default:
				return err
			}
		}
		go s.serveConn(c)
	}
}

// Stopped is closed once a client asked the holder to stop.
func (s *Server) Stopped() <-chan struct{} { return s.stop }

// Close lets go of every connection and stops serving.
func (s *Server) Close() {
	s.once.Do(func() { close(s.stop) })
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, h := range s.held {
		h.File.Close()
		delete(s.held, k)
	}
	for c := range s.conns {
		c.Close()
	}
}

func (s *Server) serveConn(c *net.UnixConn) {
	s.mu.Lock()
	select {
	case <-s.stop:
		s.mu.Unlock()
		c.Close()
		return
	default:
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	if err := sameUser(c); err != nil {
		slog.Warn("holder: refused a client", "err", err)
		return
	}
	buf, oob := make([]byte, maxMessage), make([]byte, unix.CmsgSpace(4))
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return
		}
		f, ferr := receivedFile(oob[:oobn])
		var req request
		if err := json.Unmarshal(buf[:n], &req); err != nil || ferr != nil {
			closeFile(f)
			_ = send(c, reply{Err: fmt.Sprint("bad request: ", errors.Join(err, ferr))}, nil)
			continue
		}
		if err := s.handle(c, req, f); err != nil {
			return
		}
	}
}

func (s *Server) handle(c *net.UnixConn, req request, f *os.File) error {
	switch req.Op {
	case "put":
		if f == nil || req.Key == "" {
			closeFile(f)
			return send(c, reply{Err: "put needs a key and a descriptor"}, nil)
		}
		s.put(Held{Key: req.Key, Meta: req.Meta, File: f})
	case "drop":
		closeFile(f)
		s.drop(req.Key)
	case "list":
		closeFile(f)
		hs := s.dupAll()
		defer closeAll(hs)
		for _, h := range hs {
			if err := send(c, reply{Key: h.Key, Meta: h.Meta, More: true}, h.File); err != nil {
				return err
			}
		}
	case "stop":
		closeFile(f)
		err := send(c, reply{}, nil)
		s.Close()
		return err
	default:
		closeFile(f)
		return send(c, reply{Err: "unknown op " + req.Op}, nil)
	}
	return send(c, reply{}, nil)
}

func (s *Server) put(h Held) {
	s.mu.Lock()
	if old, ok := s.held[h.Key]; ok {
		old.File.Close()
	}
	s.held[h.Key] = h
	s.mu.Unlock()
	s.wake()
}

func (s *Server) drop(key string) {
	s.mu.Lock()
	old, ok := s.held[key]
	if ok {
		old.File.Close()
		delete(s.held, key)
	}
	s.mu.Unlock()
	if ok {
		slog.Info("holder: dropped a connection", "key", key)
	}
	s.wake()
}

// dupAll returns what is held, each with a descriptor of its own (taken
// under the lock, so that none is closed meanwhile) for the caller to
// close.
func (s *Server) dupAll() []Held {
	s.mu.Lock()
	defer s.mu.Unlock()
	hs := make([]Held, 0, len(s.held))
	for _, h := range s.held {
		fd, err := unix.FcntlInt(h.File.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			slog.Error("holder: dup", "key", h.Key, "err", err)
			continue
		}
		hs = append(hs, Held{Key: h.Key, Meta: h.Meta, File: os.NewFile(uintptr(fd), "/dev/fuse")})
	}
	return hs
}

func (s *Server) wake() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// watch lets go of connections that have ended. poll with no events
// requested reports only POLLERR and POLLHUP, which /dev/fuse gives once
// its connection is gone (unmounted or aborted); a pending request, which
// would be POLLIN, does not wake it.
func (s *Server) watch() {
	r, w, err := os.Pipe()
	if err != nil {
		slog.Error("holder: no pipe, ended connections are kept until dropped", "err", err)
		return
	}
	defer r.Close()
	defer w.Close()
	go func() {
		for {
			select {
			case <-s.changed:
				_, _ = w.Write([]byte{0})
			case <-s.stop:
				_, _ = w.Write([]byte{0})
				return
			}
		}
	}()
	for {
		hs, hfds := s.listFds()
		fds := []unix.PollFd{{Fd: int32(r.Fd()), Events: unix.POLLIN}}
		for _, fd := range hfds {
			fds = append(fds, unix.PollFd{Fd: int32(fd)})
		}
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			slog.Error("holder: poll", "err", err)
			return
		}
		select {
		case <-s.stop:
			return
		default:
		}
		if fds[0].Revents != 0 {
			var b [64]byte
			_, _ = r.Read(b[:])
		}
		for i, h := range hs {
			if fds[i+1].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
				slog.Info("holder: connection ended", "key", h.Key)
				s.dropFile(h)
			}
		}
	}
}

// listFds is list with each descriptor's number, read under the lock
// that closing takes. A number polled after its file was closed (and
// maybe reused) can only wake the loop: dropFile checks the file itself.
func (s *Server) listFds() ([]Held, []uintptr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	hs := make([]Held, 0, len(s.held))
	fds := make([]uintptr, 0, len(s.held))
	for _, h := range s.held {
		hs = append(hs, h)
		fds = append(fds, h.File.Fd())
	}
	return hs, fds
}

// dropFile drops h if it is still the connection held under its key.
func (s *Server) dropFile(h Held) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.held[h.Key]; ok && cur.File == h.File {
		cur.File.Close()
		delete(s.held, h.Key)
	}
}

// sameUser checks that the peer of c runs as this process's user (root):
// the socket's mode says so too, but a descriptor of it could be passed
// on.
func sameUser(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer pid %d runs as uid %d", cred.Pid, cred.Uid)
	}
	return nil
}

func send(c *net.UnixConn, r reply, f *os.File) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	var oob []byte
	if f != nil {
		oob = unix.UnixRights(int(f.Fd()))
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

// receivedFile is the descriptor a message carried, if any.
func receivedFile(oob []byte) (*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	for i := range msgs {
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), "/dev/fuse"))
		}
	}
	if len(files) != 1 {
		for _, f := range files {
			f.Close()
		}
		return nil, fmt.Errorf("%d descriptors in one message", len(files))
	}
	return files[0], nil
}

func closeFile(f *os.File) {
	if f != nil {
		f.Close()
	}
}
