package pgetl

import (
	"context"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/stretchr/testify/require"
)

// TestBatchThroughPgBouncer runs every batch path through PgBouncer in transaction
// mode: insert, both upsert strategies (the staging table lives and dies inside the
// batch's one transaction), the statement path, Session.Tx and the cache's
// get-or-create. Nothing relies on session state between transactions.
func TestBatchThroughPgBouncer(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	tbl := pgx.Identifier{db.Schema, "products"}.Sanitize()
	db.Exec(t, workload.CreateSQL(tbl, true))
	db.Exec(t, "CREATE TABLE dim (id bigserial PRIMARY KEY, sku text UNIQUE NOT NULL)")

	pool, err := NewPool(ctx, pgtest.WithParam(pgtest.PgBouncerURL(t), PoolerKey, "pgbouncer"))
	require.NoError(t, err)
	defer pool.Close()
	s, err := NewSession(ctx, pool, SessionConfig{Job: "bouncer", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)

	const n = 20_000
	load := func(cfg BatchConfig, v int64) {
		t.Helper()
		addProducts(t, s, cfg, n, v)
		requireProducts(t, db, tbl, n, v)
	}
	base := BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, CommitRows: 2000}
	load(base, 1)
	merge := base
	merge.Key = []string{"sku"}
	load(merge, 2)
	keys, err := NewCache[string, struct{}](CacheConfig{})
	require.NoError(t, err)
	require.NoError(t, keys.Preload(ctx, pool, Lookup{Table: tbl, Key: "sku"}))
	cached := merge
	cached.KeyCache = keys
	load(cached, 3)

	b, err := s.Batch(ctx, BatchConfig{SQL: "UPDATE " + tbl + " SET inventory = $2 WHERE sku = $1", CommitRows: 500})
	require.NoError(t, err)
	for i := int64(1); i <= 1000; i++ {
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), workload.SKU(i), int32(-1)))
	}
	require.NoError(t, b.Close(ctx))
	require.Equal(t, int64(1000), db.Int(t, "SELECT count(*) FROM "+tbl+" WHERE inventory = -1"))

	ids, err := NewCache[string, int64](CacheConfig{})
	require.NoError(t, err)
	for round := range 3 {
		require.NoError(t, s.Tx(ctx, func(tx pgx.Tx) error {
			_, err := ids.GetOrCreate(ctx, tx, Lookup{Table: db.Schema + ".dim", Key: "sku", Value: "id"},
				[]string{"a", "b", strconv.Itoa(round)})
			return err
		}))
	}
	require.Equal(t, int64(5), db.Int(t, "SELECT count(*) FROM dim"))
	require.Equal(t, int64(5), ids.Stat().Len())
}
