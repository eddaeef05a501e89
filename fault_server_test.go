package pgetl

// Server faults (issue 9) on a throwaway cluster (internal/faults.Cluster): fast
// restart, immediate stop + start, backend crash (crash reinit of the whole server),
// and a read-only server (as after a failover) for 3 s, under a job of 40 batches.
// The fault is injected when batch 3's first attempt is about to be sent.

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/stretchr/testify/require"
)

// clusterItems creates table (with the items columns) in the cluster and returns a
// bundle whose pool connects directly (for the test's checks).
func clusterItems(t *testing.T, c *faults.Cluster, table string) *bundle {
	t.Helper()
	admin := faultPool(t, c.URL())
	_, err := admin.Exec(context.Background(), `CREATE TABLE `+table+` (
		id bigint PRIMARY KEY,
		name text NOT NULL,
		price numeric(12,2) NOT NULL CHECK (price >= 0),
		qty int NOT NULL,
		at timestamptz NOT NULL)`)
	require.NoError(t, err)
	return &bundle{pool: admin, table: table}
}

func TestFaultServer(t *testing.T) {
	t.Parallel()
	c := faults.NewCluster(t)
	const n, commitRows, target = 40_000, 1_000, 3
	retry := RetryPolicy{MaxAttempts: 40, MaxElapsed: 30 * time.Second, InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second}

	// run runs the job under fault, which is called (from the test's goroutine) when
	// batch target is about to be sent, before or after the batch goes (release).
	run := func(t *testing.T, name string, retry RetryPolicy, fault func(release func())) (*bundle, *Session, *faults.Sampler, Checkpoint, error) {
		bd := clusterItems(t, c, "items_"+name)
		ctx := context.Background()
		pool := faultPool(t, c.URL()+"&connect_timeout=2", func(cfg *pgxpool.Config) { cfg.MaxConns = 2 })
		job := "srv-" + name
		tr := newTrigger(t)
		s, err := NewSession(ctx, pool, SessionConfig{Job: job, Retry: retry,
			beforeCommit: func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
				if seq == target && attempt == 1 {
					tr.pull(seq)
				}
			}})
		require.NoError(t, err)
		t.Cleanup(func() { _ = s.Close(context.Background()) })
		sampler := faults.SampleActivity(t, c.URL(), "pgetl "+job+"#", 10*time.Millisecond)
		res := goJob(func() error {
			return loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: commitRows, CommitInterval: -1}, 1, n, nil)
		})
		tr.wait(t, res, 30*time.Second)
		before, err := ReadCheckpoint(ctx, bd.pool, "", job)
		require.NoError(t, err)
		start := time.Now()
		fault(tr.release)
		err = waitJob(t, res, 60*time.Second)
		t.Logf("%s: job ended %v after the fault began: err %v; retries %v", name, time.Since(start).Round(time.Millisecond), err, s.Stat().Retries())
		sampler.Stop()
		return bd, s, sampler, before, err
	}
	done := func(t *testing.T, bd *bundle, s *Session, sampler *faults.Sampler, err error) {
		require.NoError(t, err)
		bd.requireExactly(t, n)
		requireCheckpoint(t, bd.pool, "", s.Job(), strconv.Itoa(n), n, 0)
		requireNoIdleInTx(t, sampler, 0)
		require.Positive(t, failedAttempts(s.Stat()), "the fault was noticed")
	}

	t.Run("fast_restart", func(t *testing.T) {
		bd, s, sampler, _, err := run(t, "restart", retry, func(release func()) {
			// The fault first, while batch 3 holds its connection: released first,
			// the rest of the job (a few ms a batch) could finish before it.
			t0 := time.Now()
			c.Restart(t)
			t.Logf("pg_ctl restart -m fast took %v", time.Since(t0).Round(time.Millisecond))
			release()
		})
		done(t, bd, s, sampler, err)
	})
	t.Run("immediate_stop_start", func(t *testing.T) {
		bd, s, sampler, _, err := run(t, "immediate", retry, func(release func()) {
			c.StopImmediate(t)
			release()
			time.Sleep(2 * time.Second) // the outage
			t0 := time.Now()
			c.Start(t)
			t.Logf("down 2s; start with crash recovery took %v", time.Since(t0).Round(time.Millisecond))
		})
		done(t, bd, s, sampler, err)
	})
	t.Run("crash_reinit", func(t *testing.T) {
		bd, s, sampler, _, err := run(t, "crash", retry, func(release func()) {
			// Crash while batch 3 holds its connection, before its message goes:
			// released first, the batch (1,000 rows, a few ms) could commit before the
			// crash, whose dead connections the pool may then discard unnoticed.
			t0 := time.Now()
			c.Crash(t)
			t.Logf("backend SIGKILL → ready again in %v", time.Since(t0).Round(time.Millisecond))
			release()
		})
		done(t, bd, s, sampler, err)
	})
	t.Run("read_only_3s", func(t *testing.T) {
		bd, s, sampler, _, err := run(t, "readonly", retry, func(release func()) {
			c.SetReadOnly(t, true)
			t.Cleanup(func() { c.SetReadOnly(t, false) })
			release()
			time.Sleep(3 * time.Second) // the failover's duration
			c.SetReadOnly(t, false)
		})
		done(t, bd, s, sampler, err)
		require.Positive(t, s.Stat().Retries()["read_only"], "25006 was retried: %v", s.Stat().Retries())
	})
	t.Run("read_only_budget_exceeded", func(t *testing.T) {
		short := retry
		short.MaxElapsed = time.Second
		bd, s, sampler, before, err := run(t, "readonly_budget", short, func(release func()) {
			c.SetReadOnly(t, true)
			t.Cleanup(func() { c.SetReadOnly(t, false) })
			release()
		})
		require.Error(t, err)
		require.ErrorIs(t, err, ErrRetriesExhausted)
		require.Equal(t, "25006", pgCode(err), "classified: %v", err)
		var berr *BatchError
		require.True(t, errors.As(err, &berr), "%T", err)
		require.Equal(t, int64(target), berr.Seq)
		require.Positive(t, s.Stat().Retries()["read_only"])
		after, err := ReadCheckpoint(context.Background(), bd.pool, "", s.Job())
		require.NoError(t, err)
		require.Equal(t, before.Seq, after.Seq, "checkpoint unchanged")
		require.Equal(t, before.Cursor, after.Cursor, "checkpoint unchanged")
		require.Equal(t, int64(target-1), after.Seq)
		requireConsistent(t, bd.pool, bd.table, after, nil)
		requireNoIdleInTx(t, sampler, 0)
		c.SetReadOnly(t, false)
	})
}
