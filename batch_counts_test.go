package pgetl

import (
	"context"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// TestBatchCounts: BatchResult and Stat say what each load did with its rows, on
// every path that learns it: a plain insert, a merge (DO UPDATE; OnlyChanged;
// IgnoreExisting), a key cache, a batch set (a table inserted straight, a header
// table retried as a merge, rows rejected for an unknown key left out); and the
// statement path, which does not learn the split, reports none. Over every batch
// Rows = Inserted + Updated + Unchanged + Merged, and Stat sums the batches.
func TestBatchCounts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	type counts struct{ rows, ins, upd, unch, merged int64 }
	for _, c := range []struct {
		name string
		cfg  func(db *pgtest.DB) BatchConfig
		want counts
	}{
		// kv holds keys 1..100 with v = 'old'; the load adds keys 51..250 (v = 'new',
		// but 'old' for keys 51..60), key 200 twice (the second wins).
		{"insert", func(db *pgtest.DB) BatchConfig {
			return BatchConfig{Table: db.Schema + ".kv2", Columns: []string{"k", "v"}}
		}, counts{201, 201, 0, 0, 0}},
		{"merge", func(db *pgtest.DB) BatchConfig {
			return BatchConfig{Table: db.Schema + ".kv", Columns: []string{"k", "v"}, Key: []string{"k"}}
		}, counts{201, 150, 50, 0, 1}},
		{"merge_only_changed", func(db *pgtest.DB) BatchConfig {
			return BatchConfig{Table: db.Schema + ".kv", Columns: []string{"k", "v"}, Key: []string{"k"}, OnlyChanged: true}
		}, counts{201, 150, 40, 10, 1}},
		{"ignore_existing", func(db *pgtest.DB) BatchConfig {
			return BatchConfig{Table: db.Schema + ".kv", Columns: []string{"k", "v"}, Key: []string{"k"}, IgnoreExisting: true}
		}, counts{201, 150, 0, 50, 1}},
		{"key_cache", func(db *pgtest.DB) BatchConfig {
			keys, err := NewCache[int64, struct{}](CacheConfig{})
			require.NoError(t, err)
			require.NoError(t, keys.Preload(ctx, db.Pool, Lookup{Table: db.Schema + ".kv", Key: "k"}))
			return BatchConfig{Table: db.Schema + ".kv", Columns: []string{"k", "v"}, Key: []string{"k"}, KeyCache: keys}
		}, counts{201, 150, 50, 0, 1}},
		{"statement", func(db *pgtest.DB) BatchConfig {
			return BatchConfig{SQL: "INSERT INTO " + db.Schema + ".kv2 (k, v) VALUES ($1, $2)"}
		}, counts{201, 0, 0, 0, 0}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			db := pgtest.New(t)
			db.Exec(t, `CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL);
				CREATE TABLE kv2 (k bigint, v text NOT NULL);
				INSERT INTO kv SELECT g, 'old' FROM generate_series(1, 100) g`)
			s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "counts", CheckpointSchema: db.Schema})
			require.NoError(t, err)
			defer s.Close(ctx)
			cfg := c.cfg(db)
			var mu sync.Mutex
			var sum counts
			cfg.CommitRows = 80
			cfg.OnCommitFunc = func(r BatchResult) {
				mu.Lock()
				defer mu.Unlock()
				sum.rows, sum.ins, sum.upd, sum.unch, sum.merged = sum.rows+r.Rows, sum.ins+r.Inserted, sum.upd+r.Updated,
					sum.unch+r.Unchanged, sum.merged+r.Merged
				if r.Inserted+r.Updated+r.Unchanged+r.Merged > 0 {
					require.Equal(t, r.Rows, r.Inserted+r.Updated+r.Unchanged+r.Merged, "batch %d", r.Seq)
				}
			}
			b, err := s.Batch(ctx, cfg)
			require.NoError(t, err)
			i := 0
			add := func(k int64) {
				i++
				v := "new"
				if k <= 60 {
					v = "old"
				}
				require.NoError(t, b.Add(ctx, strconv.Itoa(i), k, v))
			}
			for k := int64(51); k <= 250; k++ {
				add(k)
				if k == 199 {
					add(200) // key 200 twice in one batch (rows 150 and 151: the same batch of 80)
				}
			}
			require.NoError(t, b.Close(ctx))
			require.Equal(t, c.want, sum)
			st := s.Stat()
			require.Equal(t, c.want, counts{st.Rows(), st.Inserted(), st.Updated(), st.Unchanged(), st.Merged()})
		})
	}

	t.Run("batch_set", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		const n, customers, products = 2_000, 50, 100
		starSchema(t, db, products)
		// Order 100 exists: its header is kept (unchanged), its batch retried as a merge.
		db.Exec(t, `INSERT INTO customers (email, name) VALUES ('old@example.com', 'Old');
			INSERT INTO orders SELECT 100, id, '2000-01-01Z' FROM customers`)
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "set-counts", CheckpointSchema: db.Schema})
		require.NoError(t, err)
		defer s.Close(ctx)
		j := newStarJob(t, db, s, 300, RejectToTable)
		var mu sync.Mutex
		var sum counts
		j.cfgs[0].OnCommitFunc = func(r BatchResult) {
			mu.Lock()
			defer mu.Unlock()
			require.Equal(t, r.Rows, r.Inserted+r.Updated+r.Unchanged+r.Merged, "batch %d", r.Seq)
			sum.rows, sum.ins, sum.upd, sum.unch, sum.merged = sum.rows+r.Rows, sum.ins+r.Inserted, sum.upd+r.Updated,
				sum.unch+r.Unchanged, sum.merged+r.Merged
		}
		require.NoError(t, j.run(ctx, 1, n, customers, products, 0, func(i int64, sku string) string {
			if i == 777 {
				return "SKU-NOPE" // rejected: not a row of the table
			}
			return sku
		}))
		headers, lines := int64(n/4), int64(n-1)
		want := counts{headers + lines, headers - 1 + lines, 0, 1, 0}
		require.Equal(t, want, sum)
		st := s.Stat()
		require.Equal(t, want, counts{st.Rows(), st.Inserted(), st.Updated(), st.Unchanged(), st.Merged()})
		require.Equal(t, int64(1), st.Retries()["key_conflict"])
	})
}
