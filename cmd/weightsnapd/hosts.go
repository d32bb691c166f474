package main

import (
	"context"
	"log/slog"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"

	"github.com/weightsnap/weightsnap/remote"
)

// hostsMirrors returns the endpoints of a registry as containerd's hosts
// directory configPath describes them (mirrors in file order, the server
// last), read with containerd's own parser so both agree. A registry with
// no hosts.toml gets nil: the origin alone, with remote's defaults. The
// files are read on each call, so edits apply without a restart, as in
// containerd.
func hostsMirrors(ctx context.Context, configPath string) func(registry string) []remote.Endpoint {
	if configPath == "" {
		return nil
	}
	hostDir := config.HostDirFromRoot(configPath)
	hosts := config.ConfigureHosts(ctx, config.HostOptions{HostDir: hostDir})
	return func(registry string) []remote.Endpoint {
		if dir, err := hostDir(registry); err != nil || dir == "" {
			return nil
		}
		rhs, err := hosts(registry)
		if err != nil {
			slog.Warn("reading registry hosts", "registry", registry, "config_path", configPath, "err", err)
			return nil
		}
		var eps []remote.Endpoint
		for _, h := range rhs {
			if h.Capabilities&docker.HostCapabilityPull == 0 {
				continue
			}
			ep := remote.Endpoint{Host: h.Host, Scheme: h.Scheme}
			if h.Path != "" && h.Path != "/v2" {
				ep.Path = h.Path
			}
			eps = append(eps, ep)
		}
		return eps
	}
}
