package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/credentials"
	"github.com/weightsnap/weightsnap/internal/bytesize"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/prefetch"
)

// Config is weightsnapd's configuration file. deploy/weightsnapd.toml
// documents every key with its default; keep the two in step.
type Config struct {
	// Root holds the snapshotter's metadata, snapshot directories and the
	// node cache (<root>/cache).
	Root string `toml:"root"`
	// Address is the unix socket serving containerd's snapshots API.
	Address string `toml:"address"`
	// MetricsAddress is host:port of the Prometheus endpoint (/metrics);
	// empty disables it.
	MetricsAddress string `toml:"metrics_address"`
	// LogLevel is one of debug, info, warn, error.
	LogLevel string `toml:"log_level"`

	Cache    CacheConfig    `toml:"cache"`
	Fetch    FetchConfig    `toml:"fetch"`
	Registry RegistryConfig `toml:"registry"`
	Verify   VerifyConfig   `toml:"verify"`

	CRIKeychain         CRIKeychainConfig         `toml:"cri_keychain"`
	CredentialProviders CredentialProvidersConfig `toml:"credential_providers"`
	Holder              HolderConfig              `toml:"holder"`
}

// HolderConfig configures the holder process (see holder.go).
type HolderConfig struct {
	// LeaveCgroup moves the holder out of the cgroup weightsnapd runs in,
	// to the root of the node's (cgroup v1) hierarchies, so that a
	// restart of weightsnapd's container does not end the lazy mounts.
	// For the DaemonSet, with hostPID; not for systemd, which does not
	// kill it (KillMode=process).
	LeaveCgroup bool `toml:"leave_cgroup"`
}

// CredentialProvidersConfig names kubelet's credential provider plugins,
// which the FUSE manager runs as kubelet does to renew registry
// credentials on its own (see credentials.Plugins).
type CredentialProvidersConfig struct {
	// Config is kubelet's CredentialProviderConfig file
	// (--image-credential-provider-config); empty: no plugins.
	Config string `toml:"config"`
	// BinDir is the directory of the plugins
	// (--image-credential-provider-bin-dir).
	BinDir string `toml:"bin_dir"`
}

// plugins loads the configured plugins; nil when there are none.
func (c CredentialProvidersConfig) plugins() (*credentials.Plugins, error) {
	if c.Config == "" {
		return nil, nil
	}
	return credentials.LoadPlugins(c.Config, c.BinDir)
}

// CRIKeychainConfig sets up the CRI image service weightsnapd serves in
// front of containerd's, to keep the credentials kubelet passes with each
// PullImage for the lazy layers of that image's repository.
type CRIKeychainConfig struct {
	// Enable serves the CRI image service on Listen; kubelet's
	// imageServiceEndpoint must name it.
	Enable bool `toml:"enable"`
	// Listen is the unix socket of the CRI image service.
	Listen string `toml:"listen"`
	// ImageService is the unix socket of the CRI image service every call
	// is forwarded to, unchanged: containerd's.
	ImageService string `toml:"image_service"`
}

// VerifyConfig says what is served before it is verified.
type VerifyConfig struct {
	// UnverifiedLayers is what happens to a layer that nothing but its
	// blob digest covers (no chunk table, no eStargz TOC digest): "full"
	// leaves it to containerd, which downloads and verifies it whole;
	// "lazy" serves it before it verified (see deploy/README.md).
	UnverifiedLayers string `toml:"unverified_layers"`
	// MaxExpansion bounds what a streamed gzip or zstd layer decompresses
	// to, as a multiple of its blob's size; 0: 100.
	MaxExpansion int64 `toml:"max_expansion"`
	// MaxStreamBytes bounds it in bytes; 0: half the cache's capacity.
	MaxStreamBytes int64 `toml:"max_stream_bytes"`
}

// unverified is the lazy layer policy of UnverifiedLayers.
func (v VerifyConfig) unverified() (lazy.Unverified, error) {
	switch v.UnverifiedLayers {
	case "full":
		return lazy.UnverifiedRefuse, nil
	case "lazy":
		return lazy.UnverifiedLazy, nil
	}
	return 0, fmt.Errorf("verify.unverified_layers = %q: want \"full\" or \"lazy\"", v.UnverifiedLayers)
}

// defaultMemoryLimit keeps the FUSE manager's peak RSS under 256 MiB
// with the default workers (16 ranges in flight, each holding a buffer of
// at most 8 MiB, the cache's largest run, whatever the span).
const defaultMemoryLimit = 192 << 20

// FetchConfig tunes read-ahead and background fill.
type FetchConfig struct {
	// Workers is the number of range requests in flight node-wide for
	// read-ahead and background fill together.
	Workers int `toml:"workers"`
	// SpanBytes is the size of one range request.
	SpanBytes int64 `toml:"span_bytes"`
	// MaxReadAheadBytes bounds how far ahead of a sequential reader
	// requests go.
	MaxReadAheadBytes int64 `toml:"max_read_ahead_bytes"`
	// BackgroundFill fetches every mounted layer into the cache after it is
	// mounted, metadata files and safetensors headers first.
	BackgroundFill bool `toml:"background_fill"`
	// BackgroundWorkers bounds the range requests of background fill.
	BackgroundWorkers int `toml:"background_workers"`
	// BackgroundBytesPerSecond caps background fill; 0 is no cap.
	BackgroundBytesPerSecond int64 `toml:"background_bytes_per_second"`
	// MemoryLimitBytes is the FUSE manager's soft memory limit (Go's
	// runtime/debug.SetMemoryLimit); 0 is none. Every range in flight
	// holds a buffer of a span, and without a limit the garbage collector
	// lets the heap grow to twice what is live before it collects; a
	// GOMEMLIMIT in the manager's environment wins over it.
	MemoryLimitBytes int64 `toml:"memory_limit_bytes"`
}

// CacheConfig configures the node cache.
type CacheConfig struct {
	// MaxBytes bounds the cache; least recently used data no open file
	// needs is evicted beyond it. 0 means unbounded.
	MaxBytes DiskSize `toml:"max_bytes"`
	// MinFreeBytes is kept free on the cache's file system: below it,
	// least recently used data no open file needs is evicted, whoever
	// filled the disk. 0 keeps no floor.
	MinFreeBytes DiskSize `toml:"min_free_bytes"`
	// Passthrough lets the kernel read large files the cache holds whole
	// and verified straight from the cache (FUSE passthrough, Linux ≥ 6.9),
	// without a round trip through the daemon.
	Passthrough bool `toml:"passthrough"`
}

// DiskSize is an amount of the cache's file system: bytes, or a share of
// its size. In TOML, an integer of bytes, a size with a unit ("200GiB")
// or a percentage ("50%").
type DiskSize struct {
	Bytes int64   `json:",omitempty"`
	Share float64 `json:",omitempty"` // 0 < Share <= 1 when set
}

// UnmarshalTOML reads a DiskSize; see toml's unstable.Unmarshaler.
func (d *DiskSize) UnmarshalTOML(raw []byte) error {
	var v struct{ V any }
	if err := toml.Unmarshal(append([]byte("V = "), raw...), &v); err != nil {
		return err
	}
	switch x := v.V.(type) {
	case int64:
		if x < 0 {
			return fmt.Errorf("size %d: want a non-negative number of bytes", x)
		}
		*d = DiskSize{Bytes: x}
		return nil
	case string:
		if p, ok := strings.CutSuffix(strings.TrimSpace(x), "%"); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
			if err != nil || !(f >= 0 && f <= 100) {
				return fmt.Errorf("size %q: want a percentage from 0%% to 100%%", x)
			}
			*d = DiskSize{Share: f / 100}
			return nil
		}
		n, err := bytesize.Parse(x)
		if err != nil {
			return err
		}
		*d = DiskSize{Bytes: n}
		return nil
	}
	return fmt.Errorf("size %s: want bytes, a size such as \"200GiB\" or a percentage such as \"50%%\"", raw)
}

// maxOption is the cache option bounding it to d.
func (d DiskSize) maxOption() cache.Option {
	if d.Share > 0 {
		return cache.WithMaxShare(d.Share)
	}
	return cache.WithMaxBytes(d.Bytes)
}

// minFreeOption is the cache option keeping d free.
func (d DiskSize) minFreeOption() cache.Option {
	if d.Share > 0 {
		return cache.WithMinFreeShare(d.Share)
	}
	return cache.WithMinFree(d.Bytes)
}

// RegistryConfig configures registry access.
type RegistryConfig struct {
	// ConfigPath is a containerd hosts directory (certs.d layout:
	// <config_path>/<host[:port]>/hosts.toml) giving mirrors, plain-HTTP
	// hosts and TLS settings (ca, client, skip_verify). Point it at
	// containerd's own config_path so both agree.
	ConfigPath string `toml:"config_path"`
	// PlainHTTP allows plain HTTP (after trying HTTPS) to every registry.
	// Without it, only loopback registries and http:// hosts in ConfigPath
	// are spoken to over plain HTTP; private addresses get HTTPS.
	PlainHTTP bool `toml:"plain_http"`
	// ContainerdAddress is containerd's socket. At an image's first
	// Prepare the FUSE manager reads the image's manifest and config from
	// containerd's content store, where containerd's pull has just put
	// them, rather than from the registry again; both are checked against
	// their digests. Empty, or containerd not there: from the registry.
	ContainerdAddress string `toml:"containerd_address"`
}

// defaultConfig is the configuration with no file and no flags.
func defaultConfig() Config {
	return Config{
		Root:     "/var/lib/weightsnap",
		Address:  "/run/weightsnap/weightsnap.sock",
		LogLevel: "info",
		Registry: RegistryConfig{ConfigPath: "/etc/containerd/certs.d", ContainerdAddress: "/run/containerd/containerd.sock"},
		Cache: CacheConfig{
			// Half the disk leaves room for images, logs and pods.
			MaxBytes: DiskSize{Share: 0.5},
			// kubelet starts image GC at 85% used (imageGCHighThreshold-
			// Percent) and evicts pods under 15% free (imagefs.available):
			// the cache gives way first, down to the 80% used that
			// kubelet's GC aims at, whatever size the disk.
			MinFreeBytes: DiskSize{Share: 0.2},
			Passthrough:  true,
		},
		Verify: VerifyConfig{UnverifiedLayers: "full"},
		CRIKeychain: CRIKeychainConfig{
			Listen:       "/run/weightsnap/cri.sock",
			ImageService: "/run/containerd/containerd.sock",
		},
		Fetch: FetchConfig{
			Workers:           prefetch.DefaultWorkers,
			SpanBytes:         prefetch.DefaultSpanSize,
			MaxReadAheadBytes: prefetch.DefaultMaxWindow,
			BackgroundFill:    true,
			BackgroundWorkers: prefetch.DefaultBackgroundWorkers,
			MemoryLimitBytes:  defaultMemoryLimit,
		},
	}
}

// loadConfig reads path over the defaults; unknown keys are an error so
// that a typo does not silently keep a default.
func loadConfig(path string) (Config, error) {
	cfg := defaultConfig()
	if path == "" {
		return cfg, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("reading config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	dec.EnableUnmarshalerInterface() // DiskSize
	if err := dec.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("parsing config %s: %w", path, err)
	}
	if _, err := cfg.Verify.unverified(); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	if _, err := cfg.CredentialProviders.plugins(); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}
