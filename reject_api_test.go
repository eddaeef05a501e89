package pgetl

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// callerLoad adds rows 1..n to b, rejecting (Reject, with the row's raw fields) the
// rows in bad: what a job does with records its own parser refuses.
func callerLoad(ctx context.Context, b *BatchSession, n int64, bad map[int64]bool) error {
	for i := int64(1); i <= n; i++ {
		c := strconv.FormatInt(i, 10)
		var err error
		if bad[i] {
			err = b.Reject(ctx, c, "price: not a number", c, "item "+c, "12,5x")
		} else {
			err = b.Add(ctx, c, itemRow(i)...)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func everyNth(n, k int64) (map[int64]bool, []int64) {
	bad := map[int64]bool{}
	var list []int64
	for i := k; i <= n; i += k {
		bad[i] = true
		list = append(list, i)
	}
	return bad, list
}

// TestBatchSessionReject: rows the caller rejects land in the reject table exactly
// once, with their batch, under either reject policy and on the statement path, and
// are counted as rejects in BatchResult, Stat and the checkpoint.
func TestBatchSessionReject(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  BatchConfig
	}{
		{"reject-fail", BatchConfig{}},
		{"reject-to-table", BatchConfig{Rejects: RejectToTable}},
		{"one-in-flight", BatchConfig{InFlight: 1}},
		{"statement", BatchConfig{SQL: "x"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n = 5_000
			bd := setupItems(t)
			ctx := context.Background()
			job := "caller-" + tc.name
			s := bd.session(t, job)
			var mu sync.Mutex
			var results []BatchResult
			cfg := tc.cfg
			cfg.Table, cfg.Columns, cfg.CommitRows, cfg.CommitInterval = bd.table, itemCols, 700, -1
			if cfg.SQL != "" {
				cfg.SQL = "INSERT INTO " + bd.table + " (id, name, price, qty, at) VALUES ($1, $2, $3, $4, $5)"
				cfg.Table = ""
			}
			cfg.OnCommitFunc = func(r BatchResult) {
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			}
			b, err := s.Batch(ctx, cfg)
			require.NoError(t, err)
			bad, list := everyNth(n, 7)
			require.NoError(t, callerLoad(ctx, b, n, bad))
			require.NoError(t, b.Close(ctx))

			bd.requireExactly(t, n, list...)
			requireRejects(t, bd.pool, bd.db.Schema, job, list)
			requireCheckpoint(t, bd.pool, bd.db.Schema, job, strconv.Itoa(n), n-int64(len(list)), int64(len(list)))
			st := s.Stat()
			require.Equal(t, int64(len(list)), st.Rejects())
			require.Equal(t, int64(n-len(list)), st.Rows())
			var rej, rows int64
			for _, r := range results {
				rej += r.Rejects
				rows += r.Rows
			}
			require.Equal(t, int64(len(list)), rej, "BatchResult.Rejects")
			require.Equal(t, int64(n-len(list)), rows, "BatchResult.Rows")

			// What the reject table says of one of them: the reason, no SQLSTATE,
			// the raw fields (3 values for 5 columns: a JSON array), the table.
			var cursor, state, msg, row string
			var table *string
			require.NoError(t, bd.pool.QueryRow(ctx, "SELECT cursor, sqlstate, message, row::text, table_name FROM "+bd.db.Schema+
				".reject WHERE job = $1 AND row_index = 6", job).Scan(&cursor, &state, &msg, &row, &table))
			require.Equal(t, "7", cursor)
			require.Empty(t, state)
			require.Equal(t, "price: not a number", msg)
			require.JSONEq(t, `{"values": ["7", "item 7", "12,5x"]}`, row)
			if tc.cfg.SQL == "" {
				require.NotNil(t, table)
				require.Equal(t, bd.table, *table)
			}
		})
	}
}

// TestBatchSessionRejectValuesByColumn: a rejected row with one value per column
// is stored keyed by column, as the rows the server refuses are.
func TestBatchSessionRejectValuesByColumn(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "caller-cols")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	require.NoError(t, b.Reject(ctx, "1", "discontinued", int64(1), "old\x00item", "1.00", 3, nil))
	require.NoError(t, b.Close(ctx))
	var row string
	require.NoError(t, bd.pool.QueryRow(ctx, "SELECT row::text FROM "+bd.db.Schema+".reject WHERE job = 'caller-cols'").Scan(&row))
	require.JSONEq(t, `{"id": 1, "name": "olditem", "price": "1.00", "qty": 3, "at": null}`, row)
}

// TestBatchSessionRejectMaxRejects: caller rejects count toward MaxRejects at once,
// also under RejectFail: the Reject one over the limit commits the rows before it
// (their rejects and the checkpoint) and stops the job.
func TestBatchSessionRejectMaxRejects(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "caller-max")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 10, CommitInterval: -1, MaxRejects: 3})
	require.NoError(t, err)
	bad := map[int64]bool{5: true, 12: true, 13: true, 27: true, 30: true}
	err = callerLoad(ctx, b, 40, bad)
	require.ErrorIs(t, err, ErrTooManyRejects)
	var berr *BatchError
	require.ErrorAs(t, err, &berr)
	require.Equal(t, "27", berr.Cursor, "the 4th reject")
	require.Equal(t, int64(26), berr.Row)
	require.True(t, berr.Committed)
	require.ErrorIs(t, b.Add(ctx, "41", itemRow(41)...), ErrTooManyRejects)
	require.ErrorIs(t, b.Reject(ctx, "41", "x"), ErrTooManyRejects)
	require.ErrorIs(t, b.Close(ctx), ErrTooManyRejects)

	// Rows 1..26 are accounted for: 23 loaded, 3 rejected; a rerun resumes at 27.
	var skip []int64
	for i := int64(27); i <= 40; i++ {
		skip = append(skip, i)
	}
	bd.requireExactly(t, 40, append(skip, 5, 12, 13)...)
	requireRejects(t, bd.pool, bd.db.Schema, "caller-max", []int64{5, 12, 13})
	requireCheckpoint(t, bd.pool, bd.db.Schema, "caller-max", "26", 23, 3)
}

// TestBatchSessionRejectSurvivesReplay: a batch holding caller rejects whose COMMIT
// went through unseen (the reply lost, the server briefly unreachable) is replayed;
// the replay stops at the fence, so the rejects are written once, and a batch that
// failed before its COMMIT is replayed with its rejects, written once too.
func TestBatchSessionRejectSurvivesReplay(t *testing.T) {
	t.Parallel()
	const n, commitRows, target = 10_000, 2_000, 3
	bd := setupItems(t)
	ctx := context.Background()
	g := newGate()
	pool := g.pool(t, bd.db.URL)
	const job = "caller-replay"
	tr := newTrigger(t)
	var attempts atomic.Int64
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
		Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: 1000},
		beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
			attempts.Add(1)
			switch {
			case seq == target && attempt == 1:
				g.arm(pgc)
				tr.pull(seq)
			case seq == target+1 && attempt == 1:
				_ = pgc.Conn().Close() // fails before the message is out: a plain retry
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	bad, list := everyNth(n, 97)
	res := goJob(func() error {
		b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: commitRows, CommitInterval: -1})
		if err != nil {
			return err
		}
		if err := callerLoad(ctx, b, n, bad); err != nil {
			_ = b.Close(ctx)
			return err
		}
		return b.Close(ctx)
	})
	tr.wait(t, res, 30*time.Second)
	tr.release()
	g.committedThenUnreachable(t, bd.db.Pool, bd.db.Schema, job, target)
	g.reachableAfter(t, 3)
	require.NoError(t, waitJob(t, res, 60*time.Second))

	bd.requireExactly(t, n, list...)
	requireRejects(t, bd.db.Pool, bd.db.Schema, job, list)
	requireCheckpoint(t, bd.db.Pool, bd.db.Schema, job, strconv.Itoa(n), n-int64(len(list)), int64(len(list)))
	st := s.Stat()
	require.Equal(t, int64(1), st.Retries()["in_doubt_committed"], "%v", st.Retries())
	require.Equal(t, int64(len(list)), st.Rejects())
	require.Equal(t, int64(n-len(list)), st.Rows())
}

// TestBatchSetReject: a set's caller rejects name their table (or none), land once
// with their batch and count toward MaxRejects.
func TestBatchSetReject(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "set-caller")
	set, err := s.Batches(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 50, CommitInterval: -1, MaxRejects: 20})
	require.NoError(t, err)
	const n = 300
	var list []int64
	for i := int64(1); i <= n; i++ {
		c := strconv.FormatInt(i, 10)
		switch {
		case i%31 == 0:
			require.NoError(t, set.Reject(ctx, c, bd.table, "bad price", c, "x"))
			list = append(list, i)
		case i%47 == 0:
			require.NoError(t, set.Reject(ctx, c, "", "bad record", c))
			list = append(list, i)
		default:
			require.NoError(t, set.Add(ctx, c, itemRow(i)))
		}
	}
	require.Error(t, set.Reject(ctx, "x", "no_such_table", "r"))
	require.NoError(t, set.Close(ctx))
	bd.requireExactly(t, n, list...)
	requireRejects(t, bd.pool, bd.db.Schema, "set-caller", list)
	requireCheckpoint(t, bd.pool, bd.db.Schema, "set-caller", strconv.Itoa(n), n-int64(len(list)), int64(len(list)))
	require.Equal(t, int64(len(list)), s.Stat().Rejects())
	var tables []*string
	rows, err := bd.pool.Query(ctx, "SELECT table_name FROM "+bd.db.Schema+".reject WHERE job = 'set-caller' AND row_index IN (30, 46)  ORDER BY row_index")
	require.NoError(t, err)
	for rows.Next() {
		var tn *string
		require.NoError(t, rows.Scan(&tn))
		tables = append(tables, tn)
	}
	require.NoError(t, rows.Err())
	require.Len(t, tables, 2)
	require.Equal(t, bd.table, *tables[0])
	require.Equal(t, "", *tables[1])

	// MaxRejects: the third reject stops the set.
	s2 := bd.session(t, "set-caller-max")
	set2, err := s2.Batches(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 5, CommitInterval: -1, MaxRejects: 2})
	require.NoError(t, err)
	require.NoError(t, set2.Reject(ctx, "1", "", "r"))
	require.NoError(t, set2.Reject(ctx, "2", "", "r"))
	require.ErrorIs(t, set2.Reject(ctx, "3", "", "r"), ErrTooManyRejects)
	_ = set2.Close(ctx)
}
