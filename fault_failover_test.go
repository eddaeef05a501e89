package pgetl

// Failover that loses acknowledged commits (issue 13 item 10), on a throwaway primary
// with a streaming standby (internal/faults.Standby): the job runs on a multi-host
// connection string (target_session_attrs=read-write), the replication link is cut
// when batch 10 is about to be sent, batches 10..19 commit on the primary only (the
// primary acknowledges them: replication is asynchronous), the primary is stopped
// (-m immediate) and the standby promoted when batch 20 is about to be sent. Batch
// 20's retry reaches the new primary, whose checkpoint stands at batch 9: the job
// must stop with ErrCheckpointLost (not write past the gap, not claim the lost rows),
// and a rerun resumes from the new primary's checkpoint and loads every source row
// exactly once.

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/stretchr/testify/require"
)

func TestFaultFailoverLostCommits(t *testing.T) {
	t.Parallel()
	const (
		n, commitRows = 40_000, 1_000
		cutAt         = 10 // batch about to be sent when the replication link is cut
		stopAt        = 20 // batch about to be sent when the primary stops and the standby is promoted
		table         = "items_failover"
		job           = "failover"
	)
	primary := faults.NewCluster(t)
	standby := faults.NewStandby(t, primary)
	dsn := fmt.Sprintf("host=%s,%s port=%d,%d user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write connect_timeout=2",
		primary.Host(), standby.Host(), primary.Port(), standby.Port())
	ctx := context.Background()
	onPrimary := clusterItems(t, primary, table)
	onStandby := faultPool(t, standby.URL()) // read-only until promoted
	retry := RetryPolicy{MaxAttempts: 40, MaxElapsed: 30 * time.Second, InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second}
	batchCfg := BatchConfig{Table: table, Columns: itemCols, CommitRows: commitRows, CommitInterval: -1}

	cut, stop := newTrigger(t), newTrigger(t)
	pool := faultPool(t, dsn, func(cfg *pgxpool.Config) { cfg.MaxConns = 2 })
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, Retry: retry,
		beforeCommit: func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
			switch {
			case seq == cutAt && attempt == 1:
				cut.pull(seq)
			case seq == stopAt && attempt == 1:
				stop.pull(seq)
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	start := time.Now()
	res := goJob(func() error { return loadJob(ctx, s, batchCfg, 1, n, nil) })

	// Batches 1..9 committed: the standby gets all of them, then nothing more.
	cut.wait(t, res, 30*time.Second)
	standby.WaitCaughtUp(t)
	standby.CutLink(t)
	atCut, err := ReadCheckpoint(ctx, onStandby, "", job)
	require.NoError(t, err)
	require.Equal(t, int64(cutAt-1), atCut.Seq, "the standby has batches 1..%d", cutAt-1)
	cut.release()

	// Batches 10..19 committed on the primary alone.
	stop.wait(t, res, 60*time.Second)
	committed, err := ReadCheckpoint(ctx, onPrimary.pool, "", job)
	require.NoError(t, err)
	require.Equal(t, int64(stopAt-1), committed.Seq, "the primary acknowledged batches 1..%d", stopAt-1)
	stillAtCut, err := ReadCheckpoint(ctx, onStandby, "", job)
	require.NoError(t, err)
	require.Equal(t, atCut, stillAtCut, "the standby received nothing after the cut")
	primary.StopImmediate(t)
	standby.Promote(t)
	failover := time.Now()
	stop.release()

	err = waitJob(t, res, 60*time.Second)
	t.Logf("job ended %v after the failover: %v; retries %v", time.Since(failover).Round(time.Millisecond), err, s.Stat().Retries())
	newPrimary := &bundle{pool: onStandby, table: table}
	database, rerr := ReadCheckpoint(ctx, newPrimary.pool, "", job)
	require.NoError(t, rerr)
	require.Equal(t, atCut, database, "the promoted server's checkpoint is the one it had at the cut")
	requireConsistent(t, newPrimary.pool, table, database, nil)

	// The job stops, saying the database's checkpoint moved back.
	require.Error(t, err, "the job must not succeed after losing batches %d..%d", cutAt, stopAt-1)
	require.ErrorIs(t, err, ErrCheckpointLost,
		"want ErrCheckpointLost: the database's checkpoint moved back from batch %d to batch %d; got %T: %v", committed.Seq, database.Seq, err, err)
	var lost *CheckpointLostError
	require.ErrorAs(t, err, &lost)
	require.Equal(t, job, lost.Job)
	require.Equal(t, database, lost.Database, "Database is the promoted server's checkpoint row")
	require.Equal(t, committed.Seq, lost.Committed.Seq, "Committed is what the session had committed")
	require.Equal(t, committed.Cursor, lost.Committed.Cursor)
	require.Equal(t, committed.Rows, lost.Committed.Rows)
	require.Equal(t, committed.Rejects, lost.Committed.Rejects)
	msg := err.Error()
	require.Contains(t, msg, strconv.Quote(database.Cursor), "the message names the cursor a rerun resumes from")
	require.Contains(t, msg, strconv.FormatInt(committed.Rows-database.Rows, 10), "the message says how many committed rows were lost")
	_, cperr := s.Checkpoint(ctx)
	require.ErrorIs(t, cperr, ErrCheckpointLost, "Checkpoint reports the loss, not the session's lost position")
	t.Logf("first run: %v; Close: %v", time.Since(start).Round(time.Millisecond), s.Close(ctx))

	// The rerun, on the same connection string, resumes from the new primary's
	// checkpoint and loads the rest: every source row exactly once.
	pool2 := faultPool(t, dsn, func(cfg *pgxpool.Config) { cfg.MaxConns = 2 })
	s2, err := NewSession(ctx, pool2, SessionConfig{Job: job, Retry: retry})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s2.Close(context.Background()) })
	cp, err := s2.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, database.Cursor, cp.Cursor, "the rerun resumes from the promoted server's checkpoint")
	last, err := strconv.ParseInt(cp.Cursor, 10, 64)
	require.NoError(t, err)
	sampler := faults.SampleActivity(t, standby.URL(), "pgetl "+job+"#", 10*time.Millisecond)
	require.NoError(t, loadJob(ctx, s2, batchCfg, last+1, n, nil))
	sampler.Stop()
	require.NoError(t, s2.Close(ctx))
	newPrimary.requireExactly(t, n)
	requireCheckpoint(t, newPrimary.pool, "", job, strconv.Itoa(n), n, 0)
	requireNoIdleInTx(t, sampler, 0)
}
