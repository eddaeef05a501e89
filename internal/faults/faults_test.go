package faults

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// connect opens a pgx connection to connString (5 s connect timeout), closed in
// t.Cleanup.
func connect(t testing.TB, connString string) *pgx.Conn {
	t.Helper()
	conn, err := tryConnect(connString, 5*time.Second)
	require.NoError(t, err, "connect %s", connString)
	t.Cleanup(func() { closeQuietly(conn) })
	return conn
}

func tryConnect(connString string, timeout time.Duration) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	cfg.ConnectTimeout = timeout
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return pgx.ConnectConfig(ctx, cfg)
}

// queryInt runs sql on conn within timeout and returns its single integer.
func queryInt(conn *pgx.Conn, timeout time.Duration, sql string, args ...any) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var n int64
	err := conn.QueryRow(ctx, sql, args...).Scan(&n)
	return n, err
}

// timed runs f and returns its error and duration.
func timed(f func() error) (time.Duration, error) {
	start := time.Now()
	err := f()
	return time.Since(start), err
}
