//go:build linux

package sockopt

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

func read(fd uintptr) (Options, error) {
	get := func(level, opt int, name string) (int, error) {
		v, err := unix.GetsockoptInt(int(fd), level, opt)
		if err != nil {
			return 0, fmt.Errorf("sockopt: getsockopt %s: %w", name, err)
		}
		return v, nil
	}
	var o Options
	v, err := get(unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE")
	if err != nil {
		return o, err
	}
	o.KeepAlive = v != 0
	if v, err = get(unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, "TCP_KEEPIDLE"); err != nil {
		return o, err
	}
	o.Idle = time.Duration(v) * time.Second
	if v, err = get(unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, "TCP_KEEPINTVL"); err != nil {
		return o, err
	}
	o.Interval = time.Duration(v) * time.Second
	if o.Count, err = get(unix.IPPROTO_TCP, unix.TCP_KEEPCNT, "TCP_KEEPCNT"); err != nil {
		return o, err
	}
	if v, err = get(unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"); err != nil {
		return o, err
	}
	o.UserTimeout = time.Duration(v) * time.Millisecond
	return o, nil
}
