package pgetl

// A transient fault during bad-row isolation: a batch of an upsert job holds a row
// that violates a CHECK constraint, which only the merge finds (no COPY line), so
// the batch is bisected; the test terminates the backend of a bisection probe. The
// probe's failure is a lost connection, not a data error: the batch must be retried
// (or the probe repeated), the bad row rejected, and the job complete.

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestFaultDuringBisect(t *testing.T) {
	t.Parallel()
	const n, badRow = 20_000, 19_000
	bd := setupItems(t)
	ctx := context.Background()
	job := "bisect-fault"
	s := bd.session(t, job)
	res := goJob(func() error {
		return loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, CommitRows: n,
			Rejects: RejectToTable, CommitInterval: -1}, 1, n, map[int64]bool{badRow: true})
	})
	// Terminate the first probe seen running (its message rolls back: it carries
	// SET CONSTRAINTS ALL IMMEDIATE … ROLLBACK).
	var killed int64
	deadline := time.Now().Add(30 * time.Second)
	var jobErr error
	done := false
	for killed == 0 && time.Now().Before(deadline) {
		select {
		case jobErr = <-res:
			done = true
		default:
		}
		if done {
			break
		}
		killed = bd.db.Int(t, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
			WHERE application_name LIKE $1 AND state = 'active' AND query LIKE '%SET CONSTRAINTS ALL IMMEDIATE%'`, "pgetl "+job+"#%")
	}
	require.Positive(t, killed, "the test must have terminated a probe (job ended first: %v, err %v)", done, jobErr)
	if !done {
		jobErr = waitJob(t, res, 60*time.Second)
	}
	t.Logf("terminated %d probe(s); job: %v; retries %v", killed, jobErr, s.Stat().Retries())
	require.NoError(t, jobErr, "a lost connection during bisection is transient: retried, not fatal")
	bd.requireExactly(t, n, badRow)
	requireCheckpoint(t, bd.pool, bd.db.Schema, job, strconv.Itoa(n), n-1, 1)
	requireRejects(t, bd.pool, bd.db.Schema, job, []int64{badRow})
}
