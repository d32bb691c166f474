package integration

// The reader program the test images run, and its build.

import (
	"os"
	"path/filepath"
	"testing"
)

// toolSource is the one program the test images run: "sleep" waits for
// SIGTERM (the pod sandbox and long-running containers), "sum FILE" prints
// the file's sha256, "read FILE..." reads model files as a loader does and
// reports its progress (see readFiles). Images FROM scratch have no shell.
const toolSource = `package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: tool sleep | sum FILE | read FILE...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "sleep":
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
		<-c
	case "sum":
		f, err := os.Open(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(hex.EncodeToString(h.Sum(nil)))
	case "read":
		if err := readFiles(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		os.Exit(2)
	}
}

// readFiles reads the files like a model loader and prints one line per
// event, "EVENT UNIX_NS BYTES": "start" before anything is opened; "first"
// once the first MiB of the first *.safetensors file is in; "headers" once
// every other file has been read whole and every *.safetensors header
// (8-byte length and JSON) parsed; then, while every *.safetensors file is
// read sequentially in 1 MiB reads, "progress" every 64 MiB and "done" at
// the end, BYTES counting that sequential pass.
func readFiles(files []string) error {
	emit := func(ev string, n int64) { fmt.Printf("%s %d %d\n", ev, time.Now().UnixNano(), n) }
	emit("start", 0)
	var weights, others []string
	for _, f := range files {
		if strings.HasSuffix(f, ".safetensors") {
			weights = append(weights, f)
		} else {
			others = append(others, f)
		}
	}
	if len(weights) == 0 {
		return fmt.Errorf("no *.safetensors file among %v", files)
	}
	buf := make([]byte, 1<<20)
	f, err := os.Open(weights[0])
	if err != nil {
		return err
	}
	n, err := io.ReadFull(f, buf)
	f.Close()
	if err != nil && err != io.ErrUnexpectedEOF {
		return fmt.Errorf("%s: %w", weights[0], err)
	}
	emit("first", int64(n))
	for _, o := range others {
		if _, err := os.ReadFile(o); err != nil {
			return err
		}
	}
	for _, w := range weights {
		if err := readHeader(w); err != nil {
			return err
		}
	}
	emit("headers", 0)
	var total int64
	next := int64(64 << 20)
	for _, w := range weights {
		f, err := os.Open(w)
		if err != nil {
			return err
		}
		for {
			n, err := f.Read(buf)
			total += int64(n)
			for total >= next {
				emit("progress", total)
				next += 64 << 20
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				f.Close()
				return fmt.Errorf("%s: %w", w, err)
			}
		}
		f.Close()
	}
	emit("done", total)
	return nil
}

// readHeader reads and parses the JSON header of a safetensors file.
func readHeader(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var size [8]byte
	if _, err := io.ReadFull(f, size[:]); err != nil {
		return fmt.Errorf("%s: header length: %w", path, err)
	}
	n := binary.LittleEndian.Uint64(size[:])
	if n > 100<<20 {
		return fmt.Errorf("%s: header of %d bytes", path, n)
	}
	hdr := make([]byte, n)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return fmt.Errorf("%s: header: %w", path, err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(hdr, &m); err != nil {
		return fmt.Errorf("%s: header: %w", path, err)
	}
	return nil
}
`

// toolBinary builds toolSource as a static binary.
func toolBinary(t testing.TB) string {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module wstool\n\ngo 1.22\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(toolSource), 0o644); err != nil {
		t.Fatal(err)
	}
	// Static: the images are FROM scratch.
	return goBuild(t, src, ".", filepath.Join(src, "tool"), "CGO_ENABLED=0")
}
