package testutil

import (
	"cmp"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Faults are the failures a Proxy injects into blob GETs (requests to
// /v2/<name>/blobs/<digest>), each with its own probability; the rates must
// add up to at most 1. Manifests and uploads are never faulted, so a test
// aims its faults at the byte-range fetching it means to exercise.
type Faults struct {
	// FailRate answers 500 Internal Server Error.
	FailRate float64
	// ResetRate sends the headers and half of the body, then closes the
	// connection.
	ResetRate float64
	// StallRate holds the request without answering until the client gives
	// up (or the proxy stops).
	StallRate float64
	// TooManyRate answers 429 Too Many Requests with "Retry-After: 0".
	TooManyRate float64
	// CorruptDigest names a blob ("sha256:…") whose body bytes are all
	// inverted in every response, so any range of it fails verification.
	CorruptDigest string
	// Seed seeds the fault draws, so a sequential client sees the same
	// sequence of faults in every run.
	Seed int64
	// Latency delays every request by this much before it is forwarded,
	// as a registry across a network would (benchmarks, not tests).
	Latency time.Duration
}

func (f Faults) validate() error {
	if f.Latency < 0 {
		return fmt.Errorf("negative latency %v", f.Latency)
	}
	rates := []float64{f.FailRate, f.ResetRate, f.StallRate, f.TooManyRate}
	sum := 0.0
	for _, r := range rates {
		if r < 0 || r > 1 {
			return fmt.Errorf("fault rate %v outside [0, 1]", r)
		}
		sum += r
	}
	if sum > 1 {
		return fmt.Errorf("fault rates add up to %v, more than 1", sum)
	}
	return nil
}

type fault int

const (
	faultNone fault = iota
	faultFail
	faultReset
	faultStall
	faultTooMany
)

// Proxy is a reverse proxy in front of a registry that counts requests and
// blob body bytes served, and injects Faults into blob GETs.
type Proxy struct {
	// Addr is the proxy's host:port.
	Addr string

	target  *url.URL
	client  *http.Client
	srv     *http.Server
	closing chan struct{} // closed when the proxy stops, to release stalls

	mu        sync.Mutex
	faults    Faults
	rng       *rand.Rand
	blobBytes map[string]int64
	sent      map[string]byteRanges // blob bytes written to clients, by blob digest
	holds     map[string]*hold      // by blob digest
	waiting   map[string]int        // responses waiting at a hold, by blob digest
	inFlight  map[string]int        // blob GETs being answered, by blob digest
	gets      map[string]int        // GETs by URL path

	totalBlobBytes atomic.Int64
	requests       atomic.Int64
	blobRequests   atomic.Int64
	injected       atomic.Int64
}

// hold keeps the bytes [from, to) of a blob back until released.
type hold struct {
	from, to int64
	released chan struct{}
	once     sync.Once
}

// StartProxy starts a proxy on a free loopback port in front of target (a
// base URL such as "http://127.0.0.1:5000", or just "host:port"). It is
// stopped in t.Cleanup.
func StartProxy(t testing.TB, target string, faults Faults) *Proxy {
	t.Helper()
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		t.Fatalf("start proxy: target %q: %v", target, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("start proxy: %v", err)
	}
	p := &Proxy{
		Addr:   ln.Addr().String(),
		target: u,
		client: &http.Client{
			Transport: &http.Transport{
				Proxy: nil,
				// Bodies must pass through byte for byte.
				DisableCompression: true,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		closing:   make(chan struct{}),
		blobBytes: map[string]int64{},
		sent:      map[string]byteRanges{},
		holds:     map[string]*hold{},
		waiting:   map[string]int{},
		inFlight:  map[string]int{},
		gets:      map[string]int{},
	}
	if err := p.SetFaults(faults); err != nil {
		ln.Close()
		t.Fatalf("start proxy: %v", err)
	}
	p.srv = &http.Server{Handler: p}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = p.srv.Serve(ln)
	}()
	t.Cleanup(func() {
		close(p.closing)
		_ = p.srv.Close()
		<-served
		p.client.CloseIdleConnections()
	})
	return p
}

// URL returns the proxy's base URL, "http://Addr".
func (p *Proxy) URL() string { return "http://" + p.Addr }

// SetFaults replaces the faults injected from now on, and reseeds the draws.
func (p *Proxy) SetFaults(f Faults) error {
	if err := f.validate(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.faults = f
	p.rng = rand.New(rand.NewPCG(uint64(f.Seed), 0x5eed))
	return nil
}

// BlobBytes returns how many body bytes of blob digest ("sha256:…") the
// proxy has sent to clients.
func (p *Proxy) BlobBytes(digest string) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.blobBytes[digest]
}

// Sent reports whether every byte of [from, to) of blob digest has been
// written to a client at least once. Unlike BlobBytes, it tells where a
// client's reads have got to whatever else it fetched meanwhile (read-ahead
// past a hold, say).
func (p *Proxy) Sent(digest string, from, to int64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent[digest].cover(from, to)
}

// TotalBlobBytes returns how many blob body bytes the proxy has sent.
func (p *Proxy) TotalBlobBytes() int64 { return p.totalBlobBytes.Load() }

// Requests returns how many requests of any kind the proxy has received.
func (p *Proxy) Requests() int64 { return p.requests.Load() }

// BlobRequests returns how many blob GETs the proxy has received.
func (p *Proxy) BlobRequests() int64 { return p.blobRequests.Load() }

// InjectedFaults returns how many blob GETs the proxy has failed, reset,
// stalled or answered 429 (corruption is not counted).
func (p *Proxy) InjectedFaults() int64 { return p.injected.Load() }

// Gets returns how many GETs the proxy received of URL paths ending in
// suffix ("/manifests/sha256:…", "/blobs/sha256:…").
func (p *Proxy) Gets(suffix string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for path, c := range p.gets {
		if strings.HasSuffix(path, suffix) {
			n += c
		}
	}
	return n
}

// Reset zeroes all counters.
func (p *Proxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.blobBytes)
	clear(p.sent)
	clear(p.gets)
	p.totalBlobBytes.Store(0)
	p.requests.Store(0)
	p.blobRequests.Store(0)
	p.injected.Store(0)
}

// Hold holds back the bytes [from, to) of blob digest ("sha256:…"): a
// response carrying bytes of that range sends (and flushes) what comes
// before from and then waits. Responses that end at or before from, or
// start at or after to, are not affected, so a client can still read the
// head and the tail (an eStargz or gzip footer) of the blob. That is how a
// test observes what a client does with part of a blob without depending
// on timing. The returned release lets every held and future response
// proceed; it may be called more than once, and stopping the proxy
// releases too. A later Hold of the same digest replaces this one.
func (p *Proxy) Hold(digest string, from, to int64) (release func()) {
	h := &hold{from: from, to: to, released: make(chan struct{})}
	p.mu.Lock()
	p.holds[digest] = h
	p.mu.Unlock()
	return func() { h.once.Do(func() { close(h.released) }) }
}

// InFlight returns how many GETs of blob digest are being answered now,
// held ones included: when it equals Held, every other response has been
// sent whole.
func (p *Proxy) InFlight(digest string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inFlight[digest]
}

// Held returns how many responses carrying bytes of blob digest wait at
// its hold now: a client's request is in flight there until the hold is
// released or the client goes away (its request cancelled, its
// connection closed).
func (p *Proxy) Held(digest string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waiting[digest]
}

// holdFor returns the hold of digest that is not yet released, or nil.
func (p *Proxy) holdFor(digest string) *hold {
	p.mu.Lock()
	h := p.holds[digest]
	p.mu.Unlock()
	if h == nil {
		return nil
	}
	select {
	case <-h.released:
		return nil
	default:
		return h
	}
}

var blobPath = regexp.MustCompile(`^/v2/.+/blobs/([a-z0-9]+:[a-zA-Z0-9=_-]+)$`)

// ServeHTTP forwards r to the target, counting and faulting blob GETs.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.requests.Add(1)
	if r.Method == http.MethodGet {
		p.mu.Lock()
		p.gets[r.URL.Path]++
		p.mu.Unlock()
	}
	var digest string
	if m := blobPath.FindStringSubmatch(r.URL.Path); m != nil && r.Method == http.MethodGet {
		digest = m[1]
		p.blobRequests.Add(1)
		p.mu.Lock()
		p.inFlight[digest]++
		p.mu.Unlock()
		defer func() {
			p.mu.Lock()
			if p.inFlight[digest]--; p.inFlight[digest] == 0 {
				delete(p.inFlight, digest)
			}
			p.mu.Unlock()
		}()
	}
	f, corrupt := faultNone, false
	if digest != "" {
		f, corrupt = p.draw(digest)
	}
	if f != faultNone {
		p.injected.Add(1)
	}
	switch f {
	case faultFail:
		http.Error(w, "injected fault", http.StatusInternalServerError)
		return
	case faultTooMany:
		w.Header().Set("Retry-After", "0")
		http.Error(w, "injected fault", http.StatusTooManyRequests)
		return
	case faultStall:
		select {
		case <-r.Context().Done():
		case <-p.closing:
		}
		return
	}

	p.mu.Lock()
	latency := p.faults.Latency
	p.mu.Unlock()
	if latency > 0 {
		t := time.NewTimer(latency)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	resp, err := p.forward(r)
	if err != nil {
		http.Error(w, "proxy: "+err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	h := w.Header()
	for k, vs := range resp.Header {
		if !hopByHop(k) {
			h[k] = vs
		}
	}
	if resp.ContentLength >= 0 {
		h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	w.WriteHeader(resp.StatusCode)
	if digest == "" || (resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent) {
		_, _ = io.Copy(w, resp.Body)
		return
	}

	var body io.Reader = resp.Body
	if corrupt {
		body = invertReader{body}
	}
	if f == faultReset {
		body = io.LimitReader(body, max(resp.ContentLength, 0)/2)
	}
	pos := bodyStart(resp)
	out := countingWriter{w: w, count: func(n int) { p.addBlobBytes(digest, n) }, wrote: func(n int) {
		p.addSent(digest, pos, int64(n))
		pos += int64(n)
	}}
	if h := p.holdFor(digest); h != nil && h.covers(bodyStart(resp), resp.ContentLength) {
		if err := p.sendHeld(r, w, out, body, digest, h, bodyStart(resp)); err != nil {
			return
		}
	}
	_, _ = io.Copy(out, body)
	if f == faultReset {
		p.reset(w)
	}
}

// covers reports whether a body of n bytes (n < 0: unknown) starting at
// blob offset start carries bytes that h holds.
func (h *hold) covers(start, n int64) bool {
	return start < h.to && (n < 0 || start+n > h.from)
}

// sendHeld sends the part of body (which starts at blob offset start) that
// lies before h.from, flushes it and waits for h's release. An error means
// the client or the proxy went away.
func (p *Proxy) sendHeld(r *http.Request, w http.ResponseWriter, out io.Writer, body io.Reader, digest string, h *hold, start int64) error {
	if n := h.from - start; n > 0 {
		if _, err := io.CopyN(out, body, n); err != nil {
			return err
		}
	}
	_ = http.NewResponseController(w).Flush()
	p.mu.Lock()
	p.waiting[digest]++
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		if p.waiting[digest]--; p.waiting[digest] == 0 {
			delete(p.waiting, digest)
		}
		p.mu.Unlock()
	}()
	select {
	case <-h.released:
		return nil
	case <-r.Context().Done():
		return r.Context().Err()
	case <-p.closing:
		return http.ErrServerClosed
	}
}

// bodyStart returns the blob offset of the first byte of a 200 or 206
// response body.
func bodyStart(resp *http.Response) int64 {
	if resp.StatusCode != http.StatusPartialContent {
		return 0
	}
	var start int64
	if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-", &start); err != nil {
		return 0
	}
	return start
}

// draw picks the fault for one blob GET.
func (p *Proxy) draw(digest string) (fault, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.faults
	u := p.rng.Float64()
	corrupt := f.CorruptDigest != "" && f.CorruptDigest == digest
	for _, c := range []struct {
		rate float64
		f    fault
	}{{f.FailRate, faultFail}, {f.TooManyRate, faultTooMany}, {f.StallRate, faultStall}, {f.ResetRate, faultReset}} {
		if u < c.rate {
			return c.f, corrupt
		}
		u -= c.rate
	}
	return faultNone, corrupt
}

func (p *Proxy) forward(r *http.Request) (*http.Response, error) {
	u := *p.target
	u.Path = strings.TrimSuffix(u.Path, "/") + r.URL.Path
	u.RawPath = ""
	u.RawQuery = r.URL.RawQuery
	body := r.Body
	if r.ContentLength == 0 {
		body = http.NoBody
	}
	out, err := http.NewRequestWithContext(r.Context(), r.Method, u.String(), body)
	if err != nil {
		return nil, err
	}
	for k, vs := range r.Header {
		if !hopByHop(k) {
			out.Header[k] = vs
		}
	}
	out.ContentLength = r.ContentLength
	// The registry builds upload Locations from Host: keep the client's view
	// so that follow-up requests come back through the proxy.
	out.Host = r.Host
	return p.client.Do(out)
}

// reset flushes what was written and closes the connection short of the
// declared Content-Length, which is what a client sees when a server or a
// middlebox dies mid-body. A plain close rather than a TCP RST: an RST would
// discard bytes still in the socket buffer, and the counters would no longer
// be exact.
func (p *Proxy) reset(w http.ResponseWriter) {
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	conn, _, err := rc.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler) // closes the connection without a clean end
	}
	_ = conn.Close()
}

func (p *Proxy) addSent(digest string, off, n int64) {
	p.mu.Lock()
	p.sent[digest] = p.sent[digest].add(off, off+n)
	p.mu.Unlock()
}

func (p *Proxy) addBlobBytes(digest string, n int) {
	p.mu.Lock()
	p.blobBytes[digest] += int64(n)
	p.mu.Unlock()
	p.totalBlobBytes.Add(int64(n))
}

// hopByHop reports headers not forwarded as they are: the hop-by-hop ones,
// and Content-Length, which is set from the parsed length instead.
func hopByHop(header string) bool {
	switch http.CanonicalHeaderKey(header) {
	case "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length":
		return true
	}
	return false
}

// countingWriter reports the bytes the handler managed to write, so a body
// cut short by a reset or a client hanging up is counted as far as it went.
// Bytes are counted before they are written (and the unwritten rest taken
// back after), so a counter read after a client has received bytes never
// lags behind them. wrote, if set, is told what was written, after the
// write.
type countingWriter struct {
	w     io.Writer
	count func(int)
	wrote func(int)
}

func (c countingWriter) Write(b []byte) (int, error) {
	c.count(len(b))
	n, err := c.w.Write(b)
	if n < len(b) {
		c.count(n - len(b))
	}
	if c.wrote != nil && n > 0 {
		c.wrote(n)
	}
	return n, err
}

// byteRanges is a set of byte ranges [off, end), sorted and merged.
type byteRanges [][2]int64

// add returns r with [off, end) added.
func (r byteRanges) add(off, end int64) byteRanges {
	if end <= off {
		return r
	}
	var out byteRanges
	for _, x := range r {
		switch {
		case x[1] < off || x[0] > end: // apart (touching ranges merge)
			out = append(out, x)
		default:
			off, end = min(off, x[0]), max(end, x[1])
		}
	}
	out = append(out, [2]int64{off, end})
	slices.SortFunc(out, func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
	return out
}

// cover reports whether r holds every byte of [off, end).
func (r byteRanges) cover(off, end int64) bool {
	if end <= off {
		return true
	}
	for _, x := range r {
		if x[0] <= off && end <= x[1] {
			return true
		}
	}
	return false
}

// invertReader inverts every byte it reads.
type invertReader struct{ r io.Reader }

func (i invertReader) Read(b []byte) (int, error) {
	n, err := i.r.Read(b)
	for j := range b[:n] {
		b[j] ^= 0xff
	}
	return n, err
}
