package faults

import (
	"testing"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/stretchr/testify/require"
)

// TestStandbyFailover plays the failover the kit is for: a standby streams, the
// link is cut, the primary acknowledges a commit the standby never receives, the
// primary stops (-m immediate), the standby is promoted and has lost that commit.
func TestStandbyFailover(t *testing.T) {
	t.Parallel()
	start := time.Now()
	primary := NewCluster(t)
	sb := NewStandby(t, primary)
	require.NotEqual(t, primary.Port(), sb.Port())
	require.NotEqual(t, primary.DataDir(), sb.DataDir())
	t.Logf("primary and streaming standby up in %v", time.Since(start).Round(time.Millisecond))

	pconn := connect(t, primary.URL())
	sconn := connect(t, sb.URL())
	count := func() int64 {
		t.Helper()
		n, err := queryInt(sconn, 5*time.Second, "SELECT count(*) FROM rows")
		require.NoError(t, err)
		return n
	}

	require.NoError(t, execSQL(pconn, "CREATE TABLE rows (id int)"))
	require.NoError(t, execSQL(pconn, "INSERT INTO rows VALUES (1)"))
	sb.WaitCaughtUp(t)
	require.EqualValues(t, 1, count(), "replicated")
	err := execSQL(sconn, "INSERT INTO rows VALUES (99)")
	require.Equal(t, pgerrcode.ReadOnlySQLTransaction, sqlState(err), "a hot standby refuses writes: %v", err)

	t.Run("cut and reconnect", func(t *testing.T) {
		sb.CutLink(t)
		require.NoError(t, execSQL(pconn, "INSERT INTO rows VALUES (2)"))
		// The walreceiver is gone (CutLink waited for it), so nothing can arrive.
		lsn, err := primary.queryString("SELECT pg_current_wal_lsn()::text")
		require.NoError(t, err)
		behind, err := sb.queryString("SELECT (pg_last_wal_receive_lsn() < $1::pg_lsn)::text", lsn)
		require.NoError(t, err)
		require.Equal(t, "true", behind, "the standby received nothing after the cut")
		require.EqualValues(t, 1, count(), "not replicated while cut")
		sb.Reconnect(t)
		sb.WaitCaughtUp(t)
		require.EqualValues(t, 2, count(), "replicated after reconnect")
	})

	t.Run("failover loses an acknowledged commit", func(t *testing.T) {
		sb.CutLink(t)
		require.NoError(t, execSQL(pconn, "INSERT INTO rows VALUES (3)"), "acknowledged by the primary")
		primary.StopImmediate(t)
		took, err := timed(func() error { sb.Promote(t); return nil })
		require.NoError(t, err)
		t.Logf("promote: %v", took)
		in, err := sb.queryString("SELECT pg_is_in_recovery()::text")
		require.NoError(t, err)
		require.Equal(t, "false", in)
		require.EqualValues(t, 2, count(), "the commit the standby never received is lost")
		nc := connect(t, sb.URL())
		require.NoError(t, execSQL(nc, "INSERT INTO rows VALUES (4)"), "the promoted standby accepts writes")
		n, err := queryInt(nc, 5*time.Second, "SELECT count(*) FROM rows WHERE id IN (1, 2, 4)")
		require.NoError(t, err)
		require.EqualValues(t, 3, n)
	})
}
