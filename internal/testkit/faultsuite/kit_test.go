package faultsuite_test

// Helpers of the fault tests in this package: the items and products tables, the
// fault pool, the trigger that hands a hook's moment to the test, and the invariant
// checks. They are the black-box versions of the core module's fault_kit_test.go,
// batch_test.go and cache_test.go helpers of the same names (those live in package
// pgetl's internal tests, which a test in another module cannot import).

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/faults"
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

// cacheBundle is a test's database with a products dimension and an order_lines
// fact table referencing it.
type cacheBundle struct {
	db       *pgtest.DB
	products pgetl.Lookup
}

func setupCache(t *testing.T) *cacheBundle {
	t.Helper()
	db := pgtest.New(t)
	db.Exec(t, `CREATE TABLE products (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		sku text NOT NULL UNIQUE, name text)`)
	db.Exec(t, `CREATE TABLE order_lines (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		product_id bigint NOT NULL REFERENCES products (id), qty int NOT NULL)`)
	return &cacheBundle{db: db, products: pgetl.Lookup{Table: "products", Key: "sku", Value: "id"}}
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

func newCache[K comparable](t *testing.T, cfg pgetl.CacheConfig) *pgetl.Cache[K, int64] {
	t.Helper()
	c, err := pgetl.NewCache[K, int64](cfg)
	require.NoError(t, err)
	return c
}

// poll calls f every few milliseconds until it returns true or the deadline passes.
func poll(t *testing.T, within time.Duration, f func() bool) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if f() {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// faultPool returns a pool made by pgetl.ParseConfig on connString, closed in t.Cleanup.
// Every acquired connection is pinged first, so that a connection a fault killed
// while it sat idle in the pool is replaced rather than handed to an attempt: the
// test then counts one failed attempt per fault, not one per dead idle connection.
func faultPool(t *testing.T, connString string, mod ...func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgetl.ParseConfig(connString)
	require.NoError(t, err)
	cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return true }
	cfg.PingTimeout = 2 * time.Second
	for _, f := range mod {
		f(cfg)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// trigger lets a hook running in the job's goroutine hand control to the test's
// goroutine (which injects a fault) and wait until it is done. Once the test ends
// (cleanup), the hook no longer waits.
type trigger struct {
	fire chan int64 // the batch sequence (or other value) the hook reached
	ack  chan struct{}
	done chan struct{}
	used atomic.Bool
}

func newTrigger(t *testing.T) *trigger {
	tr := &trigger{fire: make(chan int64), ack: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(func() { close(tr.done) })
	return tr
}

// pull is called by the hook: the first call hands v to the test and waits for its
// release; later calls do nothing.
func (tr *trigger) pull(v int64) {
	if !tr.used.CompareAndSwap(false, true) {
		return
	}
	select {
	case tr.fire <- v:
	case <-tr.done:
		return
	}
	select {
	case <-tr.ack:
	case <-tr.done:
	}
}

// wait waits for the hook (or for the job to end first, which fails the test).
func (tr *trigger) wait(t *testing.T, job <-chan error, within time.Duration) int64 {
	t.Helper()
	select {
	case v := <-tr.fire:
		return v
	case err := <-job:
		t.Fatalf("the job ended before the fault point: %v", err)
	case <-time.After(within):
		t.Fatalf("the job did not reach the fault point within %v", within)
	}
	return 0
}

// release lets the hook go on.
func (tr *trigger) release() { close(tr.ack) }

// goJob runs f in a goroutine and returns the channel its error arrives on.
func goJob(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

// waitJob waits up to within for the job's result.
func waitJob(t *testing.T, ch <-chan error, within time.Duration) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(within):
		t.Fatalf("the job did not end within %v", within)
		return nil
	}
}

// loadJob is the job of most fault tests: a batch session on table that loads rows
// from..to (itemRow, cursor = row number; rows in bad are made to violate the CHECK
// on price), then closes.
func loadJob(ctx context.Context, s *pgetl.Session, cfg pgetl.BatchConfig, from, to int64, bad map[int64]bool) error {
	b, err := s.Batch(ctx, cfg)
	if err != nil {
		return err
	}
	for i := from; i <= to; i++ {
		r := itemRow(i)
		if bad[i] {
			r[2] = "-1.00"
		}
		if err := b.Add(ctx, strconv.FormatInt(i, 10), r...); err != nil {
			_ = b.Close(ctx)
			return err
		}
	}
	return b.Close(ctx)
}

// requireCheckpoint checks the job's checkpoint in the database: cursor of the last
// source row, rows and rejects as given.
func requireCheckpoint(t *testing.T, q *pgxpool.Pool, schema, job string, cursor string, rows, rejects int64) pgetl.Checkpoint {
	t.Helper()
	cp, err := pgetl.ReadCheckpoint(context.Background(), q, schema, job)
	require.NoError(t, err)
	require.Equal(t, cursor, cp.Cursor, "checkpoint cursor of job %s", job)
	require.Equal(t, rows, cp.Rows, "checkpoint rows of job %s", job)
	require.Equal(t, rejects, cp.Rejects, "checkpoint rejects of job %s", job)
	return cp
}

// requireRejects checks that the reject table holds exactly the source rows want
// (1-based row numbers, i.e. row_index+1) for job.
func requireRejects(t *testing.T, pool *pgxpool.Pool, schema, job string, want []int64) {
	t.Helper()
	rows, err := pool.Query(context.Background(), "SELECT row_index + 1 FROM "+quoteIdent(schema)+".reject WHERE job = $1 ORDER BY 1", job)
	require.NoError(t, err)
	var got []int64
	for rows.Next() {
		var i int64
		require.NoError(t, rows.Scan(&i))
		got = append(got, i)
	}
	require.NoError(t, rows.Err())
	w := slices.Clone(want)
	slices.Sort(w)
	if len(w) == 0 {
		w = nil
	}
	require.Equal(t, w, got, "rejected rows of job %s", job)
}

// requireNoIdleInTx fails if the sampler saw a backend of its prefix idle in
// transaction for at least minAge (0: at all). A batch is one message, so its
// backend is never idle in transaction, except for the instant between a refused
// statement (a bad row) and the ROLLBACK the client sends at once; Session.Tx
// makes a round trip per statement. Tests of those paths pass a small minAge.
func requireNoIdleInTx(t *testing.T, s *faults.Sampler, minAge time.Duration) {
	t.Helper()
	require.Positive(t, s.Samples(), "the sampler took no sample")
	var bad []string
	all := s.IdleInTransaction()
	for _, smp := range all {
		if smp.StateAge >= minAge {
			bad = append(bad, fmt.Sprintf("%s pid %d %s for %v: %.80q", smp.At.Format("15:04:05.000"), smp.PID, smp.State, smp.StateAge, smp.Query))
		}
	}
	require.Empty(t, bad, "backends of the job idle in transaction")
	if len(all) > 0 {
		t.Logf("sampler: %d samples, %d momentary idle-in-transaction sightings (all < %v)", s.Samples(), len(all), minAge)
	}
}

// failedAttempts is what the session counts as failed attempts: retried ones and
// in-doubt ones found committed (bisection probes, bad-row isolation round trips
// and waits for an earlier batch in flight, which pgetl.Stat counts with the
// retries, are not failed attempts: see Stat.TotalRetries).
func failedAttempts(st pgetl.Stat) int64 {
	return st.TotalRetries() + st.Retries()["in_doubt_committed"]
}

func quoteIdent(s string) string { return `"` + s + `"` }
