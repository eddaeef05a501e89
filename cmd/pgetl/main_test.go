package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// runDoctor runs the doctor in-process with stdin and returns its exit status and
// output.
func runDoctor(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code := run(ctx, append([]string{"doctor"}, args...), strings.NewReader(stdin), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// holdIdleInTransaction opens a session named app that runs BEGIN; SELECT 1 and
// then does nothing, closed at cleanup.
func holdIdleInTransaction(t *testing.T, url, app string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgtest.WithParam(url, "application_name", app))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	_, err = conn.Exec(ctx, "BEGIN")
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "SELECT 1")
	require.NoError(t, err)
	return conn
}

func TestDoctor(t *testing.T) {
	t.Parallel()
	base := pgtest.URL(t)
	code, out, errOut := runDoctor(t, "", "-dsn", base, "-older-than", "1h")
	require.Contains(t, []int{exitOK, exitWarnings}, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Empty(t, errOut)
	require.Contains(t, out, "pgetl doctor: host=")
	require.Regexp(t, `(?m)^OK    client keepalive     (Unix socket|first probe after 30s idle)`, out)
	require.Regexp(t, `(?m)^OK    pooler               none detected \(client and server agree on the backend pid \d+\)`, out)
	require.Regexp(t, `(?m)^(OK|WARN)  idle-in-xact timeout `, out)
	require.Regexp(t, `(?m)^OK    idle session `, out)
	require.Regexp(t, `(?m)^OK    statement timeout `, out)
	require.Contains(t, out, "OK    idle in transaction  no session idle in transaction for more than 1h0m0s")
	if code == exitWarnings {
		require.Contains(t, out, "WARN")
	}

	t.Run("MiddleboxShorterThanKeepalive", func(t *testing.T) {
		t.Parallel()
		code, out, _ := runDoctor(t, "", "-dsn", base, "-middlebox-idle", "20s", "-older-than", "1h")
		if strings.Contains(out, "Unix socket") {
			require.Contains(t, []int{exitOK, exitWarnings}, code)
			return
		}
		require.Equal(t, exitWarnings, code)
		require.Contains(t, out, "WARN  client keepalive     first probe after 30s idle, not before the middleboxes' 20s")
	})
	t.Run("BadFlags", func(t *testing.T) {
		t.Parallel()
		code, _, errOut := runDoctor(t, "", "-middlebox-idle", "0s")
		require.Equal(t, exitError, code)
		require.Contains(t, errOut, "pgetl doctor:")
	})
	t.Run("Unreachable", func(t *testing.T) {
		t.Parallel()
		code, out, errOut := runDoctor(t, "", "-dsn", "postgres://etl:sekret@127.0.0.1:1/db?connect_timeout=5")
		require.Equal(t, exitError, code)
		require.Empty(t, out)
		require.Regexp(t, `^pgetl doctor: cannot connect to host=127\.0\.0\.1 port=1 user=etl database=db: .*connection refused.*\n$`, errOut)
		require.NotContains(t, errOut, "sekret")
	})
	t.Run("UnknownCommand", func(t *testing.T) {
		t.Parallel()
		var stdout, stderr bytes.Buffer
		require.Equal(t, exitError, run(context.Background(), []string{"docter"}, strings.NewReader(""), &stdout, &stderr))
		require.Contains(t, stderr.String(), `unknown command "docter"`)
	})
}

func TestDoctorPgBouncer(t *testing.T) {
	t.Parallel()
	url := pgtest.PgBouncerURL(t)
	code, out, errOut := runDoctor(t, "", "-dsn", url, "-older-than", "1h")
	require.Equal(t, exitWarnings, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, `WARN  pooler               transaction pooler detected`)
	require.Contains(t, out, "add pgetl_pooler=pgbouncer to the connection string")

	code, out, errOut = runDoctor(t, "", "-dsn", pgtest.WithParam(url, "pgetl_pooler", "pgbouncer"), "-older-than", "1h")
	require.Contains(t, []int{exitOK, exitWarnings}, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, `OK    pooler               transaction pooler detected`)
	require.Contains(t, out, `exec mode "cache describe" works behind it`)
}

func TestDoctorTerminate(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	held := holdIdleInTransaction(t, db.BaseURL, db.Schema+"_held")
	other := holdIdleInTransaction(t, db.BaseURL, "other_"+db.Schema) // outside -app
	pid := held.PgConn().PID()
	args := []string{"-dsn", db.BaseURL, "-older-than", "0s", "-app", db.Schema + "%", "-terminate"}

	// Declined: listed, nothing ended.
	code, out, errOut := runDoctor(t, "n\n", args...)
	require.Equal(t, exitWarnings, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, fmt.Sprintf("WARN  idle in transaction  1 session(s) with application_name LIKE %q idle in transaction", db.Schema+"%"))
	require.Regexp(t, fmt.Sprintf(`(?m)^      %-8d %s`, pid, db.Schema+"_held"), out)
	require.Contains(t, out, "SELECT 1")
	require.Contains(t, out, "End these 1 session(s)? Their transactions roll back. [y/N]")
	require.Contains(t, out, "nothing terminated")
	_, err := held.Exec(ctx, "SELECT 1")
	require.NoError(t, err, "declined, yet the session was ended")

	// -yes: ended without asking.
	code, out, errOut = runDoctor(t, "", append(args, "-yes")...)
	require.NotEqual(t, exitError, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.NotContains(t, out, "[y/N]")
	require.Contains(t, out, fmt.Sprintf("terminated pid %d\n", pid))
	require.Contains(t, out, "OK    idle in transaction  1 session(s) terminated")
	require.Zero(t, db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", int32(pid)))
	_, err = held.Exec(ctx, "SELECT 1")
	require.Error(t, err, "the terminated session still runs queries")

	// The session outside the pattern is untouched.
	_, err = other.Exec(ctx, "SELECT 1")
	require.NoError(t, err)
}

func TestLikeMatch(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		p, s string
		want bool
	}{
		{"pgetl %", "pgetl products#3.ab12cd", true},
		{"pgetl %", "psql", false},
		{"%", "", true},
		{"a_c", "abc", true},
		{"a_c", "abbc", false},
		{`100\%`, "100%", true},
		{`100\%`, "1000", false},
		{"a/%", "a/b/c", true},
		{"%held", "t_x_held", true},
	} {
		require.Equal(t, c.want, likeMatch(c.p, c.s), "%q LIKE %q", c.s, c.p)
	}
}
