// Package refmap holds values that are opened once per key, shared by
// every holder, and closed when the last holder lets go: the lifetime of a
// node-wide lazy layer, a cached blob or a registry login.
//
// The rules, in one place:
//   - Acquire of a key that is open takes another reference.
//   - Acquire of a key that is being opened waits for that open (single
//     flight). If the open failed only because its caller's context ended,
//     a waiter whose own context is alive opens the key itself instead of
//     inheriting an error that is not its own.
//   - Acquire of a key that is being closed waits until it is closed, then
//     opens it anew: a value is never handed out while it is closing.
//   - The last Release closes the value, outside the map's lock. A
//     reference may be released after a delay (ReleaseAfter, the linger
//     time of a warmed layer); Close cuts every such delay short.
package refmap

import (
	"context"
	"errors"
	"sync"
	"time"
)

// ErrClosed is returned by Acquire after Close.
var ErrClosed = errors.New("refmap: closed")

// Map is a set of shared values by key. The zero value is not usable:
// make one with New.
type Map[K comparable, V any] struct {
	close func(K, V)

	mu      sync.Mutex // guards everything below and every entry's fields
	entries map[K]*entry[V]
	delayed map[*time.Timer]func() // ReleaseAfter timers not yet fired
	closed  bool
}

type entry[V any] struct {
	refs    int
	ready   chan struct{} // closed when the open has finished
	v       V             // after ready, when err is nil
	err     error
	closing chan struct{} // non-nil from the last release; closed once closed
}

// New returns an empty Map whose values are closed with closeFn (called
// without any lock held, at most once per successful open).
func New[K comparable, V any](closeFn func(K, V)) *Map[K, V] {
	return &Map[K, V]{
		close:   closeFn,
		entries: make(map[K]*entry[V]),
		delayed: make(map[*time.Timer]func()),
	}
}

// Ref is one reference to an open value.
type Ref[K comparable, V any] struct {
	m    *Map[K, V]
	key  K
	v    V
	once sync.Once
}

// Value is the shared value.
func (r *Ref[K, V]) Value() V { return r.v }

// Key is the value's key.
func (r *Ref[K, V]) Key() K { return r.key }

// Release gives the reference back; the last one closes the value. Only
// the first call of a Ref counts.
func (r *Ref[K, V]) Release() {
	r.once.Do(func() { r.m.release(r.key) })
}

// ReleaseAfter keeps the reference for d, then releases it; Close of the
// Map releases it at once.
func (r *Ref[K, V]) ReleaseAfter(d time.Duration) {
	r.m.mu.Lock()
	if r.m.closed {
		r.m.mu.Unlock()
		r.Release()
		return
	}
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		r.m.mu.Lock()
		_, pending := r.m.delayed[t]
		delete(r.m.delayed, t)
		r.m.mu.Unlock()
		if pending {
			r.Release()
		}
	})
	r.m.delayed[t] = r.Release
	r.m.mu.Unlock()
}

// Acquire returns a reference to the value of key, opening it with open
// if it is not open. open runs with ctx, without any lock held; an error
// it returns is returned to this caller and to waiters whose own context
// is still alive only if it is not ctx's own cancellation.
func (m *Map[K, V]) Acquire(ctx context.Context, key K, open func(context.Context) (V, error)) (*Ref[K, V], error) {
	for {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return nil, ErrClosed
		}
		e := m.entries[key]
		if e != nil && e.closing != nil {
			closing := e.closing
			m.mu.Unlock()
			select {
			case <-closing:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if e == nil {
			e = &entry[V]{refs: 1, ready: make(chan struct{})}
			m.entries[key] = e
			m.mu.Unlock()
			v, err := open(ctx)
			m.mu.Lock()
			e.v, e.err = v, err
			close(e.ready)
			m.mu.Unlock()
			if err != nil {
				m.release(key)
				return nil, err
			}
			return &Ref[K, V]{m: m, key: key, v: v}, nil
		}
		e.refs++
		m.mu.Unlock()
		select {
		case <-e.ready:
		case <-ctx.Done():
			m.release(key)
			return nil, ctx.Err()
		}
		if e.err != nil {
			m.release(key)
			if isContextErr(e.err) && ctx.Err() == nil {
				continue // the opener gave up; this caller has not
			}
			return nil, e.err
		}
		return &Ref[K, V]{m: m, key: key, v: e.v}, nil
	}
}

func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// release drops a reference to key; the last one closes its value and
// removes the entry, so that the next Acquire opens it anew.
func (m *Map[K, V]) release(key K) {
	m.mu.Lock()
	e := m.entries[key]
	e.refs--
	if e.refs > 0 {
		m.mu.Unlock()
		return
	}
	e.closing = make(chan struct{})
	m.mu.Unlock()
	<-e.ready // the opener holds a reference until its open has finished
	if e.err == nil {
		m.close(key, e.v)
	}
	m.mu.Lock()
	delete(m.entries, key)
	close(e.closing)
	m.mu.Unlock()
}

// Refs is how many references to key are held, or awaited by Acquires
// waiting for its open.
func (m *Map[K, V]) Refs(key K) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[key]; e != nil && e.closing == nil {
		return e.refs
	}
	return 0
}

// Open lists the keys whose values are open and not closing.
func (m *Map[K, V]) Open() []K {
	m.mu.Lock()
	defer m.mu.Unlock()
	var keys []K
	for k, e := range m.entries {
		select {
		case <-e.ready:
			if e.err == nil && e.closing == nil {
				keys = append(keys, k)
			}
		default:
		}
	}
	return keys
}

// Close makes every later Acquire fail with ErrClosed and releases the
// references kept by ReleaseAfter now. References held elsewhere stay
// valid until released.
func (m *Map[K, V]) Close() {
	m.mu.Lock()
	m.closed = true
	var now []func()
	for t, release := range m.delayed {
		t.Stop() // if it fired already, it finds itself gone and does nothing
		now = append(now, release)
		delete(m.delayed, t)
	}
	m.mu.Unlock()
	for _, release := range now {
		release()
	}
}
