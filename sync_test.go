package pgetl

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/stretchr/testify/require"
)

// syncSource describes a sync of the products table: rows 1..n at version v where
// changedEvery divides i (else version 1), without the rows missingEvery drops.
type syncSource struct{ n, v, changedEvery, missingEvery int64 }

// run syncs the products table of schema with src through a new session of job
// (Restart: a new sync run) and returns its stat and sweep result.
func (src syncSource) run(t *testing.T, pool *pgxpool.Pool, schema, job string, sc SyncConfig, commitRows int) (Stat, SweepResult, error) {
	t.Helper()
	ctx := context.Background()
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: schema, Restart: true})
	require.NoError(t, err)
	defer s.Close(ctx)
	b, err := s.Batch(ctx, BatchConfig{Table: schema + ".products", Columns: workload.Columns, Key: []string{"sku"},
		OnlyChanged: true, Sync: &sc, CommitRows: commitRows})
	require.NoError(t, err)
	for i := int64(1); i <= src.n; i++ {
		if workload.Missing(i, src.missingEvery) {
			continue
		}
		vals := workload.Row(i, workload.SyncVersion(i, src.v, src.changedEvery)).Values()
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), vals...))
	}
	res, err := b.Sweep(ctx)
	require.NoError(t, b.Close(ctx))
	return s.Stat(), res, err
}

// requireSynced checks that the products table holds exactly the rows of src.
func requireSynced(t *testing.T, db *pgtest.DB, src syncSource) {
	t.Helper()
	wantN, wantSum := workload.SyncChecksum(src.n, src.v, src.changedEvery, src.missingEvery)
	n, sum, err := workload.QueryChecksum(context.Background(), db.Pool, db.Ident("products"))
	require.NoError(t, err)
	require.Equal(t, wantN, n, "rows")
	require.Equal(t, wantSum, sum, "checksum")
}

// loadProducts creates the products table holding rows 1..n at version 1.
func loadProducts(t *testing.T, db *pgtest.DB, n int64) {
	t.Helper()
	db.Exec(t, workload.CreateSQL(db.Ident("products"), true))
	_, err := db.Pool.CopyFrom(context.Background(), pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, n, 1))
	require.NoError(t, err)
}

// TestSync is the example at a hundredth of its size: a table of rows
// 1..5,000 at version 1 synced with rows 1..5,050 where every 100th is at version
// 2 and every 200th is missing: exactly those rows remain, and the counts say 50
// new, 50 updated, 25 deleted, the rest unchanged.
func TestSync(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	loadProducts(t, db, 5000)
	src := syncSource{n: 5050, v: 2, changedEvery: 100, missingEvery: 200}
	st, res, err := src.run(t, db.Pool, db.Schema, "sync", SyncConfig{}, 1000)
	require.NoError(t, err)
	requireSynced(t, db, src)
	require.Equal(t, int64(50), st.Inserted(), "rows 5001..5050 (none missing: the next is 5199)")
	require.Equal(t, int64(50), st.Updated())
	require.Equal(t, int64(25), st.Deleted())
	require.Equal(t, int64(25), res.Deleted)
	require.Equal(t, int64(5000-25-50), st.Unchanged())
	require.Equal(t, int64(0), st.Merged())

	// A second sync with the same source changes nothing.
	st, res, err = src.run(t, db.Pool, db.Schema, "sync", SyncConfig{}, 1000)
	require.NoError(t, err)
	requireSynced(t, db, src)
	require.Equal(t, int64(0), st.Inserted()+st.Updated()+st.Deleted()+res.Deleted)
	require.Equal(t, int64(5050-25), st.Unchanged())
}

// TestSyncGuard: a source that lost half its rows deletes nothing and says why.
func TestSyncGuard(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	loadProducts(t, db, 4000)
	src := syncSource{n: 2000, v: 1}
	_, res, err := src.run(t, db.Pool, db.Schema, "guard", SyncConfig{}, 0)
	require.ErrorIs(t, err, ErrTooManyDeletes)
	require.Contains(t, err.Error(), "2000 of the 4000 rows")
	require.Equal(t, int64(0), res.Deleted)
	require.Equal(t, int64(4000), db.Int(t, "SELECT count(*) FROM "+db.Ident("products")))
	// Told so, the sweep deletes them.
	_, res, err = src.run(t, db.Pool, db.Schema, "guard", SyncConfig{MaxDeleteRatio: 0.5}, 0)
	require.NoError(t, err)
	require.Equal(t, int64(2000), res.Deleted)
	requireSynced(t, db, src)
}

// TestSyncMarkColumn: with MarkColumn the sweep marks the missing rows instead of
// deleting them, a marked row is not marked again, and a row that comes back is
// written again with its mark cleared.
func TestSyncMarkColumn(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	db.Exec(t, "CREATE TABLE "+db.Ident("items")+" (sku text PRIMARY KEY, qty int NOT NULL, deleted_at timestamptz)")
	run := func(skus ...string) (Stat, SweepResult) {
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "mark", CheckpointSchema: db.Schema, Restart: true})
		require.NoError(t, err)
		defer s.Close(ctx)
		b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".items", Columns: []string{"sku", "qty", "deleted_at"}, Key: []string{"sku"},
			Sync: &SyncConfig{MarkColumn: "deleted_at", MaxDeleteRatio: 1}, CommitRows: 2})
		require.NoError(t, err)
		for i, sku := range skus {
			require.NoError(t, b.Add(ctx, strconv.Itoa(i), sku, int32(7), nil))
		}
		res, err := b.Sweep(ctx)
		require.NoError(t, err)
		require.NoError(t, b.Close(ctx))
		return s.Stat(), res
	}
	marked := func() int64 {
		return db.Int(t, "SELECT count(*) FROM "+db.Ident("items")+" WHERE deleted_at IS NOT NULL")
	}
	st, _ := run("a", "b", "c", "d", "e")
	require.Equal(t, int64(5), st.Inserted())
	st, res := run("a", "c", "e")
	require.Equal(t, int64(2), res.Deleted)
	require.Equal(t, int64(3), st.Unchanged())
	require.Equal(t, int64(2), marked())
	require.Equal(t, int64(5), db.Int(t, "SELECT count(*) FROM "+db.Ident("items")), "marked, not deleted")
	st, res = run("a", "b", "c", "e")
	require.Equal(t, int64(0), res.Deleted, "d is marked already")
	require.Equal(t, int64(1), st.Updated(), "b comes back")
	require.Equal(t, int64(1), marked())
	require.Equal(t, int64(1), db.Int(t, "SELECT count(*) FROM "+db.Ident("items")+" WHERE sku = 'd' AND deleted_at IS NOT NULL"))
}

// TestTupleWriter: a binary COPY stream cut at every byte parses to the same tuples.
func TestTupleWriter(t *testing.T) {
	t.Parallel()
	stream := append([]byte(nil), copyHeader...)
	var want [][]byte
	for i := range 50 {
		tup := []byte{0, 2}
		tup = append(tup, 0, 0, 0, byte(i%5))
		tup = append(tup, make([]byte, i%5)...)
		tup = append(tup, 0xff, 0xff, 0xff, 0xff) // NULL
		want = append(want, tup)
		stream = append(stream, tup...)
	}
	stream = append(stream, copyTrailer...)
	for _, step := range []int{1, 2, 3, 7, 64, len(stream)} {
		var got [][]byte
		w := &tupleWriter{fn: func(tup []byte) error { got = append(got, append([]byte(nil), tup...)); return nil }}
		for p := 0; p < len(stream); p += step {
			_, err := w.Write(stream[p:min(p+step, len(stream))])
			require.NoError(t, err)
		}
		require.True(t, w.done, "step %d", step)
		require.Equal(t, want, got, "step %d", step)
	}
}

// TestSyncInDoubt: the reply of a sync batch's COMMIT is lost while the server is
// briefly unreachable; the batch is found committed (by the replay's fence), its
// hashes and counts are taken once, and the sweep deletes exactly the missing rows.
func TestSyncInDoubt(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	loadProducts(t, db, 3000)
	ctx := context.Background()
	g := newGate()
	pool := g.pool(t, db.URL)
	tr := newTrigger(t)
	s, err := NewSession(ctx, pool, SessionConfig{Job: "syncdoubt", CheckpointSchema: db.Schema,
		Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: 1000},
		beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
			if seq == 2 && attempt == 1 {
				g.arm(pgc)
				tr.pull(seq)
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	src := syncSource{n: 3000, v: 2, changedEvery: 10, missingEvery: 100}
	var res SweepResult
	job := goJob(func() error {
		b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"},
			Sync: &SyncConfig{}, CommitRows: 1000, InFlight: 1, CommitInterval: -1})
		if err != nil {
			return err
		}
		for i := int64(1); i <= src.n; i++ {
			if !workload.Missing(i, src.missingEvery) {
				if err := b.Add(ctx, strconv.FormatInt(i, 10), workload.Row(i, workload.SyncVersion(i, src.v, src.changedEvery)).Values()...); err != nil {
					return err
				}
			}
		}
		if res, err = b.Sweep(ctx); err != nil {
			return err
		}
		return b.Close(ctx)
	})
	tr.wait(t, job, 30*time.Second)
	tr.release()
	g.committedThenUnreachable(t, db.Pool, db.Schema, "syncdoubt", 2)
	g.reachableAfter(t, 2)
	require.NoError(t, waitJob(t, job, 60*time.Second))
	requireSynced(t, db, src)
	st := s.Stat()
	require.Equal(t, int64(1), st.Retries()["in_doubt_committed"], "%v", st.Retries())
	require.Equal(t, int64(300), st.Updated(), "each changed row counted once")
	require.Equal(t, int64(0), st.Inserted())
	require.Equal(t, int64(30), st.Deleted())
	require.Equal(t, int64(30), res.Deleted)
	require.Equal(t, int64(3000-300-30), st.Unchanged())
}

// TestSyncRejects: rows refused by Add (a value its column cannot take) and by the
// server (a NOT NULL violation, isolated in the batch's transaction) are in the
// source: the sweep keeps their rows, and deletes only the missing ones.
func TestSyncRejects(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	loadProducts(t, db, 1000)
	ctx := context.Background()
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "syncrej", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)
	b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"},
		Sync: &SyncConfig{}, Rejects: RejectToTable, CommitRows: 300})
	require.NoError(t, err)
	for i := int64(1); i <= 1000; i++ {
		if i%100 == 99 {
			continue // missing: 10 rows
		}
		vals := workload.Row(i, workload.SyncVersion(i, 2, 10)).Values()
		switch i {
		case 500:
			vals[1] = nil // NOT NULL: the server refuses the row
		case 700:
			vals[3] = "lots" // not an int: Add refuses the row
		}
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), vals...))
	}
	res, err := b.Sweep(ctx)
	require.NoError(t, err)
	require.NoError(t, b.Close(ctx))
	require.Equal(t, int64(10), res.Deleted)
	st := s.Stat()
	require.Equal(t, int64(2), st.Rejects())
	require.Equal(t, int64(100-2), st.Updated(), "every 10th row changed, less the two rejected")
	require.Equal(t, int64(990), db.Int(t, "SELECT count(*) FROM "+db.Ident("products")))
	// The rejected rows keep their version 1.
	require.Equal(t, int64(2), db.Int(t, "SELECT count(*) FROM "+db.Ident("products")+" WHERE sku IN ($1, $2) AND name LIKE '% v1'",
		workload.SKU(500), workload.SKU(700)))
}
