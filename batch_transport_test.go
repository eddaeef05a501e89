package pgetl

import (
	"context"
	"crypto/tls"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/stretchr/testify/require"
)

// transportPool returns a pgetl pool on tr (with the pooler key behind PgBouncer),
// closed at cleanup, after checking that its connections are TLS exactly when tr
// is.
func transportPool(t *testing.T, tr pgtest.Transport) *pgxpool.Pool {
	t.Helper()
	ctx := context.Background()
	url := tr.URL
	if tr.PgBouncer {
		url = pgtest.WithParam(url, PoolerKey, "pgbouncer")
	}
	pool, err := NewPool(ctx, url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	conn, err := pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, isTLS := conn.Conn().PgConn().Conn().(*tls.Conn)
	require.Equal(t, tr.TLS, isTLS, "connection is TLS")
	return pool
}

// TestBatchTransports runs the core batch flows over every transport: plain TCP and
// TLS, each direct and through PgBouncer in transaction mode. sendBatch writes a
// batch itself (in 64 KiB chunks), so each flow checks the exact rows that arrive:
// COPYs of 250 rows and single large COPYs, inserts, both upsert strategies, the
// statement path, and batches with rejected rows (whose COPY data is fragmented).
func TestBatchTransports(t *testing.T) {
	t.Parallel()
	pgtest.RunTransports(t, func(t *testing.T, tr pgtest.Transport) {
		t.Parallel()
		pool := transportPool(t, tr)

		t.Run("insert", func(t *testing.T) {
			for _, commitRows := range []int{3000, 10_000} { // 12 COPYs of 250 rows; one COPY
				bd := setupItems(t)
				bd.pool = pool
				ctx := context.Background()
				s := bd.session(t, "insert")
				const n = 25_000
				b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: commitRows})
				require.NoError(t, err)
				require.NoError(t, load(ctx, b, 1, n))
				require.NoError(t, b.Close(ctx))
				bd.requireExactly(t, n)
				cp, err := s.Checkpoint(ctx)
				require.NoError(t, err)
				require.Equal(t, strconv.Itoa(n), cp.Cursor)
				require.Equal(t, int64(n), cp.Rows)
				require.Zero(t, s.Stat().TotalRetries())
			}
		})

		upsert := func(t *testing.T, keyCache bool) {
			const n = 20_000
			db := pgtest.New(t)
			ctx := context.Background()
			tbl := oddProducts(t, db, n)
			s, err := NewSession(ctx, pool, SessionConfig{Job: "upsert", CheckpointSchema: db.Schema})
			require.NoError(t, err)
			defer s.Close(ctx)
			cfg := BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"}, CommitRows: 4000}
			if keyCache {
				keys, err := NewCache[string, struct{}](CacheConfig{})
				require.NoError(t, err)
				require.NoError(t, keys.Preload(ctx, pool, Lookup{Table: tbl, Key: "sku"}))
				require.Equal(t, int64(n/2), keys.Stat().Len())
				cfg.KeyCache = keys
				defer func() { require.Equal(t, int64(n), keys.Stat().Len()) }()
			}
			addProducts(t, s, cfg, n, 2)
			requireProducts(t, db, tbl, n, 2)
			require.Equal(t, int64(n), s.Stat().Rows())
		}
		t.Run("upsert", func(t *testing.T) { upsert(t, false) })
		t.Run("upsert_key_cache", func(t *testing.T) { upsert(t, true) })

		t.Run("statement", func(t *testing.T) {
			bd := setupItems(t)
			bd.pool = pool
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
					n = nil // NOT NULL violation
				}
				require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), i%10, n))
			}
			require.NoError(t, b.Close(ctx))
			require.Equal(t, int64(10), bd.db.Int(t, "SELECT count(*) FROM totals"))
			require.Equal(t, int64(1000*1001/2-555), bd.db.Int(t, "SELECT sum(n)::bigint FROM totals"))
			require.Equal(t, int64(1), bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'stmt'"))
			require.Equal(t, int64(554), bd.db.Int(t, "SELECT row_index FROM reject WHERE job = 'stmt'"))
		})

		t.Run("rejects", func(t *testing.T) {
			const n = 12_000
			bad := []int64{17, 2999, 3000, 3001, 6000, 9001, n}
			for _, kind := range []badKind{badKinds[0], badKinds[1]} { // check (23514), not null (23502)
				bd := setupItems(t)
				bd.pool = pool
				ctx := context.Background()
				s := bd.session(t, "rejects")
				b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 3000, Rejects: RejectToTable})
				require.NoError(t, err)
				set := map[int64]bool{}
				for _, i := range bad {
					set[i] = true
				}
				require.NoError(t, loadWithBad(ctx, b, n, set, kind))
				require.NoError(t, b.Close(ctx))
				bd.requireExactly(t, n, bad...)
				require.Equal(t, int64(len(bad)), bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'rejects' AND sqlstate = $1", kind.sqlstate), kind.name)
				cp, err := s.Checkpoint(ctx)
				require.NoError(t, err)
				require.Equal(t, strconv.Itoa(n), cp.Cursor)
				require.Equal(t, int64(n-len(bad)), cp.Rows)
				require.Equal(t, int64(len(bad)), cp.Rejects)
			}
		})
	})
}
