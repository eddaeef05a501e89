package pgetl

import (
	"context"
	"fmt"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/stretchr/testify/require"
)

// TestBatchUpsert loads rows 1..n at version 1 for the odd half, then upserts all of
// 1..n at version 2: the table must equal the generator's version 2 exactly.
func TestBatchUpsert(t *testing.T) {
	t.Parallel()
	const n = 200_000
	for _, strategy := range []string{"merge", "merge_only_changed", "key_cache"} {
		t.Run(strategy, func(t *testing.T) {
			t.Parallel()
			db := pgtest.New(t)
			ctx := context.Background()
			tbl := oddProducts(t, db, n)
			var before int64
			require.NoError(t, db.Pool.QueryRow(ctx, "SELECT max(id) FROM "+tbl).Scan(&before))

			s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "upsert", CheckpointSchema: db.Schema})
			require.NoError(t, err)
			defer s.Close(ctx)
			cfg := BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"}, OnlyChanged: strategy == "merge_only_changed"}
			if strategy == "key_cache" {
				keys, err := NewCache[string, struct{}](CacheConfig{})
				require.NoError(t, err)
				require.NoError(t, keys.Preload(ctx, db.Pool, Lookup{Table: tbl, Key: "sku"}))
				cfg.KeyCache = keys
			}
			addProducts(t, s, cfg, n, 2)
			requireProducts(t, db, tbl, n, 2)
			// Existing rows were updated in place (same id), not re-inserted.
			require.Equal(t, int64(n/2), db.Int(t, "SELECT count(*) FROM "+tbl+" WHERE id <= $1", before))
			require.Equal(t, int64(n), s.Stat().Rows())
		})
	}
}

// oddSource yields version 1 of the odd rows 1..n.
type oddSource struct{ i, n int64 }

func (s *oddSource) Next() bool { s.i += 2; return s.i-2 <= s.n }
func (s *oddSource) Values() ([]any, error) {
	return workload.Row(s.i-2, 1).Values(), nil
}
func (s *oddSource) Err() error { return nil }

// oddProducts creates the products table in db's schema holding version 1 of the
// odd rows of 1..n (half the keys of an upsert of 1..n), and returns its quoted name.
func oddProducts(t *testing.T, db *pgtest.DB, n int64) string {
	t.Helper()
	tbl := pgx.Identifier{db.Schema, "products"}.Sanitize()
	db.Exec(t, workload.CreateSQL(tbl, true))
	_, err := db.Pool.CopyFrom(context.Background(), pgx.Identifier{db.Schema, "products"}, workload.Columns, &oddSource{i: 1, n: n})
	require.NoError(t, err)
	return tbl
}

// addProducts adds rows 1..n at version v through a batch session for cfg, cursor =
// row number, and closes it.
func addProducts(t *testing.T, s *Session, cfg BatchConfig, n, v int64) {
	t.Helper()
	ctx := context.Background()
	b, err := s.Batch(ctx, cfg)
	require.NoError(t, err)
	for i := int64(1); i <= n; i++ {
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), workload.Row(i, v).Values()...))
	}
	require.NoError(t, b.Close(ctx))
}

// requireProducts checks that table tbl equals rows 1..n at version v exactly.
func requireProducts(t *testing.T, db *pgtest.DB, tbl string, n, v int64) {
	t.Helper()
	cnt, sum, err := workload.QueryChecksum(context.Background(), db.Pool, tbl)
	require.NoError(t, err)
	wc, ws := workload.Checksum(n, v)
	require.Equal(t, wc, cnt)
	require.Equal(t, ws, sum, "table content equals version %d of the generator", v)
}

// TestBatchUpsertDuplicateKeys: a key that appears several times in one batch does
// not make ON CONFLICT fail; the last row wins. A rerun with OnlyChanged rewrites
// nothing.
func TestBatchUpsertDuplicateKeys(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	tbl := pgx.Identifier{db.Schema, "products"}.Sanitize()
	db.Exec(t, workload.CreateSQL(tbl, true))
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "dups", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)
	cfg := BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"}, OnlyChanged: true, CommitRows: 50}
	b, err := s.Batch(ctx, cfg)
	require.NoError(t, err)
	for v := int64(1); v <= 3; v++ {
		for i := int64(1); i <= 20; i++ {
			require.NoError(t, b.Add(ctx, fmt.Sprint(v, ":", i), workload.Row(i, v).Values()...))
		}
	}
	require.NoError(t, b.Close(ctx))
	cnt, sum, err := workload.QueryChecksum(ctx, db.Pool, tbl)
	require.NoError(t, err)
	wc, ws := workload.Checksum(20, 3)
	require.Equal(t, wc, cnt)
	require.Equal(t, ws, sum)

	// Rows merged into a later row of their key count as loaded, in memory and in the
	// checkpoint alike.
	mem, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	stored, err := ReadCheckpoint(ctx, db.Pool, db.Schema, "dups")
	require.NoError(t, err)
	require.Equal(t, int64(60), mem.Rows)
	require.Equal(t, mem.Rows, stored.Rows)

	xmin := db.Int(t, "SELECT sum(xmin::text::bigint) FROM "+tbl)
	b, err = s.Batch(ctx, cfg)
	require.NoError(t, err)
	for i := int64(1); i <= 20; i++ {
		require.NoError(t, b.Add(ctx, fmt.Sprint("again:", i), workload.Row(i, 3).Values()...))
	}
	require.NoError(t, b.Close(ctx))
	require.Equal(t, xmin, db.Int(t, "SELECT sum(xmin::text::bigint) FROM "+tbl), "unchanged rows are not rewritten")
}

func TestBatchUpsertBadKey(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	db.Exec(t, "CREATE TABLE t (k text, v int)")
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "badkey", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)
	_, err = s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"k", "v"}, Key: []string{"k"}})
	require.ErrorContains(t, err, "42P10", "no unique index matches the key: reported at Batch")
	_, err = s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"k", "v"}, Key: []string{"x"}})
	require.ErrorContains(t, err, `key column "x" is not in Columns`)
}

// TestBatchStatementPath runs a user statement per row, pipelined, with a bad row
// pinned by its statement.
func TestBatchStatementPath(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	bd.db.Exec(t, "CREATE TABLE totals (k int PRIMARY KEY, n bigint NOT NULL)")
	s := bd.session(t, "stmt")
	b, err := s.Batch(ctx, BatchConfig{
		SQL:     "INSERT INTO " + bd.db.Schema + ".totals AS t (k, n) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET n = t.n + EXCLUDED.n",
		Columns: []string{"k", "n"}, CommitRows: 300, Rejects: RejectToTable,
	})
	require.NoError(t, err)
	for i := int64(1); i <= 1000; i++ {
		var n any = i
		if i == 555 {
			n = nil // NOT NULL violation, pinned to its statement
		}
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), i%10, n))
	}
	require.NoError(t, b.Close(ctx))
	require.Equal(t, int64(10), bd.db.Int(t, "SELECT count(*) FROM totals"))
	require.Equal(t, int64(1000*1001/2-555), bd.db.Int(t, "SELECT sum(n)::bigint FROM totals"))
	require.Equal(t, int64(554), bd.db.Int(t, "SELECT row_index FROM reject WHERE job = 'stmt'"))
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, "1000", cp.Cursor)

	_, err = s.Batch(ctx, BatchConfig{SQL: "INSERT INTO nowhere VALUES ($1)"})
	require.ErrorContains(t, err, "42P01")
}

// TestBatchUpsertKeyCache: the key-cache strategy gives the same table as the merge,
// also with a stale cache: keys it lacks (inserted by someone else) are updated, and
// keys it holds that the table lost are inserted.
func TestBatchUpsertKeyCache(t *testing.T) {
	t.Parallel()
	const n = 50_000
	db := pgtest.New(t)
	ctx := context.Background()
	tbl := oddProducts(t, db, n)

	keys, err := NewCache[string, struct{}](CacheConfig{})
	require.NoError(t, err)
	require.NoError(t, keys.Preload(ctx, db.Pool, Lookup{Table: tbl, Key: "sku"}))
	require.Equal(t, int64(n/2), keys.Stat().Len())
	// Stale both ways: 100 existing keys the cache does not know, 100 known keys the
	// table lost.
	db.Exec(t, "INSERT INTO "+tbl+" (sku, name, price, inventory, updated_at) SELECT sku, 'x', 0, 0, now() FROM generate_series(2, 200, 2) i, LATERAL (SELECT 'SKU-' || lpad(i::text, 7, '0') AS sku) s")
	db.Exec(t, "DELETE FROM "+tbl+" WHERE sku IN (SELECT 'SKU-' || lpad(i::text, 7, '0') FROM generate_series(1001, 1199, 2) i)")

	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "keycache", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)
	addProducts(t, s, BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"}, KeyCache: keys, CommitRows: 10000}, n, 2)
	requireProducts(t, db, tbl, n, 2)
	require.Equal(t, int64(n), keys.Stat().Len(), "inserted keys were added after commit")
	require.Positive(t, s.Stat().Retries()["stale_key"])
	require.LessOrEqual(t, s.Stat().Retries()["stale_key"], int64(n/10000+1), "at most one retry per batch")
	t.Logf("stale-key retries: %d", s.Stat().Retries()["stale_key"])
}

// TestBatchUpsertEdges: a rejected row does not take the earlier row of its key with
// it; keys holding NULL never merge; with a key cache, RejectFail commits exactly
// the rows added before the bad one.
func TestBatchUpsertEdges(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	t.Run("dup_then_reject", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE t (k int PRIMARY KEY, v int NOT NULL CHECK (v >= 0))")
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "dr", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"k", "v"}, Key: []string{"k"}, Rejects: RejectToTable})
		require.NoError(t, err)
		require.NoError(t, b.Add(ctx, "1", 1, 10))
		require.NoError(t, b.Add(ctx, "2", 1, -1)) // bad, and the last row of key 1
		require.NoError(t, b.Close(ctx))
		require.Equal(t, int64(10), db.Int(t, "SELECT v FROM t WHERE k = 1"))
		require.Equal(t, int64(1), db.Int(t, "SELECT count(*) FROM reject"))
	})
	t.Run("null_keys", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE t (a int, b int, v int, UNIQUE (a, b))")
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "nk", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"a", "b", "v"}, Key: []string{"a", "b"}})
		require.NoError(t, err)
		require.NoError(t, b.Add(ctx, "1", 1, nil, 10))
		require.NoError(t, b.Add(ctx, "2", 1, nil, 20))
		require.NoError(t, b.Add(ctx, "3", 1, 2, 30))
		require.NoError(t, b.Add(ctx, "4", 1, 2, 40))
		require.NoError(t, b.Close(ctx))
		require.Equal(t, int64(3), db.Int(t, "SELECT count(*) FROM t"))
		require.Equal(t, int64(40), db.Int(t, "SELECT v FROM t WHERE b = 2"))
	})
	t.Run("key_cache_reject_fail", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE t (k int PRIMARY KEY, v int NOT NULL CHECK (v >= 0)); INSERT INTO t VALUES (1, 0), (2, 0), (3, 0)")
		keys, err := NewCache[int32, struct{}](CacheConfig{})
		require.NoError(t, err)
		require.NoError(t, keys.Preload(ctx, db.Pool, Lookup{Table: db.Schema + ".t", Key: "k"}))
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "kc", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"k", "v"}, Key: []string{"k"}, KeyCache: keys})
		require.NoError(t, err)
		require.NoError(t, b.Add(ctx, "1", int32(1), int32(10)))   // known
		require.NoError(t, b.Add(ctx, "2", int32(100), int32(10))) // new
		require.NoError(t, b.Add(ctx, "3", int32(101), int32(-1))) // new, bad
		require.NoError(t, b.Add(ctx, "4", int32(2), int32(10)))   // known, after the bad row
		require.NoError(t, b.Add(ctx, "5", int32(102), int32(10))) // new, after the bad row
		err = b.Close(ctx)
		var berr *BatchError
		require.ErrorAs(t, err, &berr)
		require.Equal(t, "3", berr.Cursor)
		require.True(t, berr.Committed)
		require.Equal(t, int64(10), db.Int(t, "SELECT v FROM t WHERE k = 1"))
		require.Equal(t, int64(1), db.Int(t, "SELECT count(*) FROM t WHERE k = 100"))
		require.Equal(t, int64(0), db.Int(t, "SELECT v FROM t WHERE k = 2"), "rows after the bad one are not committed")
		require.Zero(t, db.Int(t, "SELECT count(*) FROM t WHERE k = 102"))
		cp, err := ReadCheckpoint(ctx, db.Pool, db.Schema, "kc")
		require.NoError(t, err)
		require.Equal(t, "2", cp.Cursor)
		require.Equal(t, int64(2), cp.Rows)
	})
}

func TestKeyCacheTypeMustMatchKeyColumn(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "keytype")
	wrong, err := NewCache[int32, struct{}](CacheConfig{})
	require.NoError(t, err)
	_, err = s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, KeyCache: wrong})
	require.ErrorContains(t, err, "do not match key column \"id\" of type int8")
	right, err := NewCache[int64, struct{}](CacheConfig{})
	require.NoError(t, err)
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, KeyCache: right})
	require.NoError(t, err)
	require.NoError(t, b.Close(ctx))
	bd.db.Exec(t, "CREATE TABLE named (code varchar(20) PRIMARY KEY, v int NOT NULL)")
	names, err := NewCache[string, struct{}](CacheConfig{})
	require.NoError(t, err)
	b, err = s.Batch(ctx, BatchConfig{Table: bd.db.Schema + ".named", Columns: []string{"code", "v"}, Key: []string{"code"}, KeyCache: names})
	require.NoError(t, err, "a string key fits a varchar column")
	require.NoError(t, b.Close(ctx))
}
