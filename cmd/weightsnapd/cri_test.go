package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// fakeImageService is an upstream CRI image service that records what it
// was asked.
type fakeImageService struct {
	runtimeapi.UnimplementedImageServiceServer

	mu      sync.Mutex
	got     []proto.Message
	keptNow func() int // how many credentials the proxy has kept
	seen    []int      // keptNow() at each PullImage
}

func (f *fakeImageService) record(m proto.Message) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, m)
}

func (f *fakeImageService) PullImage(_ context.Context, r *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	f.record(r)
	n := f.keptNow()
	f.mu.Lock()
	f.seen = append(f.seen, n)
	f.mu.Unlock()
	if r.GetImage().GetImage() == "registry.test/missing:v1" {
		return nil, status.Error(codes.NotFound, "no such image")
	}
	return &runtimeapi.PullImageResponse{ImageRef: "sha256:0123"}, nil
}

func (f *fakeImageService) ListImages(_ context.Context, r *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	f.record(r)
	return &runtimeapi.ListImagesResponse{Images: []*runtimeapi.Image{{Id: "sha256:0123", RepoTags: []string{"registry.test/models/llama:8b"}}}}, nil
}

func (f *fakeImageService) ImageStatus(_ context.Context, r *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	f.record(r)
	return &runtimeapi.ImageStatusResponse{Image: &runtimeapi.Image{Id: "sha256:0123", Size: 42}, Info: map[string]string{"k": "v"}}, nil
}

func (f *fakeImageService) RemoveImage(_ context.Context, r *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	f.record(r)
	return &runtimeapi.RemoveImageResponse{}, nil
}

func (f *fakeImageService) ImageFsInfo(_ context.Context, r *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	f.record(r)
	return &runtimeapi.ImageFsInfoResponse{ImageFilesystems: []*runtimeapi.FilesystemUsage{{Timestamp: 7}}}, nil
}

func (f *fakeImageService) StreamImages(r *runtimeapi.StreamImagesRequest, out grpc.ServerStreamingServer[runtimeapi.StreamImagesResponse]) error {
	f.record(r)
	for _, id := range []string{"sha256:a", "sha256:b"} {
		if err := out.Send(&runtimeapi.StreamImagesResponse{Images: []*runtimeapi.Image{{Id: id}}}); err != nil {
			return err
		}
	}
	return nil
}

type keptAuth struct {
	registry, repository string
	cfg                  authn.AuthConfig
}

// TestCRIProxy serves the proxy in front of a fake upstream, both on unix
// sockets: every call reaches the upstream unchanged with its answer
// returned, and a PullImage's auth is kept, before the pull is forwarded,
// for the image's registry host and repository.
func TestCRIProxy(t *testing.T) {
	dir, err := os.MkdirTemp("", "wscri") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	var (
		mu   sync.Mutex
		kept []keptAuth
	)
	fake := &fakeImageService{keptNow: func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(kept)
	}}
	upstream := filepath.Join(dir, "upstream.sock")
	lis, err := net.Listen("unix", upstream)
	if err != nil {
		t.Fatal(err)
	}
	us := grpc.NewServer()
	runtimeapi.RegisterImageServiceServer(us, fake)
	go us.Serve(lis)
	t.Cleanup(us.Stop)

	keep := func(_ context.Context, registry, repository string, cfg authn.AuthConfig) error {
		mu.Lock()
		defer mu.Unlock()
		kept = append(kept, keptAuth{registry, repository, cfg})
		return nil
	}
	listen := filepath.Join(dir, "cri.sock")
	stop, _, err := serveCRI(CRIKeychainConfig{Enable: true, Listen: listen, ImageService: "unix://" + upstream}, keep)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := runtimeapi.NewImageServiceClient(conn)
	ctx := t.Context()

	pull := &runtimeapi.PullImageRequest{
		Image:         &runtimeapi.ImageSpec{Image: "registry.test:5000/models/llama:8b", Annotations: map[string]string{"a": "b"}, RuntimeHandler: "runc"},
		Auth:          &runtimeapi.AuthConfig{Username: "alice", Password: "a-secret", ServerAddress: "registry.test:5000"},
		SandboxConfig: &runtimeapi.PodSandboxConfig{Metadata: &runtimeapi.PodSandboxMetadata{Name: "llm", Namespace: "team-a", Uid: "u1"}},
	}
	anonymous := &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: "nginx"}}
	tokened := &runtimeapi.PullImageRequest{
		Image: &runtimeapi.ImageSpec{Image: "docker.io/team/model@sha256:" + sixtyFourHex},
		Auth:  &runtimeapi.AuthConfig{IdentityToken: "id-token"},
	}
	for _, req := range []*runtimeapi.PullImageRequest{pull, anonymous, tokened} {
		resp, err := c.PullImage(ctx, req)
		if err != nil {
			t.Fatalf("PullImage %s: %v", req.GetImage().GetImage(), err)
		}
		if resp.GetImageRef() != "sha256:0123" {
			t.Errorf("PullImage answered %q, want the upstream's", resp.GetImageRef())
		}
	}
	// The upstream's error reaches the caller with its code.
	_, err = c.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: "registry.test/missing:v1"}})
	if status.Code(err) != codes.NotFound {
		t.Errorf("PullImage of a missing image: %v, want NotFound", err)
	}

	wantKept := []keptAuth{
		{"registry.test:5000", "models/llama", authn.AuthConfig{Username: "alice", Password: "a-secret"}},
		{"index.docker.io", "team/model", authn.AuthConfig{IdentityToken: "id-token"}},
	}
	mu.Lock()
	if len(kept) != len(wantKept) {
		t.Fatalf("kept %d credentials, want %d", len(kept), len(wantKept))
	}
	for i := range wantKept {
		if kept[i] != wantKept[i] {
			t.Errorf("kept[%d] = %+v, want %+v", i, kept[i], wantKept[i])
		}
	}
	mu.Unlock()
	// Credentials are kept before the pull is forwarded: containerd
	// mounts the lazy layers during the pull.
	fake.mu.Lock()
	seen := fake.seen
	fake.mu.Unlock()
	if want := []int{1, 1, 2, 2}; !slices.Equal(seen, want) {
		t.Errorf("credentials kept when each pull arrived upstream: %v, want %v", seen, want)
	}

	// The other calls, and their answers, pass unchanged.
	list := &runtimeapi.ListImagesRequest{Filter: &runtimeapi.ImageFilter{Image: &runtimeapi.ImageSpec{Image: "registry.test:5000/models/llama"}}}
	if r, err := c.ListImages(ctx, list); err != nil || len(r.GetImages()) != 1 || r.GetImages()[0].GetRepoTags()[0] != "registry.test/models/llama:8b" {
		t.Errorf("ListImages: %v, %v", r, err)
	}
	st := &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: "sha256:0123"}, Verbose: true}
	if r, err := c.ImageStatus(ctx, st); err != nil || r.GetImage().GetSize() != 42 || r.GetInfo()["k"] != "v" {
		t.Errorf("ImageStatus: %v, %v", r, err)
	}
	rm := &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: "sha256:0123"}}
	if _, err := c.RemoveImage(ctx, rm); err != nil {
		t.Errorf("RemoveImage: %v", err)
	}
	fsi := &runtimeapi.ImageFsInfoRequest{}
	if r, err := c.ImageFsInfo(ctx, fsi); err != nil || r.GetImageFilesystems()[0].GetTimestamp() != 7 {
		t.Errorf("ImageFsInfo: %v, %v", r, err)
	}
	sreq := &runtimeapi.StreamImagesRequest{Filter: &runtimeapi.ImageFilter{Image: &runtimeapi.ImageSpec{Image: "x"}}}
	stream, err := c.StreamImages(ctx, sreq)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for {
		m, err := stream.Recv()
		if err != nil {
			break
		}
		ids = append(ids, m.GetImages()[0].GetId())
	}
	if len(ids) != 2 || ids[0] != "sha256:a" || ids[1] != "sha256:b" {
		t.Errorf("StreamImages: %v", ids)
	}

	want := []proto.Message{pull, anonymous, tokened, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: "registry.test/missing:v1"}}, list, st, rm, fsi, sreq}
	fake.mu.Lock()
	got := fake.got
	fake.mu.Unlock()
	if len(got) != len(want) {
		t.Fatalf("upstream got %d calls, want %d", len(got), len(want))
	}
	for i := range want {
		if !proto.Equal(got[i], want[i]) {
			t.Errorf("upstream call %d = %v, want %v", i, got[i], want[i])
		}
	}

	stop()
	if _, err := os.Stat(listen); !os.IsNotExist(err) {
		t.Errorf("the CRI socket is left after stop: %v", err)
	}
}

const sixtyFourHex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// TestCRIProxyLogsFailedPull: a pull the upstream refuses is logged with
// the image and the upstream's error, so that the node's log says which
// image and registry refused and why, and never with the pull's
// credentials.
func TestCRIProxyLogsFailedPull(t *testing.T) {
	dir, err := os.MkdirTemp("", "wscri")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	var logged bytes.Buffer
	var logMu sync.Mutex
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewJSONHandler(lockedWriter{&logMu, &logged}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	t.Cleanup(func() { slog.SetDefault(old) })

	upstream := filepath.Join(dir, "upstream.sock")
	lis, err := net.Listen("unix", upstream)
	if err != nil {
		t.Fatal(err)
	}
	us := grpc.NewServer()
	runtimeapi.RegisterImageServiceServer(us, &fakeImageService{keptNow: func() int { return 0 }})
	go us.Serve(lis)
	t.Cleanup(us.Stop)
	listen := filepath.Join(dir, "cri.sock")
	keep := func(context.Context, string, string, authn.AuthConfig) error { return nil }
	stop, _, err := serveCRI(CRIKeychainConfig{Enable: true, Listen: listen, ImageService: "unix://" + upstream}, keep)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	conn, err := grpc.NewClient("unix://"+listen, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := runtimeapi.NewImageServiceClient(conn)

	const image = "registry.test/missing:v1"
	_, err = c.PullImage(t.Context(), &runtimeapi.PullImageRequest{
		Image: &runtimeapi.ImageSpec{Image: image},
		Auth:  &runtimeapi.AuthConfig{Username: "alice", Password: "a-secret"},
	})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("PullImage of a missing image: %v, want NotFound", err)
	}
	logMu.Lock()
	out := logged.String()
	logMu.Unlock()
	var found bool
	for line := range strings.SplitSeq(out, "\n") {
		if strings.Contains(line, `"msg":"pull failed"`) && strings.Contains(line, image) && strings.Contains(line, "no such image") {
			found = true
		}
	}
	if !found {
		t.Errorf("no log line says that the pull of %s failed and why:\n%s", image, out)
	}
	if strings.Contains(out, "a-secret") {
		t.Errorf("the log holds the pull's password:\n%s", out)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
