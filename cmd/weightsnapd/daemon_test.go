package main

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	ssproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestMain lets the test binary be the FUSE manager and the holder that
// serve spawns (os.Executable is the test binary here).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		run := map[string]func([]string) error{fuseManagerCommand: runFuseManager, holderCommand: runHolder}[os.Args[1]]
		if run != nil {
			if err := run(os.Args[2:]); err != nil {
				os.Stderr.WriteString(err.Error() + "\n")
				os.Exit(1)
			}
			os.Exit(0)
		}
	}
	os.Exit(m.Run())
}

// TestServe runs the daemon in-process: containerd's snapshots API works
// on the socket, the FUSE manager serves metrics; cancelling (as SIGTERM
// does) stops the daemon and leaves the manager serving, and
// `weightsnapd shutdown` stops the manager and the holder, removing their
// sockets.
func TestServe(t *testing.T) {
	dir, err := os.MkdirTemp("", "wsd") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	mlis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := mlis.Addr().String()
	mlis.Close()

	cfg := defaultConfig()
	cfg.Root = filepath.Join(dir, "root")
	cfg.Address = filepath.Join(dir, "ws.sock")
	cfg.MetricsAddress = metricsAddr
	cfg.Registry.ConfigPath = ""
	cfg.CRIKeychain = CRIKeychainConfig{Enable: true, Listen: filepath.Join(dir, "cri.sock"), ImageService: filepath.Join(dir, "containerd.sock")}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	var serveErr error
	go func() {
		serveErr = serve(ctx, cfg)
		close(done)
	}()
	t.Cleanup(func() {
		// If the test failed before stopping them, stop all three.
		cancel()
		<-done
		_ = runShutdown([]string{"--root", cfg.Root})
	})

	conn, err := grpc.NewClient("unix://"+cfg.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sn := ssproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "weightsnap")
	sctx := namespaces.WithNamespace(context.Background(), "test")
	for deadline := time.Now().Add(30 * time.Second); ; {
		_, err := sn.Prepare(sctx, "layer-1", "")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prepare over the socket: %v", err)
		}
		select {
		case <-done:
			t.Fatalf("serve returned early: %v", serveErr)
		case <-time.After(100 * time.Millisecond): // the daemon is starting; no readiness event to wait on
		}
	}
	if err := sn.Commit(sctx, "layer", "layer-1"); err != nil {
		t.Fatal(err)
	}
	info, err := sn.Stat(sctx, "layer")
	if err != nil || info.Kind != snapshots.KindCommitted {
		t.Fatalf("Stat = %+v, %v", info, err)
	}

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "go_goroutines") {
		t.Errorf("metrics endpoint answered %q", body)
	}
	if _, err := os.Stat(managerPIDFile(cfg.Root)); err != nil {
		t.Errorf("no FUSE manager: %v", err)
	}
	if _, err := os.Stat(cfg.CRIKeychain.Listen); err != nil {
		t.Errorf("no CRI image service: %v", err)
	}
	hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer hcancel()
	if pid, err := checkHealth(hctx, cfg.Root, cfg.Address); err != nil || pid <= 0 {
		t.Errorf("health of a running daemon: pid %d, %v", pid, err)
	}

	cancel()
	select {
	case <-done:
		if serveErr != nil {
			t.Errorf("serve after cancel: %v", serveErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not return after cancel")
	}
	for _, p := range []string{cfg.Address, cfg.CRIKeychain.Listen} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after the daemon stopped (%v)", p, err)
		}
	}
	if _, err := pingManager(hctx, cfg.Root); err != nil {
		t.Errorf("the FUSE manager does not answer after the daemon stopped: %v", err)
	}
	if err := runShutdown([]string{"--root", cfg.Root}); err != nil {
		t.Errorf("weightsnapd shutdown: %v", err)
	}
	for _, p := range []string{managerSocket(cfg.Root), managerPIDFile(cfg.Root), holderSocket(cfg.Root), holderPIDFile(cfg.Root)} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after weightsnapd shutdown (%v)", p, err)
		}
	}
	if _, err := checkHealth(hctx, cfg.Root, cfg.Address); err == nil ||
		!strings.Contains(err.Error(), "snapshots API") || !strings.Contains(err.Error(), "fuse manager") {
		t.Errorf("health of a stopped daemon: %v, want both processes named", err)
	}
}
