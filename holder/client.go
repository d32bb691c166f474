package holder

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Client talks to a holder. Its methods are safe for concurrent use; each
// request waits for its answer.
type Client struct {
	mu   sync.Mutex
	path string
	c    *net.UnixConn // nil after a failed call, until the next redials
}

// dialTimeout bounds a connection and each request: the holder answers at
// once or not at all.
const dialTimeout = 5 * time.Second

// Dial connects to the holder listening at path.
func Dial(path string) (*Client, error) {
	c := &Client{path: path}
	if err := c.dial(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Client) dial() error {
	conn, err := net.DialTimeout("unixpacket", c.path, dialTimeout)
	if err != nil {
		return err
	}
	c.c = conn.(*net.UnixConn)
	return nil
}

// Listen listens at path for Serve, replacing a socket file left by a
// holder that is gone.
func Listen(path string) (*net.UnixListener, error) {
	if c, err := Dial(path); err == nil {
		c.Close()
		return nil, fmt.Errorf("a holder already serves %s", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	lis, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	// Whoever can talk to the holder can take any mount's connection
	// and serve its pods other bytes: only this user, whatever the
	// directory's mode.
	if err := os.Chmod(path, 0o600); err != nil {
		lis.Close()
		return nil, err
	}
	return lis, nil
}

// Close closes the client's connection; the holder keeps what it holds.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.c == nil {
		return nil
	}
	err := c.c.Close()
	c.c = nil
	return err
}

// Put has the holder keep f (a descriptor of its own: the caller may
// close f) under key, with meta, replacing what it held under key.
func (c *Client) Put(key string, meta []byte, f *os.File) error {
	_, err := c.call(request{Op: "put", Key: key, Meta: meta}, f)
	return err
}

// Drop has the holder let go of what it holds under key.
func (c *Client) Drop(key string) error {
	_, err := c.call(request{Op: "drop", Key: key}, nil)
	return err
}

// Stop has the holder let go of everything and exit.
func (c *Client) Stop() error {
	_, err := c.call(request{Op: "stop"}, nil)
	return err
}

// List returns what the holder holds, each with a descriptor of the
// caller's own.
func (c *Client) List() ([]Held, error) {
	return c.call(request{Op: "list"}, nil)
}

func (c *Client) call(req request, f *os.File) ([]Held, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	var oob []byte
	if f != nil {
		oob = unix.UnixRights(int(f.Fd()))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// A connection a call failed on is not used again: a reply it still
	// owes would answer the next call. The next call dials anew (a
	// holder that was restarted, say).
	// Every request is idempotent: one that failed on a connection made
	// earlier is sent once more on a new one.
	fresh := c.c == nil
	for {
		if c.c == nil {
			if err := c.dial(); err != nil {
				return nil, fmt.Errorf("holder %s: %w", req.Op, err)
			}
		}
		held, err := c.exchange(req, b, oob)
		if err == nil {
			return held, nil
		}
		c.c.Close()
		c.c = nil
		if fresh || req.Op == "stop" {
			return nil, err
		}
		fresh = true
	}
}

// exchange sends one request and reads its replies. Callers hold c.mu.
func (c *Client) exchange(req request, b, oob []byte) ([]Held, error) {
	_ = c.c.SetDeadline(time.Now().Add(dialTimeout))
	defer c.c.SetDeadline(time.Time{})
	if _, _, err := c.c.WriteMsgUnix(b, oob, nil); err != nil {
		return nil, fmt.Errorf("holder %s: %w", req.Op, err)
	}
	var held []Held
	buf, roob := make([]byte, maxMessage), make([]byte, unix.CmsgSpace(4))
	for {
		n, oobn, _, _, err := c.c.ReadMsgUnix(buf, roob)
		if err == nil && n == 0 {
			err = errors.New("connection closed")
		}
		if err != nil {
			closeAll(held)
			return nil, fmt.Errorf("holder %s: %w", req.Op, err)
		}
		rf, ferr := receivedFile(roob[:oobn])
		var r reply
		if err := json.Unmarshal(buf[:n], &r); err != nil || ferr != nil {
			closeFile(rf)
			closeAll(held)
			return nil, fmt.Errorf("holder %s: bad reply: %w", req.Op, errors.Join(err, ferr))
		}
		if r.Err != "" {
			closeFile(rf)
			closeAll(held)
			return nil, fmt.Errorf("holder %s: %s", req.Op, r.Err)
		}
		if !r.More {
			closeFile(rf)
			return held, nil
		}
		if rf == nil {
			closeAll(held)
			return nil, fmt.Errorf("holder %s: an entry without a descriptor", req.Op)
		}
		held = append(held, Held{Key: r.Key, Meta: r.Meta, File: rf})
	}
}

func closeAll(hs []Held) {
	for _, h := range hs {
		h.File.Close()
	}
}
