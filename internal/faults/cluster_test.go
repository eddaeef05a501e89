package faults

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func execSQL(conn *pgx.Conn, sql string, args ...any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := conn.Exec(ctx, sql, args...)
	return err
}

func TestClusterRestartStopCrash(t *testing.T) {
	start := time.Now()
	c := NewCluster(t, ClusterSetting("tcp_keepalives_idle", "7"))
	t.Logf("cluster up in %v", time.Since(start))
	conn := connect(t, c.URL())
	n, err := queryInt(conn, 5*time.Second, "SELECT current_setting('tcp_keepalives_idle')::int")
	require.NoError(t, err)
	require.EqualValues(t, 7, n)
	var listen string
	require.NoError(t, conn.QueryRow(context.Background(), "SHOW listen_addresses").Scan(&listen))
	require.Equal(t, "127.0.0.1", listen)
	c.Exec(t, "CREATE TABLE rows (id int)")
	c.Exec(t, "INSERT INTO rows VALUES (1)")
	top := t // connections that outlive a subtest

	t.Run("restart fast", func(t *testing.T) {
		pid := c.PID()
		took, err := timed(func() error { c.Restart(t); return nil })
		require.NoError(t, err)
		t.Logf("restart -m fast: %v", took)
		require.NotEqual(t, pid, c.PID())
		err = execSQL(conn, "SELECT 1")
		require.Error(t, err, "the old session was terminated")
		t.Logf("old session after restart: %v", err)
		conn = connect(top, c.URL())
		require.NoError(t, execSQL(conn, "INSERT INTO rows VALUES (2)"))
	})

	t.Run("stop immediate", func(t *testing.T) {
		c.StopImmediate(t)
		require.Zero(t, c.PID())
		require.Error(t, execSQL(conn, "SELECT 1"))
		_, err := tryConnect(c.URL(), time.Second)
		require.Error(t, err, "connection refused while stopped")
		t.Logf("connect while stopped: %v", err)
		took, err := timed(func() error { c.Start(t); return nil })
		require.NoError(t, err)
		t.Logf("start after immediate stop (crash recovery): %v", took)
		conn = connect(top, c.URL())
		n, err := queryInt(conn, 5*time.Second, "SELECT count(*) FROM rows")
		require.NoError(t, err)
		require.EqualValues(t, 2, n, "committed rows survive an immediate stop")
	})

	t.Run("crash", func(t *testing.T) {
		other := connect(t, c.URL())
		require.NoError(t, execSQL(other, "SELECT 1"))
		var pid int
		require.NoError(t, conn.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid))
		pm := c.PID()
		took, err := timed(func() error { c.CrashBackend(t, pid); return nil })
		require.NoError(t, err)
		t.Logf("SIGKILL of backend %d to ready again: %v", pid, took)
		require.Equal(t, pm, c.PID(), "the postmaster survives a backend crash")
		err = execSQL(other, "SELECT 1")
		require.Error(t, err, "every other session is terminated by the crash reinit")
		t.Logf("other session after crash: %v", err)

		conn = connect(top, c.URL())
		require.NoError(t, execSQL(conn, "SELECT 1"))
		c.Crash(t)
		require.Error(t, execSQL(conn, "SELECT 1"))
		conn = connect(top, c.URL())
		n, err := queryInt(conn, 5*time.Second, "SELECT count(*) FROM rows")
		require.NoError(t, err)
		require.EqualValues(t, 2, n)
	})
}

func TestClusterReadOnly(t *testing.T) {
	c := NewCluster(t)
	c.Exec(t, "CREATE TABLE ro (id int)")
	idle := connect(t, c.URL())
	require.NoError(t, execSQL(idle, "SELECT 1"))
	inTx := connect(t, c.URL())
	require.NoError(t, execSQL(inTx, "BEGIN"))
	require.NoError(t, execSQL(inTx, "INSERT INTO ro VALUES (1)"))

	c.SetReadOnly(t, true)
	// An existing idle session applies the reload before its next statement.
	err := execSQL(idle, "INSERT INTO ro VALUES (2)")
	require.Equal(t, pgerrcode.ReadOnlySQLTransaction, sqlState(err), "%v", err)
	// A transaction open before keeps its read/write mode until it ends...
	require.NoError(t, execSQL(inTx, "INSERT INTO ro VALUES (3)"))
	require.NoError(t, execSQL(inTx, "COMMIT"))
	// ...and the session's next transaction is read-only.
	err = execSQL(inTx, "INSERT INTO ro VALUES (4)")
	require.Equal(t, pgerrcode.ReadOnlySQLTransaction, sqlState(err), "%v", err)
	fresh := connect(t, c.URL())
	err = execSQL(fresh, "INSERT INTO ro VALUES (5)")
	require.Equal(t, pgerrcode.ReadOnlySQLTransaction, sqlState(err), "%v", err)
	n, err := queryInt(fresh, 5*time.Second, "SELECT count(*) FROM ro")
	require.NoError(t, err, "reads still work")
	require.EqualValues(t, 2, n)

	c.SetReadOnly(t, false)
	require.NoError(t, execSQL(idle, "INSERT INTO ro VALUES (6)"))
	require.NoError(t, execSQL(fresh, "INSERT INTO ro VALUES (7)"))
}
