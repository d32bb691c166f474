package main

// The holder is a third weightsnapd process, the smallest: it only keeps
// a descriptor of every lazy mount's FUSE connection (package holder).
// While it runs, the FUSE manager can die (kill -9, a crash) or be
// replaced by a new binary, and its mounts wait for the next manager,
// which resumes them, instead of failing with ENOTCONN. weightsnapd starts
// it, in its own session, when none runs; it is never upgraded in place:
// its code is a few hundred lines that parse nothing from the outside.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/weightsnap/weightsnap/holder"
)

// holderCommand is the hidden subcommand running the holder.
const holderCommand = "holder"

func holderSocket(root string) string  { return filepath.Join(root, "holder.sock") }
func holderPIDFile(root string) string { return filepath.Join(root, "holder.pid") }

// runHolder is the holder process. It serves until told to stop (by
// weightsnapd shutdown) or sent SIGTERM; either way, letting go of the
// connections ends every mount still held.
func runHolder(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: weightsnapd holder ROOT")
	}
	if err := setupLogging("info"); err != nil {
		return err
	}
	slog.SetDefault(slog.Default().With("process", holderCommand))
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

// dialHolder connects to the holder of root, starting one if none runs.
func dialHolder(ctx context.Context, root string) (*holder.Client, error) {
	if c, err := holder.Dial(holderSocket(root)); err == nil {
		return c, nil
	}
	if _, err := spawnDetached(ctx, holderCommand, root); err != nil {
		return nil, fmt.Errorf("holder: %w", err)
	}
	return holder.Dial(holderSocket(root))
}
