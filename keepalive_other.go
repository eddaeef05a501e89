//go:build !linux

package pgetl

import "syscall"

// userTimeoutControl returns nil: TCP_USER_TIMEOUT is Linux-only, so
// Keepalive.UserTimeout has no effect on the client socket elsewhere.
func userTimeoutControl(int64) func(network, address string, c syscall.RawConn) error {
	return nil
}
