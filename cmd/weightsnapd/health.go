package main

// weightsnapd health is the DaemonSet's (and anyone's) probe: it exits 0
// only when both processes answer a real call. A socket file proves
// nothing: a killed weightsnapd or FUSE manager leaves its socket behind.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/rpc"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	healthCommand = "health"
	// healthKey is the snapshot key health asks for. No snapshot has it:
	// containerd's keys are namespaced ("k8s.io/12/…"), so NotFound is the
	// expected answer, given after a read of the metadata store.
	healthKey = "weightsnapd-health-probe"
)

// runHealth is `weightsnapd health [--config FILE] [--root DIR] [--address
// SOCK] [--timeout D]`: it reads the same config as the daemon, so the
// probe and the daemon agree on where the sockets are.
func runHealth(args []string) error {
	fset := flag.NewFlagSet("weightsnapd health", flag.ContinueOnError)
	def := defaultConfig()
	configPath := fset.String("config", "", "weightsnapd's TOML configuration file")
	root := fset.String("root", def.Root, "weightsnapd's state directory (where the FUSE manager's socket is)")
	address := fset.String("address", def.Address, "unix socket serving containerd's snapshots API")
	timeout := fset.Duration("timeout", 5*time.Second, "how long to wait for both answers")
	if err := fset.Parse(args); err != nil {
		return err
	}
	if fset.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fset.Args())
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	fset.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "root":
			cfg.Root = *root
		case "address":
			cfg.Address = *address
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	pid, err := checkHealth(ctx, cfg.Root, cfg.Address)
	if err != nil {
		return err
	}
	fmt.Printf("ok: snapshots API at %s, fuse manager (pid %d) at %s\n", cfg.Address, pid, managerSocket(cfg.Root))
	return nil
}

// checkHealth asks both processes, one after the other, and reports every
// one that did not answer. pid is the manager's (0 if it did not say).
func checkHealth(ctx context.Context, root, address string) (pid int, err error) {
	var errs []error
	if err := statSnapshot(ctx, address); err != nil {
		errs = append(errs, fmt.Errorf("snapshots API at %s does not answer: %w", address, err))
	}
	pid, err = pingManager(ctx, root)
	if err != nil {
		errs = append(errs, fmt.Errorf("fuse manager at %s does not answer: %w", managerSocket(root), err))
	}
	return pid, errors.Join(errs...)
}

// statSnapshot makes a snapshots Stat call, as containerd does, on the
// socket at address. NotFound is an answer.
func statSnapshot(ctx context.Context, address string) error {
	conn, err := grpc.NewClient("unix:"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = snapshotsapi.NewSnapshotsClient(conn).Stat(ctx, &snapshotsapi.StatSnapshotRequest{Snapshotter: "weightsnap", Key: healthKey})
	if err = errgrpc.ToNative(err); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

// pingManager calls Mounts.Ping on the manager's socket. A manager too old
// to know Ping answers with an error naming the method: that is an answer
// too.
func pingManager(ctx context.Context, root string) (pid int, err error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", managerSocket(root))
	if err != nil {
		return 0, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	c := rpc.NewClient(conn)
	defer c.Close()
	var r PingReply
	call := c.Go(rpcService+".Ping", struct{}{}, &r, nil)
	select {
	case <-call.Done:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	var serr rpc.ServerError
	if errors.As(call.Error, &serr) {
		return 0, nil
	}
	return r.PID, call.Error
}
