//go:build unix

package faultproxy

import (
	"syscall"
	"time"
)

// sleepPrecise blocks the calling goroutine's thread for d with nanosleep(2), which
// wakes within the kernel's timer slack (about 50 µs) rather than the runtime
// poller's millisecond. Meant for short waits (a few ms at most): the thread is
// blocked and the wait cannot be interrupted.
func sleepPrecise(d time.Duration) {
	ts := syscall.NsecToTimespec(d.Nanoseconds())
	for {
		var rem syscall.Timespec
		if err := syscall.Nanosleep(&ts, &rem); err != syscall.EINTR {
			return
		}
		ts = rem
	}
}
