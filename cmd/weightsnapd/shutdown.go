package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/holder"
	"golang.org/x/sys/unix"
)

// shutdownCommand stops weightsnap on a node for good (to remove it): the
// FUSE manager unmounts every lazy layer and exits, and the holder lets go
// of the connections and exits. Containers still using a lazy layer get
// ENOTCONN; drain the node first. weightsnapd itself stops on SIGTERM.
const shutdownCommand = "shutdown"

func runShutdown(args []string) error {
	fset := flag.NewFlagSet("weightsnapd shutdown", flag.ContinueOnError)
	def := defaultConfig()
	configPath := fset.String("config", "", "TOML configuration file (for its root)")
	root := fset.String("root", "", "state directory (default: the config's, else "+def.Root+")")
	if err := fset.Parse(args); err != nil {
		return err
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	if *root != "" {
		cfg.Root = *root
	}
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	var errs []error
	if c, err := dialManager(cfg.Root); err == nil {
		if err := c.shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stopping the fuse manager: %w", err))
		} else {
			fmt.Fprintln(os.Stderr, "fuse manager stopped: every lazy layer is unmounted")
		}
	}
	if hc, err := holder.Dial(holderSocket(cfg.Root)); err == nil {
		pid := readPID(holderPIDFile(cfg.Root))
		if err := hc.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("stopping the holder: %w", err))
		} else if err := waitGone(ctx, pid); err != nil {
			errs = append(errs, fmt.Errorf("stopping the holder: %w", err))
		} else {
			fmt.Fprintln(os.Stderr, "holder stopped")
		}
		hc.Close()
	}
	// What no process serves any more (a mount lost with a manager that
	// died before handing it over) is unmounted too.
	for _, mp := range staleMounts(cfg.Root) {
		if err := fs.CleanupMount(mp); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// staleMounts lists the weightsnap FUSE mounts under root, deepest first.
func staleMounts(root string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && g[0] == "fuse.weightsnap" && underRoot(f[4], root) {
			mps = append(mps, f[4])
		}
	}
	slices.Reverse(mps)
	return mps
}

// readPID reads a pid file; 0 if there is none.
func readPID(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// waitGone waits until process pid (0: none) has exited.
func waitGone(ctx context.Context, pid int) error {
	if pid <= 0 {
		return nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil // gone already
	}
	defer unix.Close(fd)
	for {
		ms := 1000
		if dl, ok := ctx.Deadline(); ok {
			ms = int(min(time.Until(dl).Milliseconds(), 1000))
		}
		if ms <= 0 {
			return fmt.Errorf("process %d still runs: %w", pid, context.DeadlineExceeded)
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, ms)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if n > 0 {
			return nil
		}
	}
}
