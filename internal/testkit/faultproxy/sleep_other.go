//go:build !linux

package faultproxy

import "time"

// sleeper waits with time.Sleep off Linux: as precise as the runtime's timers.
type sleeper struct{}

func newSleeper() *sleeper { return &sleeper{} }

func (*sleeper) sleep(d time.Duration) { time.Sleep(d) }

func (*sleeper) close() {}
