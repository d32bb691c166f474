# weightsnap — see README.md.
GO            ?= go
CONTAINERD    ?= v2.4.2
KUBELET       ?= v1.36.3
BIN           := $(CURDIR)/bin
TOOLS         := $(CURDIR)/.bin
DEBIAN_PKGS   := docker-registry runc buildah
export PATH   := $(TOOLS):/usr/local/go/bin:$(PATH)

.PHONY: all build demo test deps debs containerd kubelet vet bench image clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# demo: the main job on an embedded default (in-process registry, generated
# 1 GiB model, lazy mount, time to first read vs. full download).
demo: build
	$(BIN)/weightsnap demo

# test: the whole suite. Installs what it needs first.
test: deps vet
	$(GO) test -count=1 -timeout 60m ./...

vet:
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

deps: debs containerd kubelet
	$(GO) mod download

# Debian packages the integration tests run for real; installed only when
# running as root and missing.
debs:
	@missing=""; for p in $(DEBIAN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages$$missing (not root: not installing; their tests will skip)"; fi; \
	fi

# containerd, ctr and the runc shim, pinned, built from the Go module proxy.
containerd:
	@if [ ! -x $(TOOLS)/containerd ] || [ ! -x $(TOOLS)/ctr ] || [ ! -x $(TOOLS)/containerd-shim-runc-v2 ] || \
	    ! $(TOOLS)/containerd --version 2>/dev/null | grep -q " $(CONTAINERD:v%=%)"; then \
	  echo "building containerd $(CONTAINERD) into $(TOOLS)"; \
	  GOBIN=$(TOOLS) $(GO) install \
	    github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD) \
	    github.com/containerd/containerd/v2/cmd/ctr@$(CONTAINERD) \
	    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$(CONTAINERD); \
	fi

# kubelet, pinned, built from the Go module proxy (k8s.io/kubernetes with its
# staging modules required at their published versions; .ci/build-kubelet),
# for the end-to-end test with a real kubelet. About 10 minutes on 2 cores;
# skipped while .bin/kubelet reports the pinned version.
kubelet:
	@if ! $(TOOLS)/kubelet --version 2>/dev/null | grep -qx "Kubernetes $(KUBELET)"; then \
	  echo "building kubelet $(KUBELET) into $(TOOLS)"; \
	  GO=$(GO) $(CURDIR)/.ci/build-kubelet $(KUBELET) $(TOOLS)/kubelet; \
	fi

# bench: time to first read and full-read throughput of every path (raw
# registry GET, local file, containerd overlayfs full pull, weightsnap
# through CRI image volumes) in one run, as a table, out/bench/bench.json
# and out/bench/bench.svg. Needs root and FUSE; takes a few minutes at the
# default size; its disk use peaks at about 3 × the model (the full pull),
# finished phases' data being deleted. Knobs (environment or make variables):
# WEIGHTSNAP_BENCH_SIZE (2GiB; e.g. 1GiB, 4GiB, 16GiB), WEIGHTSNAP_BENCH_SHARDS
# (1; e.g. 4 for model-0000N-of-00004.safetensors and an index) and
# WEIGHTSNAP_BENCH_OUT (out/bench). Not part of `make test`.
bench: deps
	$(GO) test ./integration -run '^$$' -bench BenchmarkModelPull -benchtime 1x -timeout 60m

# image: weightsnapd's OCI image, built without a container engine (see
# cmd/weightsnap-image): a static binary (CGO_ENABLED=0, -trimpath) in one
# layer, written as an OCI layout to out/image. The same source gives the
# same digest. IMAGE=host/repo:tag also pushes it (docker config.json
# credentials; loopback registries over plain HTTP, others too with
# IMAGE_PLAIN_HTTP=1) and prints the reference by digest to put in
# deploy/daemonset.yaml. IMAGE_ARCH picks the architecture; IMAGE_CA_CERTS
# the CA bundle copied into the image (empty: none, mount one instead).
IMAGE          ?=
IMAGE_ARCH     ?= $(shell $(GO) env GOARCH)
IMAGE_CA_CERTS ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
IMAGE_OUT      := $(CURDIR)/out/image
IMAGE_REV      := $(shell git rev-parse HEAD 2>/dev/null)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
image:
	CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) $(GO) build -trimpath -o $(CURDIR)/out/image-bin/weightsnapd ./cmd/weightsnapd
	$(GO) run ./cmd/weightsnap-image --binary $(CURDIR)/out/image-bin/weightsnapd --arch $(IMAGE_ARCH) \
	  --out $(IMAGE_OUT) --revision '$(IMAGE_REV)' \
	  $(if $(IMAGE_CA_CERTS),--ca-certs $(IMAGE_CA_CERTS)) \
	  $(if $(IMAGE),--ref-name $(IMAGE) --push $(IMAGE)) $(if $(IMAGE_PLAIN_HTTP),--plain-http)

clean:
	rm -rf $(BIN)
