package main

import (
	"bytes"
	"fmt"
	"os"

	"github.com/pelletier/go-toml/v2"
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
	Registry RegistryConfig `toml:"registry"`
}

// CacheConfig configures the node cache.
type CacheConfig struct {
	// MaxBytes bounds the cache; least recently used data no open file
	// needs is evicted beyond it. 0 means unbounded.
	MaxBytes int64 `toml:"max_bytes"`
}

// RegistryConfig configures registry access.
type RegistryConfig struct {
	// ConfigPath is a containerd hosts directory (certs.d layout:
	// <config_path>/<host[:port]>/hosts.toml) giving mirrors and plain-HTTP
	// hosts. Point it at containerd's own config_path so both agree.
	ConfigPath string `toml:"config_path"`
	// PlainHTTP speaks plain HTTP to every registry not described in
	// ConfigPath (loopback and private addresses already are).
	PlainHTTP bool `toml:"plain_http"`
}

// defaultConfig is the configuration with no file and no flags.
func defaultConfig() Config {
	return Config{
		Root:     "/var/lib/weightsnap",
		Address:  "/run/weightsnap/weightsnap.sock",
		LogLevel: "info",
		Registry: RegistryConfig{ConfigPath: "/etc/containerd/certs.d"},
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
	if err := dec.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("parsing config %s: %w", path, err)
	}
	return cfg, nil
}
