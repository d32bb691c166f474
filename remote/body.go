package remote

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// body is a response body that feeds the watchdog, counts bytes, and
// reports a stall as errStalled.
type body struct {
	resp   *http.Response
	ctx    context.Context
	cancel context.CancelCauseFunc
	wd     *watchdog
	bytes  prometheus.Counter
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.resp.Body.Read(p)
	if n > 0 {
		b.wd.progress()
		b.bytes.Add(float64(n))
	}
	if err != nil && errors.Is(context.Cause(b.ctx), errStalled) {
		err = fmt.Errorf("%w: reading %s: %v", errStalled, b.resp.Request.URL.Host, err)
	}
	return n, err
}

// Close closes the body; a body not read to its end costs its connection.
func (b *body) Close() error {
	b.wd.stop()
	err := b.resp.Body.Close()
	b.cancel(nil)
	return err
}

// watchdog cancels an attempt when no progress was seen for stall. It
// checks lazily when its timer fires instead of resetting a timer on every
// read.
type watchdog struct {
	stall   time.Duration
	start   time.Time
	last    atomic.Int64 // nanoseconds since start of the last progress
	stopped atomic.Bool
	timer   *time.Timer
	cancel  context.CancelCauseFunc
}

func startWatchdog(stall time.Duration, cancel context.CancelCauseFunc) *watchdog {
	w := &watchdog{stall: stall, start: time.Now(), cancel: cancel}
	if stall > 0 {
		w.timer = time.AfterFunc(stall, w.fire)
	}
	return w
}

func (w *watchdog) fire() {
	if w.stopped.Load() {
		return
	}
	idle := time.Since(w.start) - time.Duration(w.last.Load())
	if idle >= w.stall {
		w.cancel(errStalled)
		return
	}
	w.timer.Reset(w.stall - idle)
}

func (w *watchdog) progress() {
	if w.timer != nil {
		w.last.Store(int64(time.Since(w.start)))
	}
}

func (w *watchdog) stop() {
	w.stopped.Store(true)
	if w.timer != nil {
		w.timer.Stop()
	}
}
