//go:build linux

package pgetl

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// userTimeoutControl returns a net.Dialer Control function that sets
// TCP_USER_TIMEOUT to ms milliseconds on TCP sockets before they connect.
func userTimeoutControl(ms int64) func(network, address string, c syscall.RawConn) error {
	return func(network, _ string, c syscall.RawConn) error {
		switch network {
		case "tcp", "tcp4", "tcp6":
		default:
			return nil
		}
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(ms))
		}); err != nil {
			return fmt.Errorf("pgetl: set TCP_USER_TIMEOUT: %w", err)
		}
		if serr != nil {
			return fmt.Errorf("pgetl: set TCP_USER_TIMEOUT=%dms: %w", ms, serr)
		}
		return nil
	}
}
