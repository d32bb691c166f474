package main

// The holder is a third weightsnapd process, the smallest: it only keeps
// a descriptor of every lazy mount's FUSE connection (package holder).
// While it runs, the FUSE manager can die (kill -9, a crash) or be
// replaced by a new binary, and its mounts wait for the next manager,
// which resumes them, instead of failing with ENOTCONN. weightsnapd starts
// it, in its own session, when none runs; it is never upgraded in place:
// its code is a few hundred lines that read only small JSON requests from
// root on a private socket.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/weightsnap/weightsnap/holder"
	"golang.org/x/sys/unix"
)

// holderCommand is the hidden subcommand running the holder.
const holderCommand = "holder"

func holderSocket(root string) string  { return filepath.Join(root, "holder.sock") }
func holderPIDFile(root string) string { return filepath.Join(root, "holder.pid") }
func holderLogFile(root string) string { return filepath.Join(root, "holder.log") }

// runHolder is the holder process. It serves until told to stop (by
// weightsnapd shutdown) or sent SIGTERM; either way, letting go of the
// connections ends every mount still held.
func runHolder(args []string) error {
	leave := len(args) == 2 && args[0] == leaveCgroupFlag
	if leave {
		args = args[1:]
	}
	if len(args) != 1 {
		return errors.New("usage: weightsnapd holder [" + leaveCgroupFlag + "] ROOT")
	}
	// It outlives weightsnapd, and with it the reader of the stderr it was
	// given (in a container, the runtime's pipe): a write there would
	// kill it with SIGPIPE. It writes to a file of its own instead.
	signal.Ignore(syscall.SIGPIPE)
	if logf, err := os.OpenFile(holderLogFile(args[0]), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err == nil {
		_ = unix.Dup2(int(logf.Fd()), 1)
		_ = unix.Dup2(int(logf.Fd()), 2)
		logf.Close()
	}
	if err := setupLogging("info"); err != nil {
		return err
	}
	slog.SetDefault(slog.Default().With("process", holderCommand))
	if leave {
		if err := leaveCgroup(os.Getpid()); err != nil {
			slog.Warn("the holder stays in the container's cgroup: a restart of the container ends the lazy mounts", "err", err)
		}
	}
	signal.Ignore(syscall.SIGINT, syscall.SIGHUP)
	lis, err := holder.Listen(holderSocket(args[0]))
	if err != nil {
		return err
	}
	pidFile := holderPIDFile(args[0])
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		lis.Close()
		return fmt.Errorf("writing pid file: %w", err)
	}
	defer os.Remove(pidFile)
	s := holder.NewServer()
	term, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(lis) }()
	signalReady()
	slog.Info("holder ready", "socket", holderSocket(args[0]))
	select {
	case <-term.Done():
		slog.Info("holder stopping on SIGTERM: the mounts it holds end")
		s.Close()
		return <-errc
	case err := <-errc:
		s.Close()
		return err
	}
}

// dialHolder connects to the holder of root, starting one if none runs
// (leaving the container's cgroup if leave is set).
func dialHolder(ctx context.Context, root string, leave bool) (*holder.Client, error) {
	if c, err := holder.Dial(holderSocket(root)); err == nil {
		return c, nil
	}
	args := []string{holderCommand, root}
	if leave {
		args = []string{holderCommand, leaveCgroupFlag, root}
	}
	if _, err := spawnDetached(ctx, args...); err != nil {
		return nil, fmt.Errorf("holder: %w", err)
	}
	return holder.Dial(holderSocket(root))
}

// leaveCgroupFlag has the holder leave the cgroup it was started in.
const leaveCgroupFlag = "--leave-cgroup"

// leaveCgroup moves process pid to the root cgroup of every hierarchy
// the calling process is in, on a cgroup v1 node. A container runtime
// stops a container sharing the host's PID namespace by killing every
// process in the container's cgroup; in the DaemonSet, this keeps the
// holder (and so the lazy mounts) alive across a restart or replacement
// of weightsnapd's container. A container sees its own cgroup as the root
// of /sys/fs/cgroup, so each hierarchy is mounted again, whole, for the
// move (a v1 hierarchy mounted anew is the same tree). The root, not a
// cgroup of its own: a new cpuset cgroup would need its CPUs and memory
// nodes set first. On a cgroup v2 node a container has a cgroup namespace
// of its own, which it cannot leave: there, it fails, and the mounts end
// with the container.
func leaveCgroup(pid int) error {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) == 1 && strings.HasPrefix(lines[0], "0::") {
		return errors.New("cgroup v2: a container cannot leave its cgroup namespace")
	}
	dir, err := os.MkdirTemp("", "weightsnap-cgroup")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	var errs []error
	for _, l := range lines {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		fstype, data := "cgroup", f[1]
		switch {
		case f[1] == "": // the unified hierarchy of a hybrid node
			fstype, data = "cgroup2", ""
		case strings.HasPrefix(f[1], "name="):
			data = "none," + f[1]
		}
		if err := moveToRoot(dir, fstype, data, pid); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", l, err))
		}
	}
	return errors.Join(errs...)
}

// moveToRoot mounts the hierarchy (fstype, data) at dir and moves pid to
// its root cgroup.
func moveToRoot(dir, fstype, data string, pid int) error {
	if err := unix.Mount(fstype, dir, fstype, unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, data); err != nil {
		return err
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
}
