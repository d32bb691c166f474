package integration

// The reader program the test images run, and its build.

import (
	"os"
	"path/filepath"
	"testing"
)

// toolSource is the one program the test images run: "sleep" waits for
// SIGTERM (the pod sandbox and long-running containers), "sum FILE" prints
// the file's sha256, "read FILE..." reads model files sequentially and
// reports its progress (see readFiles), "load [-threads N] [-plan] FILE..."
// maps them and touches their tensors in header order as safetensors-based
// servers do (see loadFiles). Images FROM scratch have no shell.
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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: tool sleep | sum FILE | msum FILE | read FILE... | load [-threads N] [-plan] FILE...")
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
	case "msum":
		if err := mmapSum(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "read":
		if err := readFiles(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "load":
		threads, plan, files := 1, false, os.Args[2:]
		for len(files) > 0 && strings.HasPrefix(files[0], "-") {
			switch {
			case files[0] == "-plan":
				plan, files = true, files[1:]
			case files[0] == "-threads" && len(files) > 1:
				n, err := strconv.Atoi(files[1])
				if err != nil || n < 1 {
					fmt.Fprintln(os.Stderr, "load: -threads wants a positive count")
					os.Exit(2)
				}
				threads, files = n, files[2:]
			default:
				fmt.Fprintln(os.Stderr, "load: unknown flag", files[0])
				os.Exit(2)
			}
		}
		if err := loadFiles(files, threads, plan); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		os.Exit(2)
	}
}

// mmapSum prints the sha256 of a file read through a shared mapping, as
// a loader that maps its weights reads them: by page faults.
func mmapSum(name string) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, int(fi.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return err
	}
	defer syscall.Munmap(m)
	h := sha256.New()
	h.Write(m)
	fmt.Println(hex.EncodeToString(h.Sum(nil)))
	return nil
}

// splitWeights separates *.safetensors files from the others, keeping the
// order of each.
func splitWeights(files []string) (weights, others []string) {
	for _, f := range files {
		if strings.HasSuffix(f, ".safetensors") {
			weights = append(weights, f)
		} else {
			others = append(others, f)
		}
	}
	return weights, others
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
	weights, others := splitWeights(files)
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
	emit("cpu", cpuMicros())
	return nil
}

// cpuMicros is the CPU time this process used, user and system, in µs.
func cpuMicros() int64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return ru.Utime.Nano()/1000 + ru.Stime.Nano()/1000
}

// readHeader reads and parses the JSON header of a safetensors file.
func readHeader(path string) error {
	_, _, err := headerTensors(path)
	return err
}

// tensor is a tensor of a mapped file: its name, and its data's span in
// the file (data offsets plus the header's).
type tensor struct {
	name       string
	file       int // index into the load's files
	start, end int64
}

// headerTensors reads the 8-byte length and the JSON header of a
// safetensors file and returns its tensors in the order the header lists
// them (json.Unmarshal into a map would lose it), and where data begins.
func headerTensors(path string) ([]tensor, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	var size [8]byte
	if _, err := io.ReadFull(f, size[:]); err != nil {
		return nil, 0, fmt.Errorf("%s: header length: %w", path, err)
	}
	n := binary.LittleEndian.Uint64(size[:])
	if n > 100<<20 {
		return nil, 0, fmt.Errorf("%s: header of %d bytes", path, n)
	}
	hdr := make([]byte, n)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return nil, 0, fmt.Errorf("%s: header: %w", path, err)
	}
	base := 8 + int64(n)
	bad := func(err error) ([]tensor, int64, error) { return nil, 0, fmt.Errorf("%s: header: %w", path, err) }
	d := json.NewDecoder(strings.NewReader(string(hdr)))
	if tok, err := d.Token(); err != nil {
		return bad(err)
	} else if tok != json.Delim('{') {
		return bad(fmt.Errorf("not an object"))
	}
	var ts []tensor
	for d.More() {
		tok, err := d.Token()
		if err != nil {
			return bad(err)
		}
		name, _ := tok.(string)
		if name == "__metadata__" {
			var skip json.RawMessage
			if err := d.Decode(&skip); err != nil {
				return bad(err)
			}
			continue
		}
		var t struct {
			Offsets [2]int64 ` + "`json:\"data_offsets\"`" + `
		}
		if err := d.Decode(&t); err != nil {
			return bad(fmt.Errorf("tensor %s: %w", name, err))
		}
		if t.Offsets[0] < 0 || t.Offsets[1] < t.Offsets[0] {
			return bad(fmt.Errorf("tensor %s: data_offsets %v", name, t.Offsets))
		}
		ts = append(ts, tensor{name: name, start: base + t.Offsets[0], end: base + t.Offsets[1]})
	}
	return ts, base, nil
}

// loadFiles loads the files as safetensors-based servers do, and prints
// the events of readFiles: "start"; "headers" once every other file was
// read whole and every *.safetensors file's 8-byte length and JSON header
// parsed; then, with the files mapped (mmap, shared, read-only), their
// tensors are touched one byte per page, file after file and within a
// file in the order its header lists them (which need not be the order of
// the data), by threads workers that each take the next tensor in that
// order, as sharded loaders do: "first" once 1 MiB of tensor data was
// touched, "progress" every 64 MiB and "done" at the end, BYTES counting
// tensor data. With plan, it prints the order ("tensor FILE NAME" lines)
// and touches nothing.
func loadFiles(files []string, threads int, plan bool) error {
	emit := func(ev string, n int64) { fmt.Printf("%s %d %d\n", ev, time.Now().UnixNano(), n) }
	emit("start", 0)
	weights, others := splitWeights(files)
	if len(weights) == 0 {
		return fmt.Errorf("no *.safetensors file among %v", files)
	}
	for _, o := range others {
		if _, err := os.ReadFile(o); err != nil {
			return err
		}
	}
	var order []tensor
	for i, w := range weights {
		ts, _, err := headerTensors(w)
		if err != nil {
			return err
		}
		for _, t := range ts {
			t.file = i
			order = append(order, t)
		}
	}
	emit("headers", 0)
	if plan {
		for _, t := range order {
			fmt.Printf("tensor %s %s\n", weights[t.file], t.name)
		}
		return nil
	}
	maps := make([][]byte, len(weights))
	for i, w := range weights {
		f, err := os.Open(w)
		if err != nil {
			return err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		if fi.Size() > 0 {
			maps[i], err = syscall.Mmap(int(f.Fd()), 0, int(fi.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
		}
		f.Close() // the mapping holds the file
		if err != nil {
			return fmt.Errorf("mmap %s: %w", w, err)
		}
		defer syscall.Munmap(maps[i])
	}
	for _, t := range order {
		if t.end > int64(len(maps[t.file])) {
			return fmt.Errorf("%s: tensor %s ends at %d, past the file's %d bytes", weights[t.file], t.name, t.end, len(maps[t.file]))
		}
	}

	var mu sync.Mutex // orders the events and guards the counters
	var total int64
	next, first := int64(64<<20), false
	add := func(n int64) {
		mu.Lock()
		defer mu.Unlock()
		total += n
		if !first && total >= 1<<20 {
			first = true
			emit("first", total)
		}
		for total >= next {
			emit("progress", total)
			next += 64 << 20
		}
	}
	page := int64(os.Getpagesize())
	var taken int
	var sum uint64
	var wg sync.WaitGroup
	for range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var s uint64
			for {
				mu.Lock()
				i := taken
				taken++
				mu.Unlock()
				if i >= len(order) {
					break
				}
				t, m := order[i], maps[order[i].file]
				// One byte of every page (the tensor's first, then one at
				// each page boundary) faults the tensor in; progress
				// counts in 1 MiB steps.
				p := t.start
				for at := t.start; at < t.end; {
					end := min(at+1<<20, t.end)
					for ; p < end; p += page - p%page {
						s += uint64(m[p])
					}
					add(end - at)
					at = end
				}
			}
			mu.Lock()
			sum += s
			mu.Unlock()
		}()
	}
	wg.Wait()
	emit("done", total)
	emit("cpu", cpuMicros())
	fmt.Printf("touched %x\n", sum)
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
