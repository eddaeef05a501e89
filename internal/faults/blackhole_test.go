package faults

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// userTimeoutDialer dials with TCP_USER_TIMEOUT set: the kernel aborts the
// connection when sent data stays unacknowledged that long.
func userTimeoutDialer(timeout time.Duration) *net.Dialer {
	return &net.Dialer{
		Timeout: 5 * time.Second,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(timeout.Milliseconds()))
			})
			return errors.Join(err, serr)
		},
	}
}

func connectUserTimeout(t *testing.T, url string, timeout time.Duration) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(url)
	require.NoError(t, err)
	cfg.DialFunc = userTimeoutDialer(timeout).DialContext
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { closeQuietly(conn) })
	return conn
}

func TestBlackHole(t *testing.T) {
	if !InNetNS(t) {
		RunInNetNS(t)
		return
	}
	c := NewCluster(t)
	conn := connectUserTimeout(t, c.URL(), 3*time.Second)
	require.NoError(t, execSQL(conn, "SELECT 1"))

	restore := c.BlackHole(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	took, err := timed(func() error { _, err := conn.Exec(ctx, "SELECT 1"); return err })
	require.Error(t, err)
	require.NoError(t, ctx.Err(), "the kernel, not the context, ended the query")
	require.GreaterOrEqual(t, took, 3*time.Second)
	require.Less(t, took, 6*time.Second, "detected within TCP_USER_TIMEOUT + margin")
	t.Logf("black hole detected with TCP_USER_TIMEOUT 3s after %v: %v (%T; ETIMEDOUT: %v; unexpected EOF: %v; conn closed: %v)",
		took, err, err, errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, io.ErrUnexpectedEOF), conn.IsClosed())

	_, err = tryConnect(c.URL(), time.Second)
	require.Error(t, err, "new connections cannot get through")

	restore()
	restore() // idempotent
	conn = connectUserTimeout(t, c.URL(), 3*time.Second)
	require.NoError(t, execSQL(conn, "SELECT 1"))
}

func TestBlackHoleRefusedOnHost(t *testing.T) {
	if InNetNS(t) {
		t.Fatal("not meant to run in a namespace")
	}
	require.Error(t, checkPrivateNetNS(), "the test process is in the host's namespace")
}
