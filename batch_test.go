package pgetl

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// bundle is what a batch test works with.
type bundle struct {
	db    *pgtest.DB
	pool  *pgxpool.Pool
	table string
}

// setupItems creates an items table in the test's schema and a pool for it.
func setupItems(t *testing.T) *bundle {
	t.Helper()
	db := pgtest.New(t)
	db.Exec(t, `CREATE TABLE items (
		id bigint PRIMARY KEY,
		name text NOT NULL,
		price numeric(12,2) NOT NULL CHECK (price >= 0),
		qty int NOT NULL,
		at timestamptz NOT NULL)`)
	return &bundle{db: db, pool: db.Pool, table: db.Schema + ".items"}
}

var itemCols = []string{"id", "name", "price", "qty", "at"}

func itemRow(i int64) []any {
	return []any{i, fmt.Sprintf("item %d", i), fmt.Sprintf("%d.%02d", i%100000, i%100), int32(i % 1000),
		time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Second)}
}

func (bd *bundle) session(t *testing.T, job string, mod ...func(*SessionConfig)) *Session {
	t.Helper()
	cfg := SessionConfig{Job: job, CheckpointSchema: bd.db.Schema, Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}}
	for _, f := range mod {
		f(&cfg)
	}
	s, err := NewSession(context.Background(), bd.pool, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// load adds rows from..to (inclusive) with cursor = row number.
func load(ctx context.Context, b *BatchSession, from, to int64) error {
	for i := from; i <= to; i++ {
		if err := b.Add(ctx, strconv.FormatInt(i, 10), itemRow(i)...); err != nil {
			return err
		}
	}
	return nil
}

// requireExactly checks the invariant: rows from..to each exactly once, minus skip.
func (bd *bundle) requireExactly(t *testing.T, n int64, skip ...int64) {
	t.Helper()
	var sum int64
	for i := int64(1); i <= n; i++ {
		sum += i
	}
	for _, s := range skip {
		sum -= s
	}
	want := n - int64(len(skip))
	var cnt, got, distinct int64
	require.NoError(t, bd.pool.QueryRow(context.Background(), "SELECT count(*), coalesce(sum(id),0)::bigint, count(DISTINCT id) FROM "+bd.table).Scan(&cnt, &got, &distinct))
	require.Equal(t, want, cnt, "row count")
	require.Equal(t, want, distinct, "distinct ids")
	require.Equal(t, sum, got, "sum of ids")
	// Content check on a sample: every column as generated.
	var bad int64
	require.NoError(t, bd.pool.QueryRow(context.Background(), `SELECT count(*) FROM `+bd.table+` WHERE name <> 'item ' || id
		OR price <> ((id % 100000)::text || '.' || lpad((id % 100)::text, 2, '0'))::numeric
		OR qty <> id % 1000 OR at <> '2024-01-01T00:00:00Z'::timestamptz + id * interval '1 second'`).Scan(&bad))
	require.Zero(t, bad, "rows whose content differs from the source")
}

func TestBatchRoundTrip(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		commitRows int
		n          int64
	}{{1000, 100_000}, {7777, 100_000}, {CommitRowsDefault, 100_003}} {
		t.Run(fmt.Sprintf("commit=%d", tc.commitRows), func(t *testing.T) {
			t.Parallel()
			bd := setupItems(t)
			ctx := context.Background()
			s := bd.session(t, "roundtrip")
			var commits int
			b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: tc.commitRows,
				OnCommitFunc: func(BatchResult) { commits++ }})
			require.NoError(t, err)
			require.NoError(t, load(ctx, b, 1, tc.n))
			require.NoError(t, b.Close(ctx))
			bd.requireExactly(t, tc.n)
			wantBatches := (tc.n + int64(tc.commitRows) - 1) / int64(tc.commitRows)
			require.GreaterOrEqual(t, int64(commits), wantBatches)
			cp, err := s.Checkpoint(ctx)
			require.NoError(t, err)
			require.Equal(t, strconv.FormatInt(tc.n, 10), cp.Cursor)
			require.Equal(t, tc.n, cp.Rows)
			st := s.Stat()
			require.Equal(t, tc.n, st.Rows())
			require.Zero(t, st.TotalRetries())
			// The checkpoint in the database agrees.
			dbcp, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, "roundtrip")
			require.NoError(t, err)
			require.Equal(t, cp.Seq, dbcp.Seq)
			require.Equal(t, cp.Cursor, dbcp.Cursor)
			require.Equal(t, tc.n, dbcp.Rows)
		})
	}
}

func TestBatchBadInput(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "badinput")

	_, err := s.Batch(ctx, BatchConfig{Table: bd.db.Schema + ".nope", Columns: itemCols})
	require.ErrorContains(t, err, "nope")
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "42P01", pgErr.Code)

	_, err = s.Batch(ctx, BatchConfig{Table: bd.table, Columns: []string{"id", "nosuch"}})
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "42703", pgErr.Code)

	_, err = s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: -1})
	require.ErrorContains(t, err, "CommitRows must be at least 1")

	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	err = b.Add(ctx, "c1", int64(1), "x")
	var berr *BatchError
	require.ErrorAs(t, err, &berr)
	require.Contains(t, err.Error(), "got 2 values for 5 columns")

	err = b.Add(ctx, "c2", "not a number", "n", "1.00", int32(1), time.Now())
	require.ErrorAs(t, err, &berr)
	require.Equal(t, "id", berr.Column)
	require.Equal(t, int64(1), berr.Row)
	require.Equal(t, "c2", berr.Cursor)
	require.False(t, berr.Committed)

	require.NoError(t, b.Add(ctx, "c3", itemRow(3)...))
	require.NoError(t, b.Close(ctx))
	require.NoError(t, b.Close(ctx), "Close is idempotent")
	require.ErrorIs(t, b.Add(ctx, "c4", itemRow(4)...), ErrClosed)
	require.ErrorIs(t, b.Flush(ctx), ErrClosed)
	require.Equal(t, int64(1), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))

	require.NoError(t, s.Close(ctx))
	require.NoError(t, s.Close(ctx))
	_, err = s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.ErrorIs(t, err, ErrClosed)
	require.ErrorIs(t, s.Tx(ctx, nil), ErrClosed)
}

func TestSessionResumeAndFencing(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s1 := bd.session(t, "resume")
	b, err := s1.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 100})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 250))
	require.NoError(t, b.Close(ctx))

	// A second live session for the same job is refused.
	_, err = NewSession(ctx, bd.pool, SessionConfig{Job: "resume", CheckpointSchema: bd.db.Schema})
	require.ErrorIs(t, err, ErrJobClaimed)

	// After Close the claim is free and the job resumes after the last cursor.
	require.NoError(t, s1.Close(ctx))
	s2 := bd.session(t, "resume")
	cp, err := s2.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, "250", cp.Cursor)
	require.Equal(t, int64(250), cp.Rows)

	// A takeover fences s2: its next commit fails and nothing of it lands.
	s3 := bd.session(t, "resume", func(c *SessionConfig) { c.Takeover = true })
	b2, err := s2.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b2, 251, 260))
	require.ErrorIs(t, b2.Close(ctx), ErrFenced)
	require.Equal(t, int64(250), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))

	b3, err := s3.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b3, 251, 300))
	require.NoError(t, b3.Close(ctx))
	require.NoError(t, s3.Finish(ctx))
	require.NoError(t, s3.Close(ctx))
	bd.requireExactly(t, 300)

	// A finished job does not start again by accident.
	_, err = NewSession(ctx, bd.pool, SessionConfig{Job: "resume", CheckpointSchema: bd.db.Schema})
	require.ErrorIs(t, err, ErrJobFinished)
	s4 := bd.session(t, "resume", func(c *SessionConfig) { c.Restart = true })
	cp, err = s4.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, "", cp.Cursor)
	require.Zero(t, cp.Rows)
}

func TestSessionTx(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "tx")
	// The first attempt's backend is terminated mid-transaction: fn runs again.
	calls := 0
	err := s.Tx(ctx, func(tx pgx.Tx) error {
		calls++
		if _, err := tx.Exec(ctx, "INSERT INTO "+bd.table+" VALUES (1, 'a', 1, 1, now())"); err != nil {
			return err
		}
		if calls == 1 {
			_, err := bd.pool.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", s.appName(1))
			require.NoError(t, err)
			_, err = tx.Exec(ctx, "SELECT 1")
			return err
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, 2, calls)
	require.Equal(t, int64(1), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
	require.Equal(t, int64(1), s.Stat().Retries()["server_shutdown"]+s.Stat().Retries()["connection"])

	// fn's own error rolls back and is returned as is.
	mine := errors.New("mine")
	require.ErrorIs(t, s.Tx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO "+bd.table+" VALUES (2, 'a', 1, 1, now())")
		require.NoError(t, err)
		return mine
	}), mine)
	require.Equal(t, int64(1), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
}
