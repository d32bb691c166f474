// Command weightsnap-image builds weightsnapd's OCI image from a static
// binary, without a container engine, writes it as an OCI layout and
// pushes it if asked. `make image` runs it; see deploy/README.md.
//
//	weightsnap-image --binary out/image-bin/weightsnapd --arch amd64 --out out/image
//	                 [--ca-certs FILE] [--revision REV] [--push host/repo:tag] [--plain-http]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/weightsnap/weightsnap/internal/imagebuild"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "weightsnap-image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fset := flag.NewFlagSet("weightsnap-image", flag.ContinueOnError)
	binary := fset.String("binary", "", "static linux binary of weightsnapd (CGO_ENABLED=0)")
	arch := fset.String("arch", "", "GOARCH the binary was built for")
	caCerts := fset.String("ca-certs", "", "PEM bundle of registry CAs to put at "+imagebuild.CACertsPath+" (empty: none)")
	revision := fset.String("revision", "", "source revision, the org.opencontainers.image.revision label (empty: none)")
	out := fset.String("out", "out/image", "directory of the OCI layout written (replaced)")
	refName := fset.String("ref-name", "", "org.opencontainers.image.ref.name of the image in the layout")
	push := fset.String("push", "", "host/repo:tag to push the image to (empty: do not push)")
	plainHTTP := fset.Bool("plain-http", false, "push over plain HTTP (loopback registries always are)")
	if err := fset.Parse(args); err != nil {
		return err
	}
	if *binary == "" || *arch == "" || fset.NArg() > 0 {
		fset.Usage()
		return fmt.Errorf("--binary and --arch are required, and no arguments")
	}
	var labels map[string]string
	if *revision != "" {
		labels = map[string]string{"org.opencontainers.image.revision": *revision}
	}
	img, err := imagebuild.BuildFiles(*binary, *caCerts, *arch, labels)
	if err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	if err := imagebuild.WriteLayout(*out, img, *refName); err != nil {
		return err
	}
	fmt.Printf("%s: %s\n", *out, d)
	if *push == "" {
		return nil
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ref, err := imagebuild.Push(ctx, *push, img, *plainHTTP)
	if err != nil {
		return err
	}
	fmt.Println(ref)
	return nil
}
