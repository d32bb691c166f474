package wake

import "testing"

func TestBroadcastWakesEveryWaiterOnce(t *testing.T) {
	var s Signal
	a, b := s.C(), s.C()
	if a != b {
		t.Fatal("two waiters before a broadcast got different channels")
	}
	s.Broadcast()
	for _, c := range []<-chan struct{}{a, b} {
		select {
		case <-c:
		default:
			t.Fatal("a waiter was not woken")
		}
	}
	next := s.C()
	select {
	case <-next:
		t.Fatal("a waiter after the broadcast is woken by it")
	default:
	}
	s.Broadcast()
	s.Broadcast() // no waiters: nothing to close twice
	<-next
}
