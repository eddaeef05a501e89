package faults

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// FreePort returns a TCP port of 127.0.0.1 that was free a moment ago (it listens on
// port 0 and closes). Another process may take it before the caller binds it: callers
// that start servers retry with a new port when the bind fails.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("faults: free port: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatalf("faults: free port: %v", err)
	}
	return port
}

// TCPAddr returns the host:port a connection string reaches over TCP, for use as a
// Proxy's upstream. Unix-socket hosts (libpq defaults often resolve to one) are
// replaced by 127.0.0.1 with the same port.
func TCPAddr(t testing.TB, connString string) string {
	t.Helper()
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		t.Fatalf("faults: parse %q: %v", connString, err)
	}
	cands := append([]*pgconn.FallbackConfig{{Host: cfg.Host, Port: cfg.Port}}, cfg.Fallbacks...)
	for _, c := range cands {
		if !strings.HasPrefix(c.Host, "/") {
			return net.JoinHostPort(c.Host, strconv.Itoa(int(c.Port)))
		}
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(cfg.Port)))
}
