package faults

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

func TestSampleActivity(t *testing.T) {
	base := pgtest.URL(t)
	prefix := fmt.Sprintf("pgetl-act-%d-", os.Getpid())
	app := func(name string) string { return pgtest.WithParam(base, "application_name", prefix+name) }
	idleTx := connect(t, app("job"))
	clean := connect(t, app("clean"))
	other := connect(t, pgtest.WithParam(base, "application_name", "pgetl-other"))

	s := SampleActivity(t, base, prefix, 20*time.Millisecond)
	require.True(t, s.WaitSamples(2, 5*time.Second))
	require.Empty(t, s.IdleInTransaction(), "nothing is idle in transaction yet")

	require.NoError(t, execSQL(idleTx, "BEGIN"))
	require.NoError(t, execSQL(idleTx, "SELECT 1"))
	require.NoError(t, execSQL(clean, "SELECT 1"))
	require.NoError(t, execSQL(other, "BEGIN"))
	require.NoError(t, execSQL(other, "SELECT 2"))
	pid, err := queryInt(idleTx, 5*time.Second, "SELECT pg_backend_pid()")
	require.NoError(t, err)
	require.True(t, s.WaitSamples(3, 5*time.Second))

	found := s.IdleInTransaction()
	require.NotEmpty(t, found, "the idle-in-transaction session is detected")
	for _, smp := range found {
		require.EqualValues(t, pid, smp.PID, "only the prefixed idle-in-transaction session: %+v", smp)
		require.Equal(t, prefix+"job", smp.ApplicationName)
		require.Equal(t, "idle in transaction", smp.State)
		// A sample may fall between the transaction's two statements.
		require.Contains(t, []string{"SELECT 1", "SELECT pg_backend_pid()"}, smp.Query)
		require.GreaterOrEqual(t, smp.XactAge, smp.StateAge)
	}
	t.Logf("%d samples, %d idle in transaction; last: %+v", s.Samples(), len(found), found[len(found)-1])

	// An aborted transaction is idle in transaction too.
	require.Error(t, execSQL(idleTx, "SELECT 1/0"))
	require.True(t, s.WaitSamples(3, 5*time.Second))
	last := s.IdleInTransaction()
	require.Equal(t, "idle in transaction (aborted)", last[len(last)-1].State)

	// After the transaction ends, nothing more is recorded.
	require.NoError(t, execSQL(idleTx, "ROLLBACK"))
	require.True(t, s.WaitSamples(2, 5*time.Second)) // the first may predate the ROLLBACK
	n := len(s.IdleInTransaction())
	require.True(t, s.WaitSamples(3, 5*time.Second))
	require.Len(t, s.IdleInTransaction(), n)
	s.Stop()
	s.Stop() // idempotent
	errs, lastErr := s.Errors()
	require.Zero(t, errs, "%v", lastErr)
}

func TestSampleActivitySurvivesRestart(t *testing.T) {
	c := NewCluster(t)
	s := SampleActivity(t, c.URL(), "job", 10*time.Millisecond)
	require.True(t, s.WaitSamples(2, 5*time.Second))
	c.Restart(t)
	require.True(t, s.WaitSamples(3, 10*time.Second), "the sampler reconnects")
	errs, lastErr := s.Errors()
	require.Positive(t, errs)
	t.Logf("sampler errors across a restart: %d (last: %v)", errs, lastErr)
}
