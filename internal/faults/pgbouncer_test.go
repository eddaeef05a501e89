package faults

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestPgBouncerRestart(t *testing.T) {
	c := NewCluster(t)
	c.Exec(t, "CREATE TABLE b (id int)")
	b := NewPgBouncer(t, c.Host(), c.Port())
	// pgx's statement cache does not survive transaction pooling in PgBouncer 1.18.
	url := b.URL("postgres") + "&default_query_exec_mode=exec"
	top := t

	t.Run("transaction pooling", func(t *testing.T) {
		c1, c2 := connect(t, url), connect(t, url)
		p1, err := queryInt(c1, 5*time.Second, "SELECT pg_backend_pid()")
		require.NoError(t, err)
		p2, err := queryInt(c2, 5*time.Second, "SELECT pg_backend_pid()")
		require.NoError(t, err)
		require.Equal(t, p1, p2, "two clients, one after the other, share the server connection")
		require.NoError(t, execSQL(c1, "INSERT INTO b VALUES (0)"))
	})

	t.Run("SIGTERM", func(t *testing.T) {
		idle, inTx := connect(t, url), connect(t, url)
		require.NoError(t, execSQL(idle, "SELECT 1"))
		require.NoError(t, execSQL(inTx, "BEGIN"))
		require.NoError(t, execSQL(inTx, "INSERT INTO b VALUES (1)"))
		pid := b.PID()
		took, err := timed(func() error { b.Stop(t, syscall.SIGTERM); return nil })
		require.NoError(t, err)
		require.Less(t, took, 2*time.Second, "SIGTERM does not wait for the open transaction")
		t.Logf("SIGTERM with a transaction open: exited in %v", took)
		errIdle, errTx := execSQL(idle, "SELECT 1"), execSQL(inTx, "COMMIT")
		require.Error(t, errIdle)
		require.Error(t, errTx)
		t.Logf("idle client: %v; client in transaction: %v", errIdle, errTx)
		b.Start(t)
		require.NotEqual(t, pid, b.PID())
		conn := connect(t, url)
		n, err := queryInt(conn, 5*time.Second, "SELECT count(*) FROM b WHERE id = 1")
		require.NoError(t, err)
		require.Zero(t, n, "the open transaction rolled back")
	})

	t.Run("SIGINT", func(t *testing.T) {
		idle, inTx := connect(top, url), connect(t, url)
		require.NoError(t, execSQL(idle, "SELECT 1"))
		require.NoError(t, execSQL(inTx, "BEGIN"))
		require.NoError(t, execSQL(inTx, "INSERT INTO b VALUES (2)"))
		b.Signal(t, syscall.SIGINT)
		require.False(t, b.WaitExit(700*time.Millisecond), "SIGINT waits for the open transaction")
		require.True(t, b.Running())
		// The client in a transaction goes on and commits.
		require.NoError(t, execSQL(inTx, "INSERT INTO b VALUES (3)"))
		// A client starting a new transaction meanwhile waits (paused).
		idleErr := make(chan error, 1)
		go func() { idleErr <- execSQL(idle, "SELECT 1") }()
		select {
		case err := <-idleErr:
			t.Fatalf("a new transaction ran during the safe shutdown: %v", err)
		case <-time.After(300 * time.Millisecond): // the fault's own observation window
		}
		commitAt := time.Now()
		require.NoError(t, execSQL(inTx, "COMMIT"))
		require.True(t, b.WaitExit(10*time.Second))
		t.Logf("SIGINT: exited %v after the last transaction committed", time.Since(commitAt))
		err := <-idleErr
		require.Error(t, err)
		t.Logf("client that waited during the safe shutdown: %v", err)
		require.Error(t, execSQL(inTx, "SELECT 1"), "every client connection is closed at exit")

		b.Start(t)
		conn := connect(t, url)
		n, err := queryInt(conn, 5*time.Second, "SELECT count(*) FROM b WHERE id IN (2, 3)")
		require.NoError(t, err)
		require.EqualValues(t, 2, n, "the transaction in progress committed")
	})

	t.Run("Restart", func(t *testing.T) {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
			conn := connect(t, url)
			require.NoError(t, execSQL(conn, "SELECT 1"))
			took, err := timed(func() error { b.Restart(t, sig); return nil })
			require.NoError(t, err)
			t.Logf("Restart(%v) with idle clients: %v", sig, took)
			require.Error(t, execSQL(conn, "SELECT 1"))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			require.NoError(t, connect(t, url).Ping(ctx))
			cancel()
		}
	})
}
