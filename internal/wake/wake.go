// Package wake tells goroutines waiting on shared state that it changed.
// Unlike sync.Cond, a waiter selects on a channel, so it can give up when
// its context ends.
package wake

// Signal is a broadcast of "changed". Its methods must be called with the
// lock held that guards the state it announces; its zero value is ready.
type Signal struct {
	ch chan struct{}
}

// C returns a channel closed at the next Broadcast. A waiter takes it,
// releases the lock, and waits on it.
func (s *Signal) C() <-chan struct{} {
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

// Broadcast wakes every goroutine waiting on a channel from C. Without
// waiters it costs nothing.
func (s *Signal) Broadcast() {
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
}
