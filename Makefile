# weightsnap — see README.md.
GO            ?= go
CONTAINERD    ?= v2.4.2
BIN           := $(CURDIR)/bin
TOOLS         := $(CURDIR)/.bin
DEBIAN_PKGS   := docker-registry runc
export PATH   := $(TOOLS):/usr/local/go/bin:$(PATH)

.PHONY: all build demo test deps debs containerd vet bench clean

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
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

deps: debs containerd
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
	    ! $(TOOLS)/containerd --version 2>/dev/null | grep -q $(CONTAINERD); then \
	  echo "building containerd $(CONTAINERD) into $(TOOLS)"; \
	  GOBIN=$(TOOLS) $(GO) install \
	    github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD) \
	    github.com/containerd/containerd/v2/cmd/ctr@$(CONTAINERD) \
	    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$(CONTAINERD); \
	fi

# bench: time to first read and full-read throughput against a full pull.
bench: build deps
	$(BIN)/weightsnap bench $(BENCHFLAGS)

clean:
	rm -rf $(BIN)
