package holder

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func startHolder(t *testing.T) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "holder.sock")
	lis, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer()
	done := make(chan error, 1)
	go func() { done <- s.Serve(lis) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, sock
}

func dial(t *testing.T, sock string) *Client {
	t.Helper()
	c, err := Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestPutListDrop puts the write end of a pipe in the holder, closes the
// caller's own, and writes through the descriptor List hands back: the
// holder kept the same open file, not a copy.
func TestPutListDrop(t *testing.T) {
	_, sock := startHolder(t)
	c := dial(t, sock)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := c.Put("/mnt/a", []byte(`{"digest":"sha256:aa"}`), w); err != nil {
		t.Fatal(err)
	}
	w.Close()

	held, err := dial(t, sock).List()
	if err != nil {
		t.Fatal(err)
	}
	if len(held) != 1 || held[0].Key != "/mnt/a" || string(held[0].Meta) != `{"digest":"sha256:aa"}` {
		t.Fatalf("List = %+v", held)
	}
	if _, err := held[0].File.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	held[0].File.Close()
	b := make([]byte, 1)
	if _, err := r.Read(b); err != nil || b[0] != 'x' {
		t.Fatalf("read %q, %v", b, err)
	}

	if err := c.Drop("/mnt/a"); err != nil {
		t.Fatal(err)
	}
	if held, err := c.List(); err != nil || len(held) != 0 {
		t.Fatalf("after Drop: List = %+v, %v", held, err)
	}
	// The holder's descriptor is closed: the pipe has no writer left.
	if n, err := r.Read(b); n != 0 || err == nil {
		t.Fatalf("read after drop: %d, %v; want EOF", n, err)
	}
}

// TestEndedConnectionIsLetGo holds the write end of a pipe and closes its
// read end, which makes the held descriptor poll POLLERR, as a /dev/fuse
// descriptor does once its mount is gone: the holder lets go of it.
func TestEndedConnectionIsLetGo(t *testing.T) {
	_, sock := startHolder(t)
	c := dial(t, sock)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put("/mnt/gone", nil, w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	r.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		held, err := c.List()
		if err != nil {
			t.Fatal(err)
		}
		if len(held) == 0 {
			return
		}
		closeAll(held)
		if time.Now().After(deadline) {
			t.Fatal("the holder still holds a connection that ended")
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
}

func TestBadRequests(t *testing.T) {
	_, sock := startHolder(t)
	c := dial(t, sock)
	if err := c.Put("/mnt/a", nil, nil); err == nil || !strings.Contains(err.Error(), "descriptor") {
		t.Fatalf("put without a descriptor: %v", err)
	}
	if _, err := c.call(request{Op: "explode"}, nil); err == nil {
		t.Fatal("an unknown op was accepted")
	}
	if _, err := Listen(sock); err == nil {
		t.Fatal("a second holder listened on a live holder's socket")
	}
}

// TestStop: a stop request lets go of everything and ends Serve.
func TestStop(t *testing.T) {
	s, sock := startHolder(t)
	c := dial(t, sock)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := c.Put("/mnt/a", nil, w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	<-s.Stopped()
	b := make([]byte, 1)
	if n, err := r.Read(b); n != 0 || err == nil {
		t.Fatalf("read after stop: %d, %v; want EOF", n, err)
	}
}

// TestSocketIsPrivate: the socket that hands out every mount's
// connection is for its owner only.
func TestSocketIsPrivate(t *testing.T) {
	_, sock := startHolder(t)
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Fatalf("holder socket mode %o, want 600", perm)
	}
}

// TestClientRedials: a client whose holder was restarted (a new one on the
// same socket) reaches the new one on its next call.
func TestClientRedials(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "holder.sock")
	serve := func() (*Server, chan error) {
		lis, err := Listen(sock)
		if err != nil {
			t.Fatal(err)
		}
		s := NewServer()
		done := make(chan error, 1)
		go func() { done <- s.Serve(lis) }()
		return s, done
	}
	s1, done1 := serve()
	c := dial(t, sock)
	if _, err := c.List(); err != nil {
		t.Fatal(err)
	}
	s1.Close()
	<-done1
	s2, done2 := serve()
	t.Cleanup(func() { s2.Close(); <-done2 })
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := c.Put("/mnt/a", nil, w); err != nil {
		t.Fatalf("Put after the holder was restarted: %v", err)
	}
	if held, err := c.List(); err != nil || len(held) != 1 {
		t.Fatalf("List = %v, %v", held, err)
	} else {
		closeAll(held)
	}
}
