package main

import (
	"archive/tar"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/internal/bytesize"
	"github.com/weightsnap/weightsnap/internal/registryserver"
	"github.com/weightsnap/weightsnap/lazy"
	"github.com/weightsnap/weightsnap/pack"
	"github.com/weightsnap/weightsnap/remote"
)

// runDemo is the main job on an embedded default: an in-process registry,
// a generated model, a lazy mount, and the numbers next to a full download.
func runDemo(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("demo", flag.ContinueOnError)
	size := fl.String("size", "1GiB", "size of the generated safetensors file")
	keep := fl.Bool("keep", false, "keep the demo's temporary directory")
	cpuProfile := fl.String("cpuprofile", "", "write a CPU profile of the lazy read to this file")
	if err := fl.Parse(args); err != nil {
		return err
	}
	n, err := bytesize.Parse(*size)
	if err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	if os.Geteuid() != 0 {
		return errors.New("must run as root (FUSE and overlay mounts)")
	}
	tmp, err := os.MkdirTemp("", "weightsnap-demo-")
	if err != nil {
		return err
	}
	if !*keep {
		defer os.RemoveAll(tmp)
	}

	step("generating a %s safetensors model", formatBytes(n))
	modelDir := filepath.Join(tmp, "demo-llm")
	tensors, err := writeModel(modelDir, n)
	if err != nil {
		return err
	}

	addr, stopRegistry, err := registryserver.Start(ctx, filepath.Join(tmp, "registry"))
	if err != nil {
		return err
	}
	defer stopRegistry()
	ref := addr + "/models/demo-llm:v1"
	step("packing and pushing to the embedded registry %s", ref)
	img, err := pack.Build(ctx, modelDir, pack.Options{})
	if err != nil {
		return err
	}
	if err := pushWithProgress(ctx, img, ref, true); err != nil {
		return err
	}
	inImage := "models/demo-llm/model.safetensors"

	step("full download: fetch every layer and unpack it, then read the file")
	full, err := fullDownload(ctx, ref, filepath.Join(tmp, "full"), inImage)
	if err != nil {
		return err
	}

	// Write back what the full download left dirty, so that the lazy run
	// does not wait on it (ext4 commits it with the next fsync anywhere).
	syscall.Sync()
	step("lazy: mount with weightsnap, read the header, one tensor, then the whole file")
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
	}
	lazy, err := lazyRead(ctx, ref, tmp, inImage, tensors)
	pprof.StopCPUProfile()
	if err != nil {
		return err
	}

	fmt.Printf("\n%-44s %14s %14s\n", "", "full download", "weightsnap")
	fmt.Printf("%-44s %14s %14s\n", "pull (until the image is usable)", dur(full.pull), dur(lazy.pull))
	fmt.Printf("%-44s %14s %14s\n", "time to first read (pull → header read)", dur(full.firstRead), dur(lazy.firstRead))
	fmt.Printf("%-44s %14s %14s\n", "one tensor read after that", dur(full.tensor), dur(lazy.tensor))
	fmt.Printf("%-44s %14s %14s\n", "time to last byte (pull → whole file read)", dur(full.lastByte), dur(lazy.lastByte))
	fmt.Printf("%-44s %14s %14s\n", "whole-file read throughput", rate(n, full.read), rate(n, lazy.read))
	fmt.Printf("\ntime to first read: weightsnap %s vs full download %s (%.0fx sooner)\n",
		dur(lazy.firstRead), dur(full.firstRead), full.firstRead.Seconds()/lazy.firstRead.Seconds())
	return nil
}

type timings struct {
	pull, firstRead, tensor, lastByte, read time.Duration
}

func step(format string, a ...any) { fmt.Fprintf(os.Stderr, "==> "+format+"\n", a...) }

func dur(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func rate(n int64, d time.Duration) string {
	return fmt.Sprintf("%.0f MB/s", float64(n)/d.Seconds()/1e6)
}

// tensorInfo is where one tensor sits in the safetensors file.
type tensorInfo struct {
	name     string
	off, len int64 // absolute offset in the file
}

// writeModel writes a Hugging Face style model directory: a valid
// safetensors file of about size bytes of non-zero data, plus config and
// tokenizer files.
func writeModel(dir string, size int64) ([]tensorInfo, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	const tensorBytes = 32 << 20 // 4096 x 4096 x F16
	count := max(1, int(size/tensorBytes))
	header := map[string]any{"__metadata__": map[string]string{"format": "pt"}}
	names := make([]string, count)
	for i := range count {
		names[i] = fmt.Sprintf("model.layers.%d.mlp.weight", i)
		header[names[i]] = map[string]any{
			"dtype": "F16", "shape": []int{4096, 4096},
			"data_offsets": []int64{int64(i) * tensorBytes, int64(i+1) * tensorBytes},
		}
	}
	hj, err := json.Marshal(header)
	if err != nil {
		return nil, err
	}
	if pad := len(hj) % 8; pad != 0 { // the format pads the header with spaces to 8 bytes
		hj = append(hj, strings.Repeat(" ", 8-pad)...)
	}
	f, err := os.Create(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(hj)))
	if _, err := f.Write(append(lenBuf[:], hj...)); err != nil {
		return nil, err
	}
	base := int64(8 + len(hj))
	rng := rand.NewChaCha8([32]byte{'w', 'e', 'i', 'g', 'h', 't', 's'})
	buf := make([]byte, 4<<20)
	var tensors []tensorInfo
	for i := range count {
		tensors = append(tensors, tensorInfo{names[i], base + int64(i)*tensorBytes, tensorBytes})
		for w := 0; w < tensorBytes; w += len(buf) {
			rng.Read(buf)
			for j, b := range buf { // weights, not holes: never a zero byte
				if b == 0 {
					buf[j] = 1
				}
			}
			if _, err := f.Write(buf); err != nil {
				return nil, err
			}
		}
	}
	small := map[string]string{
		"config.json":            `{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"num_hidden_layers":` + fmt.Sprint(count) + `,"torch_dtype":"float16"}`,
		"generation_config.json": `{"do_sample":true,"temperature":0.6}`,
		"tokenizer_config.json":  `{"model_max_length":8192,"tokenizer_class":"PreTrainedTokenizerFast"}`,
		"tokenizer.json":         `{"version":"1.0","model":{"type":"BPE","vocab":{"<s>":0,"</s>":1,"a":2}}}`,
	}
	for name, body := range small {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body+"\n"), 0o644); err != nil {
			return nil, err
		}
	}
	return tensors, f.Close()
}

// fullDownload is the baseline: download and unpack every layer (what a
// full pull does), then read the file from local disk.
func fullDownload(ctx context.Context, ref, dir, file string) (timings, error) {
	var t timings
	start := time.Now()
	img, err := remote.New().Resolve(ctx, ref)
	if err != nil {
		return t, err
	}
	for _, l := range img.Layers {
		rc, err := l.Blob.Open(ctx, 0)
		if err != nil {
			return t, err
		}
		err = untar(rc, dir)
		rc.Close()
		if err != nil {
			return t, fmt.Errorf("unpacking %s: %w", l.Digest, err)
		}
	}
	t.pull = time.Since(start)
	dropCaches()
	readStart := time.Now()
	if err := readHeader(filepath.Join(dir, file)); err != nil {
		return t, err
	}
	t.firstRead = time.Since(start)
	tensorStart := time.Now()
	if err := readTensor(filepath.Join(dir, file)); err != nil {
		return t, err
	}
	t.tensor = time.Since(tensorStart)
	if _, err := readAll(filepath.Join(dir, file)); err != nil {
		return t, err
	}
	t.read = time.Since(readStart)
	t.lastByte = time.Since(start)
	return t, nil
}

// lazyRead mounts the image with weightsnap in a fresh cache and reads.
func lazyRead(ctx context.Context, ref, tmp, file string, tensors []tensorInfo) (timings, error) {
	var t timings
	store, err := cache.Open(filepath.Join(tmp, "cache"))
	if err != nil {
		return t, err
	}
	defer store.Close()
	mgr := lazy.New(store, remote.New())
	defer mgr.Close()
	target := filepath.Join(tmp, "mnt")
	start := time.Now()
	im, err := mgr.MountImage(ctx, ref, target, filepath.Join(tmp, "layers"))
	if err != nil {
		return t, err
	}
	defer im.Unmount()
	t.pull = time.Since(start)
	path := filepath.Join(target, file)
	if err := readHeader(path); err != nil {
		return t, err
	}
	t.firstRead = time.Since(start)
	tensorStart := time.Now()
	if err := readTensor(path); err != nil {
		return t, err
	}
	t.tensor = time.Since(tensorStart)
	readStart := time.Now()
	if _, err := readAll(path); err != nil {
		return t, err
	}
	t.read = time.Since(readStart)
	t.lastByte = time.Since(start)
	return t, nil
}

// readHeader reads a safetensors header the way a loader does: the 8-byte
// length, then the JSON.
func readHeader(path string) error {
	_, err := safetensorsHeader(path)
	return err
}

func safetensorsHeader(path string) (map[string]json.RawMessage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		return nil, fmt.Errorf("reading safetensors header length: %w", err)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > 100<<20 {
		return nil, fmt.Errorf("safetensors header of %d bytes", n)
	}
	hj := make([]byte, n)
	if _, err := io.ReadFull(f, hj); err != nil {
		return nil, fmt.Errorf("reading safetensors header: %w", err)
	}
	var h map[string]json.RawMessage
	if err := json.Unmarshal(hj, &h); err != nil {
		return nil, fmt.Errorf("parsing safetensors header: %w", err)
	}
	return h, nil
}

// readTensor reads the middle tensor named in the header.
func readTensor(path string) error {
	h, err := safetensorsHeader(path)
	if err != nil {
		return err
	}
	var names []string
	for k := range h {
		if k != "__metadata__" {
			names = append(names, k)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return errors.New("no tensors")
	}
	var info struct {
		Offsets [2]int64 `json:"data_offsets"`
	}
	if err := json.Unmarshal(h[names[len(names)/2]], &info); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		return err
	}
	base := 8 + int64(binary.LittleEndian.Uint64(lenBuf[:]))
	buf := make([]byte, info.Offsets[1]-info.Offsets[0])
	_, err = f.ReadAt(buf, base+info.Offsets[0])
	return err
}

func readAll(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return io.CopyBuffer(io.Discard, f, make([]byte, 1<<20))
}

// dropCaches drops the page cache so a read after unpacking hits the disk
// like the first read after a real pull would; best effort.
func dropCaches() {
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0)
}

// untar unpacks regular files, directories and symlinks (what pack makes).
func untar(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(name, 0o755)
		case tar.TypeSymlink:
			err = os.Symlink(h.Linkname, name)
		case tar.TypeReg:
			err = writeFile(name, tr, os.FileMode(h.Mode).Perm())
		}
		if err != nil {
			return err
		}
	}
}

func writeFile(name string, r io.Reader, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.CopyBuffer(f, r, make([]byte, 1<<20)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
