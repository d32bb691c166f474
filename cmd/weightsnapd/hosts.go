package main

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net/http"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"

	"github.com/weightsnap/weightsnap/remote"
)

// hostsMirrors returns the endpoints of a registry as containerd's hosts
// directory configPath describes them (mirrors in file order, the server
// last), read with containerd's own parser so both agree, TLS included. A
// registry with no hosts.toml gets nil: the origin alone, with remote's
// defaults. The files are read on each call, so edits apply without a
// restart, as in containerd.
func hostsMirrors(ctx context.Context, configPath string) func(registry string) []remote.Endpoint {
	if configPath == "" {
		return nil
	}
	hostDir := config.HostDirFromRoot(configPath)
	return func(registry string) []remote.Endpoint {
		if dir, err := hostDir(registry); err != nil || dir == "" {
			return nil
		}
		eps, err := hostEndpoints(ctx, hostDir, registry)
		if err != nil {
			slog.Warn("reading registry hosts", "registry", registry, "config_path", configPath, "err", err)
			return nil
		}
		return eps
	}
}

// hostEndpoints reads the pull endpoints of registry with containerd's
// ConfigureHosts. containerd builds each host's TLS configuration ("ca",
// "client", "skip_verify") into that host's http.Client; UpdateClient sees
// each client before containerd may wrap its transport in an HTTPS-to-HTTP
// fallback, so the configuration is taken there.
func hostEndpoints(ctx context.Context, hostDir func(string) (string, error), registry string) ([]remote.Endpoint, error) {
	tlsOf := map[*http.Client]*tls.Config{}
	hosts := config.ConfigureHosts(ctx, config.HostOptions{
		HostDir: hostDir,
		UpdateClient: func(c *http.Client) error {
			if tr, ok := c.Transport.(*http.Transport); ok {
				tlsOf[c] = tr.TLSClientConfig
			}
			return nil
		},
	})
	rhs, err := hosts(registry)
	if err != nil {
		return nil, err
	}
	var eps []remote.Endpoint
	for _, h := range rhs {
		if h.Capabilities&docker.HostCapabilityPull == 0 {
			continue
		}
		ep := remote.Endpoint{Host: h.Host, Scheme: h.Scheme, TLS: configured(tlsOf[h.Client])}
		if _, direct := h.Client.Transport.(*http.Transport); !direct && h.Scheme == "https" {
			// An http:// host with TLS settings: containerd tries HTTPS
			// first and falls back to plain HTTP, as remote's "http" does.
			ep.Scheme = "http"
		}
		if h.Path != "" && h.Path != "/v2" {
			ep.Path = h.Path
		}
		eps = append(eps, ep)
	}
	return eps, nil
}

// configured is cfg if hosts.toml set anything in it, else nil: the
// Client's default.
func configured(cfg *tls.Config) *tls.Config {
	if cfg == nil || (cfg.RootCAs == nil && len(cfg.Certificates) == 0 && !cfg.InsecureSkipVerify) {
		return nil
	}
	return cfg
}
