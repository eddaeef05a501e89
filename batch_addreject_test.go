package pgetl

import (
	"context"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// badRow is an items row that Add refuses: a string the timestamptz column cannot
// take.
func badRow(i int64) []any {
	row := itemRow(i)
	row[4] = "not a time " + strconv.FormatInt(i, 10)
	return row
}

// TestBatchAddRejectsMaxRejects: rows Add refuses count toward MaxRejects at once.
// Before the fix they were counted only when their batch committed, and a batch of
// refused rows never filled up, so the job ran on (in the field: 828,860 refused
// rows and a 389 MiB heap with MaxRejects 10). Now the 11th refused row stops the
// job: its Add commits the rows before it (10 rejects, the checkpoint at row 10, so
// a rerun resumes at the 11th) and returns ErrTooManyRejects naming the row.
func TestBatchAddRejectsMaxRejects(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "addrej-max")
	// CommitRows 4: two full batches of refused rows commit in the background,
	// the 9th and 10th are still buffered when the 11th comes.
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 4, CommitInterval: -1,
		Rejects: RejectToTable, MaxRejects: 10})
	require.NoError(t, err)
	for i := int64(1); i <= 10; i++ {
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), badRow(i)...), "row %d", i)
	}
	err = b.Add(ctx, "11", badRow(11)...)
	require.ErrorIs(t, err, ErrTooManyRejects)
	var berr *BatchError
	require.ErrorAs(t, err, &berr)
	require.Equal(t, int64(10), berr.Row, "the 11th row (index 10)")
	require.Equal(t, "11", berr.Cursor)
	require.Equal(t, "at", berr.Column)
	require.True(t, berr.Committed, "the rows before it were committed")
	require.Contains(t, err.Error(), "11 rejected of 11 seen")

	// The job is stopped: every later call returns the error.
	require.ErrorIs(t, b.Add(ctx, "12", itemRow(12)...), ErrTooManyRejects)
	require.ErrorIs(t, b.Flush(ctx), ErrTooManyRejects)
	require.ErrorIs(t, b.Close(ctx), ErrTooManyRejects)

	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
	require.Equal(t, int64(10), bd.db.Int(t, "SELECT count(*) FROM "+bd.db.Schema+".reject WHERE job = 'addrej-max'"))
	require.Equal(t, int64(55), bd.db.Int(t, "SELECT sum(cursor::int) FROM "+bd.db.Schema+".reject WHERE job = 'addrej-max'"))
	cp, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, "addrej-max")
	require.NoError(t, err)
	require.Equal(t, "10", cp.Cursor, "a rerun resumes at the 11th row")
	require.Equal(t, int64(10), cp.Rejects)
}

// TestBatchAddRejectsRatio: MaxRejectRatio counts refused rows at Add as well, with
// the rows of batches still in flight.
func TestBatchAddRejectsRatio(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "addrej-ratio")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 100, CommitInterval: -1,
		Rejects: RejectToTable, MaxRejectRatio: 0.1})
	require.NoError(t, err)
	// 1,000 rows, every 20th refused (5%): fine.
	for i := int64(1); i <= 1000; i++ {
		row := itemRow(i)
		if i%20 == 0 {
			row = badRow(i)
		}
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), row...))
	}
	// Then only refused rows: the ratio passes 10% at the 56th (106 of 1,056).
	var err2 error
	var at int64
	for i := int64(1001); i <= 2000 && err2 == nil; i++ {
		err2, at = b.Add(ctx, strconv.FormatInt(i, 10), badRow(i)...), i
	}
	require.ErrorIs(t, err2, ErrTooManyRejects)
	require.Equal(t, int64(1056), at)
	require.ErrorIs(t, b.Close(ctx), ErrTooManyRejects)
	require.Equal(t, int64(950), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
	require.Equal(t, int64(105), bd.db.Int(t, "SELECT count(*) FROM "+bd.db.Schema+".reject WHERE job = 'addrej-ratio'"))
}

// TestBatchAddRejectsBounded: 250,000 rows, every one refused by Add, under
// RejectToTable without MaxRejects. Before the fix refused rows did not count
// toward CommitRows, so nothing ever flushed and every Reject stayed in memory
// (hundreds of MiB). Now each batch of CommitRows refused rows commits with its
// rejects and the checkpoint, and the live heap stays flat.
// Not parallel: it measures the live heap of the whole process, which parallel
// tests would add to (they wait while it runs).
func TestBatchAddRejectsBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("250,000 rows")
	}
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "addrej-bounded")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 1000, CommitInterval: -1,
		Rejects: RejectToTable})
	require.NoError(t, err)
	// 250,000 rows: the old code held ~290 B per refused row (72 MiB here); now a few
	// MiB. (A million rows proved the same in 3.5 min; CI runs this size.)
	const n = 250_000
	const bound = 24 << 20
	liveHeap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	base := liveHeap()
	var peak uint64
	t0 := time.Now()
	row := badRow(0)
	for i := int64(1); i <= n; i++ {
		row[0], row[4] = i, "not a time "+strconv.FormatInt(i, 10)
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), row...))
		if i == 20_000 {
			// Batches flush: the hand-off of a full batch waits for the one
			// before it, so by now nearly all of them committed.
			require.Greater(t, s.Stat().Rejects(), int64(15_000), "refused rows are committed batch by batch")
		}
		if i%50_000 == 0 {
			h := liveHeap()
			peak = max(peak, h)
			t.Logf("%d rows refused: live heap %.1f MiB (%.1f at start), %d rejects committed", i, float64(h)/(1<<20), float64(base)/(1<<20), s.Stat().Rejects())
			require.Less(t, h, uint64(bound), "live heap after %d rows", i)
		}
	}
	require.NoError(t, b.Close(ctx))
	t.Logf("%d refused rows in %v, peak live heap %.1f MiB", n, time.Since(t0).Round(time.Millisecond), float64(peak)/(1<<20))
	require.Equal(t, int64(n), s.Stat().Rejects())
	require.Equal(t, int64(n/1000), s.Stat().Batches())
	require.Equal(t, int64(n), bd.db.Int(t, "SELECT count(*) FROM "+bd.db.Schema+".reject WHERE job = 'addrej-bounded'"))
	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
	cp, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, "addrej-bounded")
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(n), cp.Cursor)
	require.Equal(t, int64(n), cp.Rejects)
}
