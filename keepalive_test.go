package pgetl_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/sockopt"
)

// tcpDSNs returns the test database's connection string in URL and keyword/value
// form, over TCP (a Unix-socket host becomes 127.0.0.1: socket options need TCP).
func tcpDSNs(t *testing.T) (urlForm, kvForm string) {
	t.Helper()
	base, err := pgconn.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	host := base.Host
	if strings.HasPrefix(host, "/") {
		host = "127.0.0.1"
	}
	u := url.URL{Scheme: "postgres", Host: net.JoinHostPort(host, strconv.Itoa(int(base.Port))), Path: "/" + base.Database}
	q := func(s string) string { return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'" }
	kv := fmt.Sprintf("host=%s port=%d dbname=%s user=%s", q(host), base.Port, q(base.Database), q(base.User))
	if base.Password != "" {
		u.User = url.UserPassword(base.User, base.Password)
		kv += " password=" + q(base.Password)
	} else {
		u.User = url.User(base.User)
	}
	if base.TLSConfig == nil {
		u.RawQuery = "sslmode=disable"
		kv += " sslmode=disable"
	}
	return u.String(), kv
}

func withParams(connString string, kv ...string) string {
	for i := 0; i+1 < len(kv); i += 2 {
		connString = pgtest.WithParam(connString, kv[i], kv[i+1])
	}
	return connString
}

func requireLinux(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("socket options are read with Linux getsockopt")
	}
}

// pooledSocket acquires a connection and returns its socket's options and backend PID.
func pooledSocket(t *testing.T, pool *pgxpool.Pool) (sockopt.Options, uint32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer c.Release()
	o, err := sockopt.Read(c.Conn().PgConn().Conn())
	require.NoError(t, err)
	return o, c.Conn().PgConn().PID()
}

func newPool(t *testing.T, cfg *pgxpool.Config) *pgxpool.Pool {
	t.Helper()
	pool, err := pgetl.NewPoolWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

func parse(t *testing.T, connString string) *pgxpool.Config {
	t.Helper()
	cfg, err := pgetl.ParseConfig(connString)
	require.NoError(t, err)
	return cfg
}

var defaultSocket = sockopt.Options{KeepAlive: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 5, UserTimeout: 80 * time.Second}

func TestKeepaliveSocketDefaults(t *testing.T) {
	t.Parallel()
	requireLinux(t)
	urlForm, kvForm := tcpDSNs(t)
	for name, dsn := range map[string]string{"url": urlForm, "kv": kvForm} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			pool, err := pgetl.NewPool(context.Background(), dsn)
			require.NoError(t, err)
			defer pool.Close()
			o, _ := pooledSocket(t, pool)
			require.Equal(t, defaultSocket, o)
		})
	}
}

func TestKeepaliveSocketDSNKeys(t *testing.T) {
	t.Parallel()
	requireLinux(t)
	urlForm, kvForm := tcpDSNs(t)
	cases := []struct {
		name string
		kv   []string
		want sockopt.Options
	}{
		{"all", []string{"keepalives", "1", "keepalives_idle", "7", "keepalives_interval", "3", "keepalives_count", "4", "tcp_user_timeout", "12345"},
			sockopt.Options{KeepAlive: true, Idle: 7 * time.Second, Interval: 3 * time.Second, Count: 4, UserTimeout: 12345 * time.Millisecond}},
		{"some", []string{"keepalives_idle", "11"},
			sockopt.Options{KeepAlive: true, Idle: 11 * time.Second, Interval: 10 * time.Second, Count: 5, UserTimeout: 80 * time.Second}},
		{"user timeout off", []string{"tcp_user_timeout", "0"},
			sockopt.Options{KeepAlive: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 5}},
	}
	for _, tc := range cases {
		for form, base := range map[string]string{"url": urlForm, "kv": kvForm} {
			t.Run(tc.name+"/"+form, func(t *testing.T) {
				t.Parallel()
				pool := newPool(t, parse(t, withParams(base, tc.kv...)))
				o, _ := pooledSocket(t, pool)
				require.Equal(t, tc.want, o)
			})
		}
	}
	t.Run("disabled", func(t *testing.T) {
		t.Parallel()
		pool := newPool(t, parse(t, withParams(urlForm, "keepalives", "0")))
		o, _ := pooledSocket(t, pool)
		require.False(t, o.KeepAlive)
		require.Equal(t, 80*time.Second, o.UserTimeout, "TCP_USER_TIMEOUT is independent of keepalives")
	})
}

func TestKeepaliveSocketTyped(t *testing.T) {
	t.Parallel()
	requireLinux(t)
	urlForm, _ := tcpDSNs(t)
	cfg := parse(t, urlForm)
	ka := pgetl.Keepalive{Idle: 12 * time.Second, Interval: 1500 * time.Millisecond, Count: 6, UserTimeout: 9 * time.Second}
	require.NoError(t, ka.Validate())
	ka.Apply(&cfg.ConnConfig.Config)
	o, _ := pooledSocket(t, newPool(t, cfg))
	// Idle and interval are whole seconds, rounded up.
	require.Equal(t, sockopt.Options{KeepAlive: true, Idle: 12 * time.Second, Interval: 2 * time.Second, Count: 6, UserTimeout: 9 * time.Second}, o)
}

func TestKeepaliveSocketAfterRecycle(t *testing.T) {
	t.Parallel()
	requireLinux(t)
	urlForm, _ := tcpDSNs(t)
	cfg := parse(t, withParams(urlForm, "pool_max_conn_lifetime", "200ms", "pool_max_conn_lifetime_jitter", "0s",
		"pool_max_conns", "1", "keepalives_idle", "13", "tcp_user_timeout", "4321"))
	pool := newPool(t, cfg)
	want := sockopt.Options{KeepAlive: true, Idle: 13 * time.Second, Interval: 10 * time.Second, Count: 5, UserTimeout: 4321 * time.Millisecond}
	o, first := pooledSocket(t, pool)
	require.Equal(t, want, o)
	deadline := time.Now().Add(20 * time.Second)
	for {
		o, pid := pooledSocket(t, pool)
		if pid != first {
			require.Equal(t, want, o, "a connection made after recycling keeps the options")
			require.Positive(t, pool.Stat().MaxLifetimeDestroyCount())
			return
		}
		require.True(t, time.Now().Before(deadline), "backend %d was never recycled", first)
	}
}

func TestKeepaliveServerSettings(t *testing.T) {
	t.Parallel()
	require.Equal(t, []string{"tcp_keepalives_idle = 30", "tcp_keepalives_interval = 10", "tcp_keepalives_count = 5", "tcp_user_timeout = 80000"},
		pgetl.DefaultKeepalive().ServerSettings())
	require.Equal(t, []string{"tcp_keepalives_interval = 2", "tcp_user_timeout = 1"},
		pgetl.Keepalive{Interval: 1001 * time.Millisecond, UserTimeout: time.Microsecond}.ServerSettings(), "rounded up, zero fields omitted")
	require.Empty(t, pgetl.Keepalive{}.ServerSettings())
	require.Empty(t, pgetl.Keepalive{Idle: time.Second, Disable: true}.ServerSettings())

	// The settings are accepted by the server in SET LOCAL and reach its socket
	// (over TCP, SHOW reads them back from the backend's socket).
	urlForm, _ := tcpDSNs(t)
	pool := newPool(t, parse(t, urlForm))
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	ka := pgetl.Keepalive{Idle: 31 * time.Second, Interval: 11 * time.Second, Count: 4, UserTimeout: 75 * time.Second}
	for _, s := range ka.ServerSettings() {
		_, err := tx.Exec(ctx, "SET LOCAL "+s)
		require.NoError(t, err)
	}
	var idle, interval, count, userTimeout string
	require.NoError(t, tx.QueryRow(ctx, `SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),
		current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')`).Scan(&idle, &interval, &count, &userTimeout))
	require.Equal(t, []string{"31", "11", "4", "75000"}, []string{idle, interval, count, userTimeout})
}

func TestKeepaliveValidate(t *testing.T) {
	t.Parallel()
	require.NoError(t, pgetl.DefaultKeepalive().Validate())
	require.NoError(t, pgetl.Keepalive{}.Validate())
	for _, tc := range []struct {
		ka    pgetl.Keepalive
		field string
	}{
		{pgetl.Keepalive{Idle: -time.Second}, "Keepalive.Idle"},
		{pgetl.Keepalive{Interval: 40000 * time.Second}, "Keepalive.Interval"},
		{pgetl.Keepalive{Count: 128}, "Keepalive.Count"},
		{pgetl.Keepalive{Count: -1}, "Keepalive.Count"},
		{pgetl.Keepalive{UserTimeout: -time.Millisecond}, "Keepalive.UserTimeout"},
	} {
		err := tc.ka.Validate()
		var ce *pgetl.ConfigError
		require.ErrorAs(t, err, &ce)
		require.Equal(t, tc.field, ce.Key)
		require.True(t, strings.HasPrefix(err.Error(), "pgetl: "+tc.field+"="), err.Error())
	}
}

// TestKeepaliveUnixSocket checks that the dialer leaves Unix sockets alone
// (setting TCP options on them would fail the dial).
func TestKeepaliveUnixSocket(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if c, err := ln.Accept(); err == nil {
			_ = c.Close()
		}
	}()
	var cfg pgconn.Config
	pgetl.DefaultKeepalive().Apply(&cfg)
	c, err := cfg.DialFunc(context.Background(), "unix", path)
	require.NoError(t, err)
	require.NoError(t, c.Close())
	<-done
}

// TestKeepaliveApplyDialTimeout checks that Apply keeps ConnectTimeout on the dialer.
func TestKeepaliveApplyDialTimeout(t *testing.T) {
	t.Parallel()
	cfg := pgconn.Config{ConnectTimeout: time.Nanosecond}
	pgetl.DefaultKeepalive().Apply(&cfg)
	// 192.0.2.1 (TEST-NET-1) never answers; the dial must end by the timeout.
	_, err := cfg.DialFunc(context.Background(), "tcp", "192.0.2.1:5432")
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "got %v", err)
}
