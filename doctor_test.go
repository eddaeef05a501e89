package pgetl_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
)

// holdIdleInTransaction opens a connection named app, runs BEGIN; SELECT 1 and
// leaves the transaction open: a real idle-in-transaction session. The connection
// is closed at cleanup.
func holdIdleInTransaction(t *testing.T, url, app string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgtest.WithParam(url, "application_name", app))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	_, err = conn.Exec(ctx, "BEGIN")
	require.NoError(t, err)
	var one int
	require.NoError(t, conn.QueryRow(ctx, "SELECT 1").Scan(&one))
	return conn
}

// waitFor polls cond every 20 ms until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond) // polling interval, not a wait for a condition
	}
}

func findBackend(bs []pgetl.Backend, pid uint32) (pgetl.Backend, bool) {
	i := slices.IndexFunc(bs, func(b pgetl.Backend) bool { return b.PID == int32(pid) })
	if i < 0 {
		return pgetl.Backend{}, false
	}
	return bs[i], true
}

func TestDoctorIdleInTransaction(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	app := db.Schema + "_held"
	held := holdIdleInTransaction(t, db.BaseURL, app)
	pid := held.PgConn().PID()

	// A clean session, idle outside any transaction, in the same database.
	clean, err := pgx.Connect(ctx, pgtest.WithParam(db.BaseURL, "application_name", db.Schema+"_clean"))
	require.NoError(t, err)
	defer clean.Close(context.Background())
	_, err = clean.Exec(ctx, "SELECT 1")
	require.NoError(t, err)

	t.Run("Listed", func(t *testing.T) {
		bs, err := pgetl.IdleInTransaction(ctx, db.Pool, 0)
		require.NoError(t, err)
		b, ok := findBackend(bs, pid)
		require.True(t, ok, "backend %d not listed in %+v", pid, bs)
		require.Equal(t, app, b.ApplicationName)
		require.Equal(t, "idle in transaction", b.State)
		require.Equal(t, "SELECT 1", b.Query)
		require.False(t, b.XactStart.IsZero())
		require.GreaterOrEqual(t, b.StateAge, time.Duration(0))
		require.GreaterOrEqual(t, b.XactAge, b.StateAge)
		_, ok = findBackend(bs, clean.PgConn().PID())
		require.False(t, ok, "a session idle outside a transaction is listed")
	})

	t.Run("OlderThan", func(t *testing.T) {
		// Listed once it has been idle longer than the threshold, not before.
		bs, err := pgetl.IdleInTransaction(ctx, db.Pool, time.Hour)
		require.NoError(t, err)
		_, ok := findBackend(bs, pid)
		require.False(t, ok, "listed although idle for less than an hour")
		waitFor(t, 10*time.Second, "the session to be idle for 200ms", func() bool {
			bs, err := pgetl.IdleInTransaction(ctx, db.Pool, 200*time.Millisecond)
			require.NoError(t, err)
			b, ok := findBackend(bs, pid)
			if ok {
				require.GreaterOrEqual(t, b.StateAge, 200*time.Millisecond)
			}
			return ok
		})
	})
}

func TestDoctorTerminateBackends(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	held := holdIdleInTransaction(t, db.BaseURL, db.Schema+"_held")
	pid := held.PgConn().PID()
	bs, err := pgetl.IdleInTransaction(ctx, db.Pool, 0)
	require.NoError(t, err)
	b, ok := findBackend(bs, pid)
	require.True(t, ok)

	// A stale listing (another transaction of that pid) terminates nothing.
	stale := b
	stale.XactStart = b.XactStart.Add(-time.Second)
	done, err := pgetl.TerminateBackends(ctx, db.Pool, []pgetl.Backend{stale})
	require.NoError(t, err)
	require.Empty(t, done)
	var one int
	require.NoError(t, held.QueryRow(ctx, "SELECT 1").Scan(&one), "a stale listing ended the session")

	// Listed again (its state changed with that query) and terminated.
	bs, err = pgetl.IdleInTransaction(ctx, db.Pool, 0)
	require.NoError(t, err)
	b, ok = findBackend(bs, pid)
	require.True(t, ok)
	done, err = pgetl.TerminateBackends(ctx, db.Pool, []pgetl.Backend{b})
	require.NoError(t, err)
	require.Equal(t, []int32{int32(pid)}, done)

	waitFor(t, 10*time.Second, fmt.Sprintf("backend %d to exit", pid), func() bool {
		return db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", int32(pid)) == 0
	})
	_, err = held.Exec(ctx, "SELECT 1")
	require.Error(t, err, "the terminated session can still run queries")

	done, err = pgetl.TerminateBackends(ctx, db.Pool, nil)
	require.NoError(t, err)
	require.Empty(t, done)
}
