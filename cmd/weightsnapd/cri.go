package main

// The CRI image service weightsnapd can serve in front of containerd's
// ([cri_keychain]). kubelet's registry credentials (image pull secrets,
// credential provider plugins) reach the node only as the auth of each
// PullImage: the proxy keeps that auth for the image's registry host and
// repository, in the FUSE manager's keychain, before forwarding the call,
// so that the image's lazy layers, mounted during containerd's pull, are
// read with it. Every call is forwarded unchanged. No credential is
// logged or written anywhere.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/weightsnap/weightsnap/credentials"
)

// criMaxMsgSize is kubelet's own limit of CRI messages: a node with many
// images lists more than gRPC's default 4 MiB.
const criMaxMsgSize = 16 << 20

// keepFunc keeps cfg for a repository on a registry host.
type keepFunc func(ctx context.Context, registry, repository string, cfg authn.AuthConfig) error

// criProxy is the CRI image service forwarding to upstream.
type criProxy struct {
	runtimeapi.UnimplementedImageServiceServer
	upstream runtimeapi.ImageServiceClient
	keep     keepFunc
}

var _ runtimeapi.ImageServiceServer = (*criProxy)(nil)

// PullImage keeps the request's auth, if any, then forwards it. A failure
// to keep it does not fail the pull: its lazy layers are then read with
// the docker config.json's credentials, or fall back to containerd.
func (p *criProxy) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	image := req.GetImage().GetImage()
	if a := req.GetAuth(); a != nil {
		if err := p.keepAuth(ctx, image, a); err != nil {
			// err names the image, never the credentials.
			slog.WarnContext(ctx, "keeping the credentials of a pull", "image", image, "err", err)
		}
	}
	resp, err := p.upstream.PullImage(ctx, req)
	if err != nil {
		// The node's log says which image and registry refused and why
		// (containerd's error: 401, 403, not found), as kubelet's pod
		// status does; containerd's errors carry no credentials.
		slog.WarnContext(ctx, "pull failed", "image", image, "with_credentials", req.GetAuth() != nil, "err", err)
	}
	return resp, err
}

func (p *criProxy) keepAuth(ctx context.Context, image string, a *runtimeapi.AuthConfig) error {
	cfg := authn.AuthConfig{
		Username:      a.GetUsername(),
		Password:      a.GetPassword(),
		Auth:          a.GetAuth(),
		IdentityToken: a.GetIdentityToken(),
		RegistryToken: a.GetRegistryToken(),
	}
	if cfg == (authn.AuthConfig{}) {
		return nil
	}
	registry, repository, err := credentials.Repository(image)
	if err != nil {
		return fmt.Errorf("image reference: %w", err)
	}
	if err := p.keep(ctx, registry, repository, cfg); err != nil {
		return err
	}
	slog.DebugContext(ctx, "kept pull credentials", "registry", registry, "repository", repository)
	return nil
}

// ListImages forwards the call.
func (p *criProxy) ListImages(ctx context.Context, req *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	return p.upstream.ListImages(ctx, req)
}

// StreamImages forwards the call and its stream.
func (p *criProxy) StreamImages(req *runtimeapi.StreamImagesRequest, out grpc.ServerStreamingServer[runtimeapi.StreamImagesResponse]) error {
	in, err := p.upstream.StreamImages(out.Context(), req)
	if err != nil {
		return err
	}
	for {
		m, err := in.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := out.Send(m); err != nil {
			return err
		}
	}
}

// ImageStatus forwards the call.
func (p *criProxy) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	return p.upstream.ImageStatus(ctx, req)
}

// RemoveImage forwards the call.
func (p *criProxy) RemoveImage(ctx context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	return p.upstream.RemoveImage(ctx, req)
}

// ImageFsInfo forwards the call.
func (p *criProxy) ImageFsInfo(ctx context.Context, req *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	return p.upstream.ImageFsInfo(ctx, req)
}

// serveCRI serves the CRI image service of cfg, forwarding to its
// upstream and keeping credentials with keep. stop ends it and removes
// its socket; errc reports the server's end.
func serveCRI(cfg CRIKeychainConfig, keep keepFunc) (stop func(), errc <-chan error, err error) {
	upstream := "unix://" + strings.TrimPrefix(cfg.ImageService, "unix://")
	conn, err := grpc.NewClient(upstream,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(criMaxMsgSize), grpc.MaxCallSendMsgSize(criMaxMsgSize)))
	if err != nil {
		return nil, nil, fmt.Errorf("cri_keychain.image_service %s: %w", cfg.ImageService, err)
	}
	listen := strings.TrimPrefix(cfg.Listen, "unix://")
	lis, err := listenUnix(listen)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(criMaxMsgSize), grpc.MaxSendMsgSize(criMaxMsgSize))
	runtimeapi.RegisterImageServiceServer(srv, &criProxy{upstream: runtimeapi.NewImageServiceClient(conn), keep: keep})
	ec := make(chan error, 1)
	go func() { ec <- srv.Serve(lis) }()
	return func() {
		stopGRPC(srv)
		conn.Close()
		_ = os.Remove(listen)
	}, ec, nil
}
