package faultproxy

import (
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// sleeper waits precisely: on a timerfd read through the runtime's poller, which
// wakes when the kernel timer fires (within its slack, about 50 µs), where the
// runtime's own timers may wake up to 1 ms late, and where a nanosleep(2) would hold
// its P until sysmon takes it back (up to 10 ms later when the process is idle),
// stalling the other goroutines on a machine with few cores.
type sleeper struct {
	f *os.File // nil if no timerfd could be made: time.Sleep then
}

func newSleeper() *sleeper {
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		return &sleeper{}
	}
	return &sleeper{f: os.NewFile(uintptr(fd), "timerfd")} // non-blocking: polled
}

// sleep blocks the calling goroutine (not its thread) for d.
func (s *sleeper) sleep(d time.Duration) {
	if d <= 0 {
		return
	}
	if s.f != nil {
		spec := unix.ItimerSpec{Value: unix.NsecToTimespec(d.Nanoseconds())}
		if err := unix.TimerfdSettime(int(s.f.Fd()), 0, &spec, nil); err == nil {
			var buf [8]byte
			if _, err := s.f.Read(buf[:]); err == nil {
				return
			}
		}
	}
	time.Sleep(d)
}

func (s *sleeper) close() {
	if s.f != nil {
		_ = s.f.Close()
	}
}
