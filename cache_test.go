package pgetl

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// hookTx is a commitHooks around a plain pgx.Tx, for tests that drive the commit and
// the hooks themselves.
type hookTx struct {
	pgx.Tx
	commitFns, rollbackFns []func()
}

func (t *hookTx) onCommit(f func())   { t.commitFns = append(t.commitFns, f) }
func (t *hookTx) onRollback(f func()) { t.rollbackFns = append(t.rollbackFns, f) }

func (t *hookTx) runCommit() {
	for _, f := range t.commitFns {
		f()
	}
}

func (t *hookTx) runRollback() {
	for _, f := range t.rollbackFns {
		f()
	}
}

// inHookTx runs fn in a transaction and commits it, running the hooks as Session.Tx
// does: commit hooks after a confirmed COMMIT, rollback hooks otherwise.
func inHookTx(ctx context.Context, pool *pgxpool.Pool, fn func(pgx.Tx) error) error {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return err
	}
	ht := &hookTx{Tx: tx}
	if err := fn(ht); err != nil {
		_ = tx.Rollback(ctx)
		ht.runRollback()
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		ht.runRollback()
		return err
	}
	ht.runCommit()
	return nil
}

// cacheBundle is a test's database with a products dimension and an order_lines
// fact table referencing it.
type cacheBundle struct {
	db       *pgtest.DB
	products Lookup
}

func setupCache(t *testing.T) *cacheBundle {
	t.Helper()
	db := pgtest.New(t)
	db.Exec(t, `CREATE TABLE products (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		sku text NOT NULL UNIQUE, name text)`)
	db.Exec(t, `CREATE TABLE order_lines (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		product_id bigint NOT NULL REFERENCES products (id), qty int NOT NULL)`)
	return &cacheBundle{db: db, products: Lookup{Table: "products", Key: "sku", Value: "id"}}
}

func skus(from, to int) []string {
	out := make([]string, 0, to-from)
	for i := from; i < to; i++ {
		out = append(out, fmt.Sprintf("SKU-%07d", i))
	}
	return out
}

// tableMap returns sku → id of the products table.
func (b *cacheBundle) tableMap(t *testing.T) map[string]int64 {
	t.Helper()
	rows, err := b.db.Pool.Query(context.Background(), "SELECT sku, id FROM products")
	require.NoError(t, err)
	m, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (kv [2]any, err error) {
		var k string
		var v int64
		err = r.Scan(&k, &v)
		return [2]any{k, v}, err
	})
	require.NoError(t, err)
	out := make(map[string]int64, len(m))
	for _, kv := range m {
		out[kv[0].(string)] = kv[1].(int64)
	}
	return out
}

func newCache[K comparable](t *testing.T, cfg CacheConfig) *Cache[K, int64] {
	t.Helper()
	c, err := NewCache[K, int64](cfg)
	require.NoError(t, err)
	return c
}

func TestCacheGetPutInvalidateReset(t *testing.T) {
	t.Parallel()

	t.Run("string", func(t *testing.T) {
		t.Parallel()
		c := newCache[string](t, CacheConfig{})
		for i, k := range skus(0, 5000) {
			c.Put(k, int64(i))
		}
		for i, k := range skus(0, 5000) {
			v, ok := c.Get(k)
			require.True(t, ok, k)
			require.Equal(t, int64(i), v)
		}
		_, ok := c.Get("nope")
		require.False(t, ok)
		c.Put("SKU-0000007", -7)
		v, _ := c.Get("SKU-0000007")
		require.Equal(t, int64(-7), v)
		c.Invalidate("SKU-0000001", "SKU-0000002", "absent")
		_, ok = c.Get("SKU-0000001")
		require.False(t, ok)
		st := c.Stat()
		require.Equal(t, int64(4998), st.Len())
		require.Equal(t, int64(5001), st.Hits())
		require.Equal(t, int64(2), st.Misses())
		require.Greater(t, st.BytesPerKey(), 0.0)
		require.Equal(t, CacheMaxBytesDefault, st.MaxBytes())
		c.Reset()
		require.Zero(t, c.Stat().Len())
		_, ok = c.Get("SKU-0000003")
		require.False(t, ok)
		c.Put("SKU-0000003", 3)
		v, ok = c.Get("SKU-0000003")
		require.True(t, ok)
		require.Equal(t, int64(3), v)
	})

	t.Run("named string", func(t *testing.T) {
		t.Parallel()
		type SKU string
		c := newCache[SKU](t, CacheConfig{})
		c.Put("a", 1)
		v, ok := c.Get(SKU("a"))
		require.True(t, ok)
		require.Equal(t, int64(1), v)
		require.True(t, c.str)
	})

	t.Run("int keys use a map", func(t *testing.T) {
		t.Parallel()
		c := newCache[int64](t, CacheConfig{})
		require.False(t, c.str)
		for i := range int64(1000) {
			c.Put(i, i*2)
		}
		v, ok := c.Get(500)
		require.True(t, ok)
		require.Equal(t, int64(1000), v)
		c.Invalidate(500)
		_, ok = c.Get(500)
		require.False(t, ok)
		require.Equal(t, int64(999), c.Stat().Len())
		c.Reset()
		require.Zero(t, c.Stat().Len())
		require.Zero(t, c.Stat().Bytes())
	})

	t.Run("config", func(t *testing.T) {
		t.Parallel()
		_, err := NewCache[string, int64](CacheConfig{MaxBytes: -1})
		require.ErrorContains(t, err, "MaxBytes must not be negative")
	})
}

// TestCacheBudget fills a cache beyond its budget: it stops admitting new keys,
// counts them as rejected, stays within the budget and never answers wrong.
func TestCacheBudget(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"string", "int"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			const maxBytes = 256 << 10
			const n = 100_000
			check := func(get func(i int) (int64, bool)) int {
				admitted := 0
				for i := range n {
					if v, ok := get(i); ok {
						require.Equal(t, int64(i), v, "wrong answer for key %d", i)
						admitted++
					}
				}
				return admitted
			}
			var st CacheStat
			var admitted int
			if name == "string" {
				c := newCache[string](t, CacheConfig{MaxBytes: maxBytes})
				keys := skus(0, n)
				for i, k := range keys {
					c.Put(k, int64(i))
				}
				admitted = check(func(i int) (int64, bool) { return c.Get(keys[i]) })
				st = c.Stat()
				// Full: a present key's value can still change.
				c.Put(keys[0], 0)
			} else {
				c := newCache[int](t, CacheConfig{MaxBytes: maxBytes})
				for i := range n {
					c.Put(i, int64(i))
				}
				admitted = check(func(i int) (int64, bool) { return c.Get(i) })
				st = c.Stat()
			}
			require.Positive(t, admitted)
			require.Less(t, admitted, n)
			require.Equal(t, int64(admitted), st.Len())
			require.Equal(t, int64(n-admitted), st.Rejected())
			// Within the budget, up to the allocator's size-class rounding.
			require.LessOrEqual(t, st.Bytes(), int64(maxBytes)*11/10)
			t.Logf("%s: %d of %d keys admitted in %d bytes (%.1f B/key)", name, admitted, n, st.Bytes(), st.BytesPerKey())
		})
	}
}

// TestCacheStaging: entries created in a transaction are visible only after its
// commit; a rollback, or a commit whose hook never ran, leaves no trace.
func TestCacheStaging(t *testing.T) {
	t.Parallel()
	b := setupCache(t)
	ctx := context.Background()
	c := newCache[string](t, CacheConfig{})

	t.Run("rollback", func(t *testing.T) {
		errFault := errors.New("fault after the dimension insert")
		err := inHookTx(ctx, b.db.Pool, func(tx pgx.Tx) error {
			ids, err := c.GetOrCreate(ctx, tx, b.products, []string{"A", "B", "A"})
			require.NoError(t, err)
			require.Len(t, ids, 3)
			require.Equal(t, ids[0], ids[2])
			_, ok := c.Get("A")
			require.False(t, ok, "staged entry visible before commit")
			require.Equal(t, int64(1), c.Stat().StagedTransactions())
			require.Equal(t, int64(2), c.Stat().StagedKeys())
			// A second call in the same transaction sees its own staged entries.
			hits := c.Stat().Hits()
			again, err := c.GetOrCreate(ctx, tx, b.products, []string{"B"})
			require.NoError(t, err)
			require.Equal(t, ids[1], again[0])
			require.Equal(t, hits, c.Stat().Hits(), "staged entries are not published lookups")
			return errFault
		})
		require.ErrorIs(t, err, errFault)
		_, ok := c.Get("A")
		require.False(t, ok)
		require.Zero(t, c.Stat().StagedTransactions())
		require.Zero(t, b.db.Int(t, "SELECT count(*) FROM products"))
	})

	t.Run("commit hook never runs", func(t *testing.T) {
		tx, err := b.db.Pool.Begin(ctx)
		require.NoError(t, err)
		ht := &hookTx{Tx: tx}
		_, err = c.GetOrCreate(ctx, ht, b.products, []string{"C"})
		require.NoError(t, err)
		require.NoError(t, tx.Commit(ctx))
		_, ok := c.Get("C")
		require.False(t, ok, "published without its commit hook")
		ht.runRollback() // what an abandoned attempt does
		require.Zero(t, c.Stat().StagedTransactions())
	})

	t.Run("commit", func(t *testing.T) {
		var ids []int64
		err := inHookTx(ctx, b.db.Pool, func(tx pgx.Tx) error {
			var err error
			ids, err = c.GetOrCreate(ctx, tx, b.products, []string{"D", "C", "E"})
			return err
		})
		require.NoError(t, err)
		want := b.tableMap(t)
		require.Len(t, want, 3) // C from the previous subtest, D, E
		for i, k := range []string{"D", "C", "E"} {
			require.Equal(t, want[k], ids[i])
			v, ok := c.Get(k)
			require.True(t, ok, k)
			require.Equal(t, want[k], v)
		}
		st := c.Stat()
		require.Equal(t, int64(3), st.Published())
		require.Zero(t, st.StagedTransactions())
	})

	t.Run("invalidate drops staged", func(t *testing.T) {
		err := inHookTx(ctx, b.db.Pool, func(tx pgx.Tx) error {
			_, err := c.GetOrCreate(ctx, tx, b.products, []string{"F", "G"})
			c.Invalidate("F")
			return err
		})
		require.NoError(t, err)
		_, ok := c.Get("F")
		require.False(t, ok)
		_, ok = c.Get("G")
		require.True(t, ok)
	})

	t.Run("not a session transaction", func(t *testing.T) {
		tx, err := b.db.Pool.Begin(ctx)
		require.NoError(t, err)
		defer tx.Rollback(ctx) //nolint:errcheck
		_, err = c.GetOrCreate(ctx, tx, b.products, []string{"H"})
		require.EqualError(t, err, "pgetl: Cache.GetOrCreate needs the transaction of Session.Tx (entries are published only after its commit)")
	})

	t.Run("lookup validation", func(t *testing.T) {
		_, err := c.GetOrCreate(ctx, &hookTx{}, Lookup{Table: "products", Key: "sku"}, []string{"H"})
		require.ErrorContains(t, err, "Lookup.Value is required")
	})
}

// TestCacheConcurrentReaders reads (with -race) while transactions publish.
func TestCacheConcurrentReaders(t *testing.T) {
	t.Parallel()
	b := setupCache(t)
	ctx := context.Background()
	c := newCache[string](t, CacheConfig{})
	for i, k := range skus(0, 1000) {
		c.Put(k, int64(-i))
	}
	var done atomic.Bool
	var wg sync.WaitGroup
	var reads atomic.Int64
	for range 4 {
		wg.Go(func() {
			all := skus(0, 3000)
			for !done.Load() {
				for _, k := range all {
					if _, ok := c.Get(k); ok {
						reads.Add(1)
					}
				}
				_ = c.Stat()
			}
		})
	}
	for from := 1000; from < 3000; from += 200 {
		require.NoError(t, inHookTx(ctx, b.db.Pool, func(tx pgx.Tx) error {
			_, err := c.GetOrCreate(ctx, tx, b.products, skus(from, from+200))
			return err
		}))
	}
	done.Store(true)
	wg.Wait()
	want := b.tableMap(t)
	require.Len(t, want, 2000)
	for k, id := range want {
		v, ok := c.Get(k)
		require.True(t, ok)
		require.Equal(t, id, v)
	}
	require.Positive(t, reads.Load())
}

// TestCachePoisoning: the dimension rows are inserted, then the transaction fails
// for real before COMMIT (its backend is terminated) and is replayed by Session.Tx.
// The failed attempt's keys never show in the cache before the replay commits, fact
// rows never violate their foreign key, and the dimension holds each key once.
func TestCachePoisoning(t *testing.T) {
	t.Parallel()
	for _, where := range []string{"in fn", "before commit"} {
		t.Run(where, func(t *testing.T) {
			t.Parallel()
			b := setupCache(t)
			ctx := context.Background()
			c := newCache[string](t, CacheConfig{})
			const batches, perBatch = 20, 50
			var inject atomic.Bool // fault the current attempt
			var staged []string    // keys of the attempt to be faulted
			cfg := SessionConfig{
				Job:              "poison " + where,
				CheckpointSchema: b.db.Schema,
				Retry:            RetryPolicy{InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond},
			}
			if where == "before commit" {
				cfg.beforeCommit = func(ctx context.Context, _ int64, _ int, pc *pgconn.PgConn) {
					if inject.CompareAndSwap(true, false) {
						for _, k := range staged {
							_, ok := c.Get(k)
							require.False(t, ok, "key %s visible before COMMIT", k)
						}
						b.db.Exec(t, "SELECT pg_terminate_backend($1)", pc.PID())
					}
				}
			}
			s, err := NewSession(ctx, b.db.Pool, cfg)
			require.NoError(t, err)
			defer func() { require.NoError(t, s.Close(ctx)) }()

			var lines int64
			for batch := range batches {
				// Each batch has 10 keys of the previous batch (cached if that one
				// committed) and 40 new ones.
				keys := skus(batch*40, batch*40+perBatch)
				inject.Store(batch%3 == 1)
				attempts := 0
				err := s.Tx(ctx, func(tx pgx.Tx) error {
					attempts++
					if attempts > 1 {
						// The failed attempt left nothing in the cache.
						for _, k := range keys[10:] {
							_, ok := c.Get(k)
							require.False(t, ok, "key %s of a failed attempt in the cache", k)
						}
					}
					ids, err := c.GetOrCreate(ctx, tx, b.products, keys)
					if err != nil {
						return err
					}
					if where == "in fn" && inject.CompareAndSwap(true, false) {
						_, err := tx.Exec(ctx, "SELECT pg_terminate_backend(pg_backend_pid())")
						require.Error(t, err)
						return err
					}
					staged = keys[10:]
					_, err = tx.CopyFrom(ctx, pgx.Identifier{"order_lines"}, []string{"product_id", "qty"},
						pgx.CopyFromSlice(len(ids), func(i int) ([]any, error) { return []any{ids[i], 1}, nil }))
					return err
				})
				require.NoError(t, err, "batch %d", batch) // no 23503, ever
				lines += perBatch
				if batch%3 == 1 {
					require.Equal(t, 2, attempts, "batch %d", batch)
				}
			}
			nkeys := int64(batches*40 + 10)
			require.Equal(t, nkeys, b.db.Int(t, "SELECT count(*) FROM products"))
			require.Equal(t, nkeys, b.db.Int(t, "SELECT count(DISTINCT sku) FROM products"))
			require.Equal(t, lines, b.db.Int(t, "SELECT count(*) FROM order_lines"))
			require.Zero(t, b.db.Int(t, `SELECT count(*) FROM order_lines l
				WHERE NOT EXISTS (SELECT FROM products p WHERE p.id = l.product_id)`))
			for k, id := range b.tableMap(t) {
				v, ok := c.Get(k)
				require.True(t, ok, k)
				require.Equal(t, id, v, k)
			}
			st := c.Stat()
			require.Zero(t, st.StagedTransactions())
			require.Equal(t, nkeys, st.Len())
			require.Positive(t, st.Hits(), "later batches hit the cache")
		})
	}
}

func TestCachePreload(t *testing.T) {
	t.Parallel()
	b := setupCache(t)
	ctx := context.Background()
	b.db.Exec(t, `INSERT INTO products (sku) SELECT format('SKU-%s', lpad(g::text, 7, '0'))
		FROM generate_series(0, 9999) AS g`)
	want := b.tableMap(t)

	t.Run("all", func(t *testing.T) {
		t.Parallel()
		c := newCache[string](t, CacheConfig{})
		src := b.products
		src.PageSize = 1000
		require.NoError(t, c.Preload(ctx, b.db.Pool, src))
		st := c.Stat()
		require.Equal(t, int64(10_000), st.PreloadedRows())
		require.Equal(t, int64(11), st.PreloadedPages()) // 10 full pages, then an empty one
		require.Equal(t, int64(10_000), st.Len())
		for k, id := range want {
			v, ok := c.Get(k)
			require.True(t, ok)
			require.Equal(t, id, v)
		}
	})

	t.Run("where", func(t *testing.T) {
		t.Parallel()
		c := newCache[string](t, CacheConfig{})
		src := b.products
		src.PageSize = 300
		src.Where = "sku < 'SKU-0001000'"
		require.NoError(t, c.Preload(ctx, b.db.Pool, src))
		st := c.Stat()
		require.Equal(t, int64(1000), st.Len())
		require.Equal(t, int64(4), st.PreloadedPages())
	})

	t.Run("budget stops it", func(t *testing.T) {
		t.Parallel()
		c := newCache[string](t, CacheConfig{MaxBytes: 64 << 10})
		src := b.products
		src.PageSize = 500
		require.NoError(t, c.Preload(ctx, b.db.Pool, src))
		st := c.Stat()
		require.Positive(t, st.Rejected())
		require.Less(t, st.PreloadedRows(), int64(10_000))
		require.Less(t, st.Len(), int64(10_000))
	})

	t.Run("int keys", func(t *testing.T) {
		t.Parallel()
		c := newCache[int64](t, CacheConfig{})
		require.NoError(t, c.Preload(ctx, b.db.Pool, Lookup{Table: "products", Key: "id", Value: "id", PageSize: 4096}))
		require.Equal(t, int64(10_000), c.Stat().Len())
		require.Equal(t, int64(3), c.Stat().PreloadedPages())
	})

	t.Run("bad table", func(t *testing.T) {
		t.Parallel()
		c := newCache[string](t, CacheConfig{})
		err := c.Preload(ctx, b.db.Pool, Lookup{Table: "nope", Key: "sku", Value: "id"})
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr)
		require.Equal(t, "42P01", pgErr.Code)
	})
}

// TestCacheGetOrCreateConcurrent: two writers with caches of their own create
// overlapping new keys in concurrent transactions. No error, no duplicate, and both
// caches agree with the table.
func TestCacheGetOrCreateConcurrent(t *testing.T) {
	t.Parallel()
	b := setupCache(t)
	ctx := context.Background()
	const n, chunk = 3000, 150
	caches := []*Cache[string, int64]{newCache[string](t, CacheConfig{}), newCache[string](t, CacheConfig{})}
	var wg sync.WaitGroup
	errs := make([]error, len(caches))
	start := make(chan struct{})
	for w, c := range caches {
		wg.Go(func() {
			<-start
			keys := skus(0, n)
			if w == 1 {
				slices.Reverse(keys) // opposite order: overlapping sets meet mid-way
			}
			for i := 0; i < n; i += chunk {
				batch := slices.Clone(keys[i : i+chunk])
				// Overlap with the other writer's batches inside one batch too.
				batch = append(batch, skus((i*7)%n, (i*7)%n+20)...)
				var ids []int64
				err := inHookTx(ctx, b.db.Pool, func(tx pgx.Tx) error {
					var err error
					ids, err = c.GetOrCreate(ctx, tx, b.products, batch)
					return err
				})
				if err != nil {
					errs[w] = err
					return
				}
				for j, k := range batch {
					if v, ok := c.Get(k); !ok || v != ids[j] {
						errs[w] = fmt.Errorf("cache has %s = %d,%v, GetOrCreate said %d", k, v, ok, ids[j])
						return
					}
				}
			}
		})
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	want := b.tableMap(t)
	require.Len(t, want, n)
	require.Equal(t, int64(n), b.db.Int(t, "SELECT count(*) FROM products"))
	for _, c := range caches {
		require.Equal(t, int64(n), c.Stat().Len())
		for k, id := range want {
			v, ok := c.Get(k)
			require.True(t, ok, k)
			require.Equal(t, id, v, k)
		}
	}
	t.Logf("created: %d + %d = %d", caches[0].Stat().Created(), caches[1].Stat().Created(), n)
	require.Equal(t, int64(n), caches[0].Stat().Created()+caches[1].Stat().Created())
}

// TestCacheGetOrCreateRace covers a key that another transaction inserts and commits
// while GetOrCreate waits on it: ON CONFLICT DO NOTHING skips it and the statement's
// snapshot cannot see it, so GetOrCreate reads it with a second query.
func TestCacheGetOrCreateRace(t *testing.T) {
	t.Parallel()
	b := setupCache(t)
	ctx := context.Background()
	c := newCache[string](t, CacheConfig{})

	other, err := b.db.Pool.Begin(ctx)
	require.NoError(t, err)
	var otherID int64
	require.NoError(t, other.QueryRow(ctx, "INSERT INTO products (sku) VALUES ('X') RETURNING id").Scan(&otherID))

	type result struct {
		ids []int64
		err error
	}
	res := make(chan result, 1)
	go func() {
		var ids []int64
		err := inHookTx(ctx, b.db.Pool, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "SET LOCAL application_name = 'cache-race-waiter'")
			if err != nil {
				return err
			}
			ids, err = c.GetOrCreate(ctx, tx, b.products, []string{"W", "X", "Y"})
			return err
		})
		res <- result{ids, err}
	}()
	// Wait (polling) until the waiter is blocked on the other transaction's row.
	deadline := time.Now().Add(10 * time.Second)
	for b.db.Int(t, `SELECT count(*) FROM pg_stat_activity
		WHERE application_name = 'cache-race-waiter' AND wait_event_type = 'Lock'`) == 0 {
		require.True(t, time.Now().Before(deadline), "GetOrCreate never waited for the other transaction")
	}
	require.NoError(t, other.Commit(ctx))
	r := <-res
	require.NoError(t, r.err)
	require.Equal(t, otherID, r.ids[1])
	want := b.tableMap(t)
	require.Len(t, want, 3)
	require.Equal(t, []int64{want["W"], want["X"], want["Y"]}, r.ids)
	v, ok := c.Get("X")
	require.True(t, ok)
	require.Equal(t, otherID, v)
	require.Equal(t, int64(2), c.Stat().Created())
}

func TestCacheGetOrCreateFunc(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	db.Exec(t, `CREATE TABLE customers (id serial PRIMARY KEY, code text NOT NULL UNIQUE,
		name text NOT NULL, vip boolean NOT NULL)`)
	db.Exec(t, `INSERT INTO customers (code, name, vip) VALUES ('c1', 'first', false)`)
	src := Lookup{Table: "customers", Key: "code", Value: "id", InsertColumns: []string{"name", "vip"}}
	c, err := NewCache[string, int32](CacheConfig{})
	require.NoError(t, err)
	var ids []int32
	err = inHookTx(ctx, db.Pool, func(tx pgx.Tx) error {
		var err error
		ids, err = c.GetOrCreateFunc(ctx, tx, src, []string{"c2", "c1", "c3", "c2"}, func(k string) []any {
			return []any{"name of " + k, k == "c3"}
		})
		return err
	})
	require.NoError(t, err)
	require.Equal(t, ids[0], ids[3])
	require.Equal(t, int32(1), ids[1])
	require.Equal(t, int64(3), db.Int(t, "SELECT count(*) FROM customers"))
	require.Equal(t, int64(1), db.Int(t, "SELECT count(*) FROM customers WHERE vip AND name = 'name of c3'"))
	v, ok := c.Get("c3")
	require.True(t, ok)
	require.Equal(t, ids[2], v)

	err = inHookTx(ctx, db.Pool, func(tx pgx.Tx) error {
		_, err := c.GetOrCreateFunc(ctx, tx, src, []string{"c4"}, func(string) []any { return []any{"x"} })
		return err
	})
	require.ErrorContains(t, err, "insert returned 1 values for 2 InsertColumns")
}

// TestCacheIntKeys resolves int64 keys (sent as int8[]).
func TestCacheIntKeys(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	db.Exec(t, `CREATE TABLE accounts (id serial PRIMARY KEY, ext_id bigint NOT NULL UNIQUE)`)
	c := newCache[int64](t, CacheConfig{})
	src := Lookup{Table: "accounts", Key: "ext_id", Value: "id"}
	var ids []int64
	require.NoError(t, inHookTx(ctx, db.Pool, func(tx pgx.Tx) error {
		var err error
		ids, err = c.GetOrCreate(ctx, tx, src, []int64{30, 10, 20, 10})
		return err
	}))
	require.Equal(t, ids[1], ids[3])
	require.Equal(t, int64(3), db.Int(t, "SELECT count(*) FROM accounts"))
	v, ok := c.Get(20)
	require.True(t, ok)
	require.Equal(t, ids[2], v)
	require.Equal(t, int64(ids[0]), db.Int(t, "SELECT id FROM accounts WHERE ext_id = 30"))
}

// TestCacheSessionTx uses the cache through Session.Tx: a unit that fails with a data
// error leaves nothing staged; a committed one publishes.
func TestCacheSessionTx(t *testing.T) {
	t.Parallel()
	b := setupCache(t)
	ctx := context.Background()
	s, err := NewSession(ctx, b.db.Pool, SessionConfig{Job: "cache session", CheckpointSchema: b.db.Schema})
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close(ctx)) }()
	c := newCache[string](t, CacheConfig{})

	err = s.Tx(ctx, func(tx pgx.Tx) error {
		ids, err := c.GetOrCreate(ctx, tx, b.products, []string{"P1", "P2"})
		if err != nil {
			return err
		}
		// A fact row referencing a product that does not exist: 23503, not retried.
		_, err = tx.Exec(ctx, "INSERT INTO order_lines (product_id, qty) VALUES ($1, 1), ($2, 1), (-1, 1)", ids[0], ids[1])
		return err
	})
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "23503", pgErr.Code)
	_, ok := c.Get("P1")
	require.False(t, ok)
	require.Zero(t, c.Stat().StagedTransactions())

	var ids []int64
	require.NoError(t, s.Tx(ctx, func(tx pgx.Tx) error {
		var err error
		ids, err = c.GetOrCreate(ctx, tx, b.products, []string{"P1", "P2"})
		return err
	}))
	for i, k := range []string{"P1", "P2"} {
		v, ok := c.Get(k)
		require.True(t, ok)
		require.Equal(t, ids[i], v)
	}
	require.Equal(t, int64(2), b.db.Int(t, "SELECT count(*) FROM products"))
}
