package faults

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// sampleWait bounds a wait for a few samples, taken every 10–20 ms: it only ends a
// failing run, so it leaves room for a busy machine under -race.
const sampleWait = 30 * time.Second

func TestSampleActivity(t *testing.T) {
	base := pgtest.URL(t)
	prefix := fmt.Sprintf("pgetl-act-%d-", os.Getpid())
	app := func(name string) string { return pgtest.WithParam(base, "application_name", prefix+name) }
	idleTx := connect(t, app("job"))
	clean := connect(t, app("clean"))
	other := connect(t, pgtest.WithParam(base, "application_name", "pgetl-other"))

	s := SampleActivity(t, base, prefix, 20*time.Millisecond)
	require.True(t, s.WaitSamples(2, sampleWait))
	require.Empty(t, s.IdleInTransaction(), "nothing is idle in transaction yet")

	require.NoError(t, execSQL(idleTx, "BEGIN"))
	require.NoError(t, execSQL(idleTx, "SELECT 1"))
	require.NoError(t, execSQL(clean, "SELECT 1"))
	require.NoError(t, execSQL(other, "BEGIN"))
	require.NoError(t, execSQL(other, "SELECT 2"))
	pid, err := queryInt(idleTx, 5*time.Second, "SELECT pg_backend_pid()")
	require.NoError(t, err)
	require.True(t, s.WaitSamples(3, sampleWait))

	found := s.IdleInTransaction()
	require.NotEmpty(t, found, "the idle-in-transaction session is detected")
	// The sampler runs on its own clock: a sample may fall after any statement of
	// the transaction and shows the one the session ran last.
	ran := []string{"BEGIN", "SELECT 1", "SELECT pg_backend_pid()"}
	for _, smp := range found {
		require.EqualValues(t, pid, smp.PID, "only the prefixed idle-in-transaction session: %+v", smp)
		require.Equal(t, prefix+"job", smp.ApplicationName)
		require.Equal(t, "idle in transaction", smp.State)
		require.Contains(t, ran, smp.Query)
		require.GreaterOrEqual(t, smp.XactAge, smp.StateAge)
	}
	// WaitSamples waited for a sample begun after the last statement: it shows that.
	require.Equal(t, "SELECT pg_backend_pid()", found[len(found)-1].Query, "%+v", found[len(found)-1])
	t.Logf("%d samples, %d idle in transaction; last: %+v", s.Samples(), len(found), found[len(found)-1])

	// An aborted transaction is idle in transaction too.
	require.Error(t, execSQL(idleTx, "SELECT 1/0"))
	require.True(t, s.WaitSamples(3, sampleWait))
	last := s.IdleInTransaction()
	require.Equal(t, "idle in transaction (aborted)", last[len(last)-1].State)

	// After the transaction ends, nothing more is recorded.
	require.NoError(t, execSQL(idleTx, "ROLLBACK"))
	require.True(t, s.WaitSamples(2, sampleWait)) // the first may predate the ROLLBACK
	n := len(s.IdleInTransaction())
	require.True(t, s.WaitSamples(3, sampleWait))
	require.Len(t, s.IdleInTransaction(), n)
	s.Stop()
	s.Stop() // idempotent
	errs, lastErr := s.Errors()
	require.Zero(t, errs, "%v", lastErr)
}

func TestSampleActivitySurvivesRestart(t *testing.T) {
	c := NewCluster(t)
	s := SampleActivity(t, c.URL(), "job", 10*time.Millisecond)
	require.True(t, s.WaitSamples(2, sampleWait))
	c.Restart(t)
	require.True(t, s.WaitSamples(3, sampleWait), "the sampler reconnects")
	errs, lastErr := s.Errors()
	require.Positive(t, errs)
	t.Logf("sampler errors across a restart: %d (last: %v)", errs, lastErr)
}
