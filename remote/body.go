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
		b.wd.progress(n)
		b.bytes.Add(float64(n))
	}
	if err != nil {
		if cause := context.Cause(b.ctx); errors.Is(cause, errStalled) || errors.Is(cause, errTooSlow) {
			err = fmt.Errorf("%w: reading %s: %v", cause, b.resp.Request.URL.Host, err)
		}
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

// watchdog cancels an attempt when no progress was seen for stall, or
// when, over a window of that length, fewer bytes came than minRate asks:
// a registry that dribbles a byte now and then would otherwise hold a
// fetch worker for ever. Together they bound an attempt: one moving n
// bytes lasts at most about stall × (1 + n / (minRate × stall)). It checks
// lazily when its timer fires instead of resetting a timer on every read.
type watchdog struct {
	stall     time.Duration
	minWindow int64 // bytes a window must bring; 0: no rate check
	start     time.Time
	last      atomic.Int64 // nanoseconds since start of the last progress
	bytes     atomic.Int64
	stopped   atomic.Bool
	timer     *time.Timer
	cancel    context.CancelCauseFunc

	windowEnd   time.Duration // since start; touched by fire only
	windowBytes int64         // bytes seen when the window began
}

func startWatchdog(stall time.Duration, minRate int64, cancel context.CancelCauseFunc) *watchdog {
	w := &watchdog{stall: stall, start: time.Now(), cancel: cancel}
	if stall > 0 {
		w.minWindow = int64(float64(minRate) * stall.Seconds())
		w.windowEnd = stall
		w.timer = time.AfterFunc(stall, w.fire)
	}
	return w
}

func (w *watchdog) fire() {
	if w.stopped.Load() {
		return
	}
	now := time.Since(w.start)
	idle := now - time.Duration(w.last.Load())
	if idle >= w.stall {
		w.cancel(errStalled)
		return
	}
	if now >= w.windowEnd {
		got := w.bytes.Load()
		if got-w.windowBytes < w.minWindow {
			w.cancel(errTooSlow)
			return
		}
		w.windowBytes, w.windowEnd = got, now+w.stall
	}
	w.timer.Reset(min(w.stall-idle, w.windowEnd-now))
}

func (w *watchdog) progress(n int) {
	if w.timer != nil {
		w.last.Store(int64(time.Since(w.start)))
		w.bytes.Add(int64(n))
	}
}

func (w *watchdog) stop() {
	w.stopped.Store(true)
	if w.timer != nil {
		w.timer.Stop()
	}
}
