package sockopt

import (
	"errors"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRead(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("getsockopt reader is Linux only")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	d := net.Dialer{KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 7 * time.Second, Interval: 3 * time.Second, Count: 4}}
	c, err := d.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	if s := <-accepted; s != nil {
		defer s.Close()
	}
	o, err := Read(c)
	require.NoError(t, err)
	require.Equal(t, Options{KeepAlive: true, Idle: 7 * time.Second, Interval: 3 * time.Second, Count: 4}, o)
	require.Equal(t, "keepalive=on idle=7s interval=3s count=4 user_timeout=0s", o.String())
}

func TestReadNoSocket(t *testing.T) {
	t.Parallel()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	_, err := Read(a)
	require.True(t, errors.Is(err, ErrUnsupported), "got %v", err)
}
