package pgetl

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

func requireCacheCounts(t *testing.T, st CacheStat, hits, misses int64, what string) {
	t.Helper()
	require.Equal(t, hits, st.Hits(), "hits %s", what)
	require.Equal(t, misses, st.Misses(), "misses %s", what)
}

// TestCacheStatCountsLookupsOnce: for known workloads, Hits and Misses count each
// lookup exactly once. Before, an upsert with a key cache counted every row twice
// (at Add, and again when its batch's new keys were added to the cache), and a job
// checking a key again after its commit (the products example) counted it again.
func TestCacheStatCountsLookupsOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("key-cache", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE t (k text PRIMARY KEY, v int NOT NULL)")
		db.Exec(t, "INSERT INTO t SELECT 'k' || i, 0 FROM generate_series(1, 50) i")
		keys, err := NewCache[string, struct{}](CacheConfig{})
		require.NoError(t, err)
		require.NoError(t, keys.Preload(ctx, db.Pool, Lookup{Table: db.Schema + ".t", Key: "k"}))
		requireCacheCounts(t, keys.Stat(), 0, 0, "after Preload")
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "kc", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		load := func() {
			b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"k", "v"}, Key: []string{"k"}, KeyCache: keys,
				CommitRows: 30, CommitInterval: -1})
			require.NoError(t, err)
			for i := 1; i <= 100; i++ {
				require.NoError(t, b.Add(ctx, fmt.Sprint(i), fmt.Sprintf("k%d", i), i))
			}
			require.NoError(t, b.Close(ctx))
		}
		load() // keys 1..50 known, 51..100 new
		requireCacheCounts(t, keys.Stat(), 50, 50, "first pass")
		require.Equal(t, int64(100), keys.Stat().Len(), "the new keys were added after their commit")
		load() // every key known
		requireCacheCounts(t, keys.Stat(), 150, 50, "second pass")
		require.Equal(t, int64(100), db.Int(t, "SELECT count(*) FROM "+db.Schema+".t WHERE v > 0"))
	})

	t.Run("lookup-column", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE customers (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text)")
		db.Exec(t, "CREATE TABLE visits (n int PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers)")
		db.Exec(t, "INSERT INTO customers (email) SELECT 'e' || i FROM generate_series(0, 9) i")
		cache, err := NewCache[string, int64](CacheConfig{})
		require.NoError(t, err)
		src := Lookup{Table: db.Schema + ".customers", Key: "email", Value: "id", InsertColumns: []string{"name"}}
		require.NoError(t, cache.Preload(ctx, db.Pool, src))
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "lc", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		load := func(from int) {
			set, err := s.Batches(ctx, BatchConfig{Table: db.Schema + ".visits", Columns: []string{"n", "customer_id"},
				CommitRows: 1000, CommitInterval: -1,
				Lookups: []LookupColumn{{Column: "customer_id", Mode: GetOrCreate, Cache: cache, Source: src}}})
			require.NoError(t, err)
			for i := from; i < from+100; i++ {
				require.NoError(t, set.Add(ctx, fmt.Sprint(i), []any{i, fmt.Sprintf("e%d", i%20), "name"}))
			}
			require.NoError(t, set.Close(ctx))
		}
		load(0) // one batch: e0..e9 cached (50 rows), e10..e19 not (50 rows)
		requireCacheCounts(t, cache.Stat(), 50, 50, "first pass")
		require.Equal(t, int64(20), cache.Stat().Len())
		load(100) // every key cached
		requireCacheCounts(t, cache.Stat(), 150, 50, "second pass")
	})

	t.Run("get-or-create", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE customers (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL)")
		cache, err := NewCache[string, int64](CacheConfig{})
		require.NoError(t, err)
		cache.Put("a", 1)
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "goc", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		src := Lookup{Table: db.Schema + ".customers", Key: "email", Value: "id"}
		require.NoError(t, s.Tx(ctx, func(tx pgx.Tx) error {
			_, err := cache.GetOrCreate(ctx, tx, src, []string{"a", "b", "a", "c", "b"})
			return err
		}))
		// Distinct keys: a (hit), b and c (misses).
		requireCacheCounts(t, cache.Stat(), 1, 2, "GetOrCreate")
		_, ok := cache.Get("b")
		require.True(t, ok)
		requireCacheCounts(t, cache.Stat(), 2, 2, "Get")
		require.True(t, cache.Contains("c"))
		require.False(t, cache.Contains("d"))
		requireCacheCounts(t, cache.Stat(), 2, 2, "Contains counts nothing")
	})
}
