package pgetl

import (
	"context"
	"fmt"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// badKind makes row i violate one constraint of the items table.
type badKind struct {
	name     string
	sqlstate string
	column   string
	row      func(i int64) []any
}

var badKinds = []badKind{
	{"check", "23514", "", func(i int64) []any { r := itemRow(i); r[2] = "-1.00"; return r }},
	{"not_null", "23502", "name", func(i int64) []any { r := itemRow(i); r[1] = nil; return r }},
	{"unique", "23505", "", func(i int64) []any { r := itemRow(i); r[0] = int64(1); return r }},
	{"type", "22P02", "qty", func(i int64) []any { r := itemRow(i); r[3] = "many"; return r }},
}

// loadWithBad adds rows 1..n, making the rows in bad violate kind.
func loadWithBad(ctx context.Context, b *BatchSession, n int64, bad map[int64]bool, kind badKind) error {
	for i := int64(1); i <= n; i++ {
		r := itemRow(i)
		if bad[i] {
			r = kind.row(i)
		}
		if err := b.Add(ctx, strconv.FormatInt(i, 10), r...); err != nil {
			return err
		}
	}
	return nil
}

func badSets(n int64) map[string][]int64 {
	return map[string][]int64{
		"R=1":   {n / 2},
		"R=7":   {17, 1001, 9999, 10000, 10001, 33333, n},
		"burst": {20001, 20002, 20003, 20004, 20005},
	}
}

func TestBatchRejectToTable(t *testing.T) {
	t.Parallel()
	const n = 50_000
	for _, kind := range badKinds {
		for setName, set := range badSets(n) {
			t.Run(kind.name+"/"+setName, func(t *testing.T) {
				t.Parallel()
				bd := setupItems(t)
				ctx := context.Background()
				s := bd.session(t, "rejects")
				b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable})
				require.NoError(t, err)
				bad := map[int64]bool{}
				for _, i := range set {
					bad[i] = true
				}
				require.NoError(t, loadWithBad(ctx, b, n, bad, kind))
				require.NoError(t, b.Close(ctx))
				bd.requireExactly(t, n, set...)
				// Exactly R rejects, each with its row, cursor and SQLSTATE.
				rows, err := bd.pool.Query(ctx, "SELECT row_index, cursor, sqlstate, column_name, row FROM "+bd.db.Schema+".reject WHERE job = 'rejects' ORDER BY row_index")
				require.NoError(t, err)
				defer rows.Close()
				var got []int64
				for rows.Next() {
					var idx int64
					var cursor, state, col, row string
					require.NoError(t, rows.Scan(&idx, &cursor, &state, &col, &row))
					got = append(got, idx+1)
					require.Equal(t, strconv.FormatInt(idx+1, 10), cursor)
					require.Equal(t, kind.sqlstate, state)
					if kind.column != "" {
						require.Equal(t, kind.column, col)
					}
					// The row is an object keyed by column (jsonb's text form).
					if kind.name == "not_null" {
						require.Contains(t, row, fmt.Sprintf(`"id": %d,`, idx+1))
						require.Contains(t, row, `"name": null`)
					} else {
						require.Contains(t, row, fmt.Sprintf("item %d", idx+1))
					}
				}
				require.NoError(t, rows.Err())
				require.ElementsMatch(t, set, got)
				cp, err := s.Checkpoint(ctx)
				require.NoError(t, err)
				require.Equal(t, strconv.FormatInt(n, 10), cp.Cursor)
				require.Equal(t, int64(len(set)), cp.Rejects)
				require.Equal(t, int64(n-len(set)), cp.Rows)
			})
		}
	}
}

func TestBatchRejectFail(t *testing.T) {
	t.Parallel()
	const n = 50_000
	for _, kind := range badKinds {
		t.Run(kind.name, func(t *testing.T) {
			t.Parallel()
			bd := setupItems(t)
			ctx := context.Background()
			s := bd.session(t, "fail")
			b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
			require.NoError(t, err)
			const badRow = 23_456
			// Either Add refuses the row itself (it cannot be encoded: nothing of it
			// is buffered, the caller stops, and Close commits the rows before it), or
			// the batch holding it fails in the background and a later Add or Close
			// reports it.
			err = loadWithBad(ctx, b, n, map[int64]bool{badRow: true}, kind)
			if kind.name == "type" {
				require.NoError(t, b.Close(ctx))
			} else if err == nil {
				err = b.Close(ctx)
			}
			var berr *BatchError
			require.ErrorAs(t, err, &berr)
			require.Equal(t, int64(badRow-1), berr.Row)
			require.Equal(t, strconv.Itoa(badRow), berr.Cursor)
			if kind.column != "" {
				require.Equal(t, kind.column, berr.Column)
			}
			if kind.name != "type" {
				var pgErr *pgconn.PgError
				require.ErrorAs(t, err, &pgErr)
				require.Equal(t, kind.sqlstate, pgErr.Code)
				require.Equal(t, kind.sqlstate, berr.SQLState)
				require.True(t, berr.Committed)
			}
			t.Log(err)
			// Everything before the bad row is committed, nothing after it.
			bd.requireExactly(t, badRow-1)
			cp, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, "fail")
			require.NoError(t, err)
			require.Equal(t, strconv.Itoa(badRow-1), cp.Cursor)
		})
	}
}

func TestBatchMaxRejects(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "maxrej")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable, MaxRejects: 3, CommitRows: 1000})
	require.NoError(t, err)
	bad := map[int64]bool{10: true, 1500: true, 2500: true, 3500: true, 3600: true}
	err = loadWithBad(ctx, b, 5000, bad, badKinds[0])
	if err == nil {
		err = b.Close(ctx)
	}
	require.ErrorIs(t, err, ErrTooManyRejects)
	_ = b.Close(ctx)
	// Batches 1-3 committed with their 3 rejects; batch 4 (with the 4th) did not.
	bd.requireExactly(t, 3000, 10, 1500, 2500)
	require.Equal(t, int64(3), bd.db.Int(t, "SELECT count(*) FROM "+bd.db.Schema+".reject"))
}

// TestBatchBisect: an error without a COPY line (a deferred constraint, raised at
// COMMIT) is pinned to its row by bisection in O(log n) probes.
func TestBatchBisect(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	bd.db.Exec(t, `ALTER TABLE items ADD CONSTRAINT qty_uniq UNIQUE (name) DEFERRABLE INITIALLY DEFERRED`)
	s := bd.session(t, "bisect")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable, CommitRows: 10_000})
	require.NoError(t, err)
	for i := int64(1); i <= 10_000; i++ {
		r := itemRow(i)
		if i == 7777 {
			r[1] = "item 5" // duplicate name, found only at COMMIT
		}
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), r...))
	}
	require.NoError(t, b.Close(ctx))
	bd.requireExactly(t, 10_000, 7777)
	probes := s.Stat().Retries()["bisect_probe"]
	t.Logf("bisect probes for one bad row in 10,000: %d", probes)
	require.LessOrEqual(t, probes, int64(15))
	require.Positive(t, probes)
}
