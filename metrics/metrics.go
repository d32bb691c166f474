// Package metrics holds weightsnap's Prometheus collectors. Every package
// records into these; the daemon and `weightsnap mount` serve them.
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const ns = "weightsnap"

var (
	// RegistryBytes counts blob bytes received from registries, by why
	// they were fetched: "ondemand", "readahead", "background", "stream".
	RegistryBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Name: "registry_bytes_total",
		Help: "Blob bytes received from registries.",
	}, []string{"reason"})

	// RegistryRequests counts HTTP requests to registries by outcome:
	// "ok", "retry" (a transient failure that was retried), "error".
	RegistryRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Name: "registry_requests_total",
		Help: "HTTP requests to registries by outcome.",
	}, []string{"outcome"})

	// CacheBytes counts bytes served to readers, by "hit" or "miss".
	CacheBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Name: "cache_bytes_total",
		Help: "Bytes served from the node cache (hit) or fetched for a reader (miss).",
	}, []string{"result"})

	// CacheEvictedBytes counts bytes removed by the size bound.
	CacheEvictedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "cache_evicted_bytes_total",
		Help: "Bytes evicted from the node cache to respect its size bound.",
	})

	// ReadLatency is the latency of FUSE reads, split by whether they
	// waited for the registry.
	ReadLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: ns, Name: "read_latency_seconds",
		Help:    "Latency of file reads served by weightsnap.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
	}, []string{"result"})

	// FileOpens counts opens of files, by how their reads are served:
	// "passthrough" (the kernel reads the cache file itself) or "fuse".
	FileOpens = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Name: "file_opens_total",
		Help: "File opens, by how reads are served (passthrough or fuse).",
	}, []string{"mode"})

	// OpenFiles is the number of files open, by mode as in FileOpens. A
	// close reaches the daemon asynchronously, shortly after the caller's.
	OpenFiles = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "open_files",
		Help: "Files open, by how reads are served (passthrough or fuse).",
	}, []string{"mode"})

	// LayerFetchedBytes and LayerSizeBytes give the background-fetch
	// progress of each layer, by layer digest.
	LayerFetchedBytes = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "layer_fetched_bytes",
		Help: "Bytes of a layer present in the cache.",
	}, []string{"layer"})
	LayerSizeBytes = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "layer_size_bytes",
		Help: "Size of a layer's content.",
	}, []string{"layer"})

	// LayerVerified is 1 once a mounted layer is in the cache whole and
	// verified against its digest: its large files are then passed
	// through.
	LayerVerified = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "layer_verified",
		Help: "1 once a layer is cached whole and verified against its digest.",
	}, []string{"layer"})

	// LayersOpened counts the layers opened lazily, by how their bytes are
	// checked before they are served: "chunks" (a chunk table), "toc"
	// (eStargz chunk digests), "blob-fetched" (fetched whole and verified
	// first) or "blob-lazy" (served before the blob digest is known, by the
	// operator's choice: unverified_layers = "lazy").
	LayersOpened = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Name: "layers_opened_total",
		Help: "Layers opened lazily, by how their bytes are verified.",
	}, []string{"verification"})
	// UnverifiedLayerMismatches counts layers served before they verified
	// whose blob then did not match its digest: each read of them fails
	// from then on.
	UnverifiedLayerMismatches = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "unverified_layer_mismatches_total",
		Help: "Layers served unverified whose blob did not match its digest.",
	})
	// TarHeaderMismatches counts layers indexed from their tar header
	// annotation whose blob then did not hold those headers: each read of
	// them fails from then on.
	TarHeaderMismatches = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "tar_header_mismatches_total",
		Help: "Layers whose tar header annotation did not match their blob.",
	})

	// HolderErrors counts mounts whose connection the holder could not
	// take or let go of: such a mount does not survive its server.
	HolderErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Name: "holder_errors_total",
		Help: "Mounts whose FUSE connection could not be handed to, or dropped from, the holder.",
	})

	// MountsResumed counts mounts served again after a restart of the
	// process serving them, by result (ok, error).
	MountsResumed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Name: "mounts_resumed_total",
		Help: "Mounts taken over from a former FUSE manager, by result.",
	}, []string{"result"})

	// TimeToFirstRead is the time from mount to the first file read, per
	// mountpoint; the series goes with the mount.
	TimeToFirstRead = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Name: "time_to_first_read_seconds",
		Help: "Seconds from mount to the first file content read.",
	}, []string{"mount"})
)

// Registry is the registry every weightsnap collector is registered in.
var Registry = prometheus.NewRegistry()

func init() {
	Registry.MustRegister(RegistryBytes, RegistryRequests, CacheBytes, CacheEvictedBytes,
		ReadLatency, FileOpens, OpenFiles, LayerFetchedBytes, LayerSizeBytes, LayerVerified, TimeToFirstRead,
		LayersOpened, UnverifiedLayerMismatches, TarHeaderMismatches, HolderErrors, MountsResumed,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
}

// Handler serves the collectors in the Prometheus text format.
func Handler() http.Handler {
	return promhttp.HandlerFor(Registry, promhttp.HandlerOpts{})
}
