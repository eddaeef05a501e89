// Package sockopt reads the TCP liveness options of a live connection's socket
// (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT) with
// getsockopt, so tests and diagnostics can show what the kernel actually uses
// rather than what was asked for.
package sockopt

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"
)

// ErrUnsupported is returned by Read where reading the options is not
// implemented (operating systems other than Linux) or the connection has no
// socket (net.Pipe, a wrapper that hides it).
var ErrUnsupported = errors.New("sockopt: reading socket options is not supported here")

// Options are a TCP socket's liveness settings as the kernel reports them.
type Options struct {
	KeepAlive   bool          // SO_KEEPALIVE
	Idle        time.Duration // TCP_KEEPIDLE
	Interval    time.Duration // TCP_KEEPINTVL
	Count       int           // TCP_KEEPCNT
	UserTimeout time.Duration // TCP_USER_TIMEOUT; 0 = the kernel's default
}

// String formats o on one line, e.g. "keepalive=on idle=30s interval=10s count=5 user_timeout=1m20s".
func (o Options) String() string {
	ka := "off"
	if o.KeepAlive {
		ka = "on"
	}
	return fmt.Sprintf("keepalive=%s idle=%s interval=%s count=%d user_timeout=%s",
		ka, o.Idle, o.Interval, o.Count, o.UserTimeout)
}

// Read returns the options of c's socket. c may be a *tls.Conn (or anything with
// a NetConn method), which is unwrapped; the underlying connection must
// implement syscall.Conn.
func Read(c net.Conn) (Options, error) {
	for {
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = u.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return Options{}, fmt.Errorf("%w: %T has no file descriptor", ErrUnsupported, c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return Options{}, fmt.Errorf("sockopt: %w", err)
	}
	var o Options
	var gerr error
	if err := raw.Control(func(fd uintptr) { o, gerr = read(fd) }); err != nil {
		return Options{}, fmt.Errorf("sockopt: %w", err)
	}
	return o, gerr
}
