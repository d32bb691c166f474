//go:build tools

package weightsnap

import (
	_ "github.com/containerd/containerd/v2/core/snapshots"
	_ "github.com/containerd/stargz-snapshotter/estargz"
	_ "github.com/containerd/stargz-snapshotter/snapshot"
	_ "github.com/google/go-containerregistry/pkg/registry"
	_ "github.com/google/go-containerregistry/pkg/v1/remote"
	_ "github.com/hanwen/go-fuse/v2/fs"
	_ "github.com/klauspost/compress/zstd"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "k8s.io/cri-api/pkg/apis/runtime/v1"
)
