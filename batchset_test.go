package pgetl

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// starSchema creates products (preloaded dimension, lookup only), customers
// (get-or-create by e-mail), orders (header) and order_lines (detail) in the test's
// schema.
func starSchema(t *testing.T, db *pgtest.DB, products int) {
	t.Helper()
	db.Exec(t, `CREATE TABLE products (id bigserial PRIMARY KEY, sku text UNIQUE NOT NULL);
		INSERT INTO products (sku) SELECT format('SKU-%s', lpad(g::text, 7, '0')) FROM generate_series(1, `+strconv.Itoa(products)+`) g;
		CREATE TABLE customers (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text NOT NULL);
		CREATE TABLE orders (order_id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers(id), ordered_at timestamptz NOT NULL);
		CREATE TABLE order_lines (order_id bigint NOT NULL REFERENCES orders(order_id), line_no int NOT NULL,
			product_id bigint NOT NULL REFERENCES products(id), qty int NOT NULL CHECK (qty > 0), unit_price numeric(12,2) NOT NULL,
			PRIMARY KEY (order_id, line_no))`)
}

// starLine is source line i: 4 lines per order, customers shared by orders.
func starLine(i int64, customers, products int64, badEvery int64) (orderID int64, lineNo int32, email, name, sku string, qty int32, price string, at time.Time) {
	orderID = (i-1)/4 + 1
	lineNo = int32((i-1)%4 + 1)
	c := (orderID*7919)%customers + 1
	email, name = fmt.Sprintf("cust%d@example.com", c), fmt.Sprintf("Customer %d", c)
	sku = fmt.Sprintf("SKU-%07d", (i*31)%products+1)
	qty = int32(i%5 + 1)
	if badEvery > 0 && i%badEvery == 0 {
		qty = 0
	}
	cents := (i*7)%10000 + 1 // unit_price = ((i*7) % 10000)/100 + 0.01
	price = fmt.Sprintf("%d.%02d", cents/100, cents%100)
	at = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(orderID) * time.Minute)
	return
}

type starJob struct {
	s         *Session
	customers *Cache[string, int64]
	products  *Cache[string, int64]
	cfgs      []BatchConfig
}

func newStarJob(t *testing.T, db *pgtest.DB, s *Session, commitRows int, rejects RejectPolicy) *starJob {
	t.Helper()
	customers, err := NewCache[string, int64](CacheConfig{})
	require.NoError(t, err)
	products, err := NewCache[string, int64](CacheConfig{})
	require.NoError(t, err)
	require.NoError(t, products.Preload(context.Background(), db.Pool, Lookup{Table: db.Schema + ".products", Key: "sku", Value: "id"}))
	return &starJob{s: s, customers: customers, products: products, cfgs: []BatchConfig{
		{Table: db.Schema + ".orders", Columns: []string{"order_id", "customer_id", "ordered_at"}, Key: []string{"order_id"}, IgnoreExisting: true,
			CommitRows: commitRows, CommitInterval: -1, Rejects: rejects,
			Lookups: []LookupColumn{{Column: "customer_id", Mode: GetOrCreate, Cache: customers,
				Source: Lookup{Table: db.Schema + ".customers", Key: "email", Value: "id", InsertColumns: []string{"name"}}}}},
		{Table: db.Schema + ".order_lines", Columns: []string{"order_id", "line_no", "product_id", "qty", "unit_price"},
			Lookups: []LookupColumn{{Column: "product_id", Cache: products, Source: Lookup{Table: db.Schema + ".products", Key: "sku", Value: "id"}}}},
	}}
}

// run loads source lines from..to.
func (j *starJob) run(ctx context.Context, from, to, customers, products, badEvery int64, sku func(int64, string) string) error {
	set, err := j.s.Batches(ctx, j.cfgs...)
	if err != nil {
		return err
	}
	for i := from; i <= to; i++ {
		orderID, lineNo, email, name, s, qty, price, at := starLine(i, customers, products, badEvery)
		if sku != nil {
			s = sku(i, s)
		}
		header := []any{orderID, email, at, name}
		if lineNo != 1 && i != from {
			header = nil // every line carries its order only when it starts it (or starts the run)
		}
		if err := set.Add(ctx, strconv.FormatInt(i, 10), header, []any{orderID, lineNo, s, qty, price}); err != nil {
			_ = set.Close(ctx)
			return err
		}
	}
	return set.Close(ctx)
}

// requireStar checks customers, orders and order_lines against the generator for
// lines 1..n, without the lines in bad.
func requireStar(t *testing.T, db *pgtest.DB, n, customers, products int64, bad map[int64]bool) {
	t.Helper()
	var wantLines, wantSum int64
	orders := map[int64]bool{}
	custs := map[string]bool{}
	for i := int64(1); i <= n; i++ {
		orderID, lineNo, email, _, _, _, _, _ := starLine(i, customers, products, 0)
		orders[orderID] = true
		custs[email] = true
		if !bad[i] {
			wantLines++
			wantSum += orderID*10 + int64(lineNo)
		}
	}
	require.Equal(t, int64(len(custs)), db.Int(t, "SELECT count(*) FROM customers"), "customers")
	require.Zero(t, db.Int(t, "SELECT count(*) FROM customers WHERE name <> 'Customer ' || substring(email from 'cust(\\d+)@')"), "customer names")
	require.Equal(t, int64(len(orders)), db.Int(t, "SELECT count(*) FROM orders"), "orders")
	require.Zero(t, db.Int(t, `SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id
		WHERE c.email <> format('cust%s@example.com', (o.order_id*7919) % `+strconv.FormatInt(customers, 10)+` + 1)
		OR o.ordered_at <> '2024-01-01T00:00:00Z'::timestamptz + o.order_id * interval '1 minute'`), "order headers")
	require.Equal(t, wantLines, db.Int(t, "SELECT count(*) FROM order_lines"), "lines")
	require.Equal(t, wantSum, db.Int(t, "SELECT coalesce(sum(order_id*10 + line_no), 0)::bigint FROM order_lines"), "line keys")
	require.Zero(t, db.Int(t, `SELECT count(*) FROM order_lines l JOIN products p ON p.id = l.product_id
		WHERE p.sku <> format('SKU-%s', lpad((((l.order_id - 1)*4 + l.line_no)*31 % `+strconv.FormatInt(products, 10)+` + 1)::text, 7, '0'))
		OR l.qty <> (((l.order_id - 1)*4 + l.line_no) % 5 + 1)`), "line contents")
}

func TestBatchSetStarSchema(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	const n, customers, products = 20_000, 500, 1000
	starSchema(t, db, products)
	ctx := context.Background()
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "star", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(ctx) })
	j := newStarJob(t, db, s, 3000, RejectToTable)
	const badEvery = 997
	bad := map[int64]bool{}
	for i := int64(badEvery); i <= n; i += badEvery {
		bad[i] = true
	}
	unknown := int64(4321)
	bad[unknown] = true
	require.NoError(t, j.run(ctx, 1, n, customers, products, badEvery, func(i int64, sku string) string {
		if i == unknown {
			return "SKU-NOPE"
		}
		return sku
	}))
	requireStar(t, db, n, customers, products, bad)
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(n), cp.Cursor)
	require.Equal(t, int64(len(bad)), cp.Rejects)
	require.Equal(t, int64(n/4+n)-int64(len(bad)), cp.Rows, "headers and lines, less the rejected lines")
	var msg, table, col string
	require.NoError(t, db.Pool.QueryRow(ctx, "SELECT message, table_name, column_name FROM reject WHERE cursor = $1", strconv.FormatInt(unknown, 10)).Scan(&msg, &table, &col))
	require.Contains(t, msg, "unknown "+db.Schema+".products.sku SKU-NOPE")
	require.Equal(t, db.Schema+".order_lines", table)
	require.Equal(t, "product_id", col)
	require.Equal(t, int64(len(bad)-1), db.Int(t, "SELECT count(*) FROM reject WHERE sqlstate = '23514' AND table_name = $1", db.Schema+".order_lines"))
	st := j.customers.Stat()
	require.Equal(t, int64(customers), st.Len(), "every customer resolved was published after its commit")
}

// TestBatchSetConcurrentGetOrCreate: two jobs creating the same customers at the
// same time neither fail nor duplicate them.
func TestBatchSetConcurrentGetOrCreate(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	starSchema(t, db, 100)
	ctx := context.Background()
	db.Exec(t, "CREATE TABLE visits (job text, n int, customer_id bigint NOT NULL REFERENCES customers(id), PRIMARY KEY (job, n))")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			job := "visits-" + strconv.Itoa(w)
			s, err := NewSession(ctx, db.Pool, SessionConfig{Job: job, CheckpointSchema: db.Schema})
			if err != nil {
				errs[w] = err
				return
			}
			defer s.Close(ctx)
			cache, _ := NewCache[string, int64](CacheConfig{})
			set, err := s.Batches(ctx, BatchConfig{Table: db.Schema + ".visits", Columns: []string{"job", "n", "customer_id"}, CommitRows: 500, CommitInterval: -1,
				Lookups: []LookupColumn{{Column: "customer_id", Mode: GetOrCreate, Cache: cache,
					Source: Lookup{Table: db.Schema + ".customers", Key: "email", Value: "id", InsertColumns: []string{"name"}}}}})
			if err != nil {
				errs[w] = err
				return
			}
			for i := range 5000 {
				c := (i*7 + w*3) % 1500
				if err := set.Add(ctx, strconv.Itoa(i), []any{job, int32(i), fmt.Sprintf("c%d@x", c), fmt.Sprintf("C %d", c)}); err != nil {
					errs[w] = err
					return
				}
			}
			errs[w] = set.Close(ctx)
		}()
	}
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	require.Equal(t, int64(1500), db.Int(t, "SELECT count(*) FROM customers"))
	require.Equal(t, int64(10000), db.Int(t, "SELECT count(*) FROM visits"))
	require.Zero(t, db.Int(t, "SELECT count(*) FROM visits v JOIN customers c ON c.id = v.customer_id WHERE c.email <> format('c%s@x', (v.n*7 + (CASE v.job WHEN 'visits-0' THEN 0 ELSE 3 END)) % 1500)"))
}

// TestBatchSetUnknownKeyRejectFail: under RejectFail an unknown SKU stops the job,
// naming the row, after committing the lines before it.
func TestBatchSetUnknownKeyRejectFail(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	const customers, products = 50, 100
	starSchema(t, db, products)
	ctx := context.Background()
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "star-fail", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(ctx) })
	j := newStarJob(t, db, s, 1000, RejectFail)
	err = j.run(ctx, 1, 2000, customers, products, 0, func(i int64, sku string) string {
		if i == 1500 {
			return "SKU-GONE"
		}
		return sku
	})
	var berr *BatchError
	require.ErrorAs(t, err, &berr)
	require.Equal(t, "1500", berr.Cursor)
	require.Equal(t, "product_id", berr.Column)
	require.Contains(t, err.Error(), "unknown "+db.Schema+".products.sku SKU-GONE")
	require.True(t, berr.Committed)
	cp, err := ReadCheckpoint(ctx, db.Pool, db.Schema, "star-fail")
	require.NoError(t, err)
	require.Equal(t, "1499", cp.Cursor)
	requireStar(t, db, 1499, customers, products, nil)
}

// TestBatchSetInFlightUnderFaults: four batches in flight while backends are
// terminated at random points (before, during and after their fences) and bad lines
// are isolated: the tables are exact, every batch commits once, in order, and the
// checkpoint's cursor only moves forward.
func TestBatchSetInFlightUnderFaults(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	const n, customers, products, badEvery = 30_000, 700, 1000, 1499
	starSchema(t, db, products)
	ctx := context.Background()
	killer, err := pgxpool.New(ctx, db.URL)
	require.NoError(t, err)
	t.Cleanup(killer.Close)
	rng := rand.New(rand.NewPCG(7, 11))
	var rngMu sync.Mutex
	var kills atomic.Int64
	hook := func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
		rngMu.Lock()
		kill, delay := attempt == 1 && rng.IntN(3) == 0, time.Duration(rng.IntN(3000))*time.Microsecond
		rngMu.Unlock()
		if !kill {
			return
		}
		pid := pgc.PID()
		go func() {
			time.Sleep(delay)
			var ok bool
			if killer.QueryRow(ctx, "SELECT pg_terminate_backend($1::int)", int64(pid)).Scan(&ok) == nil && ok {
				kills.Add(1)
			}
		}()
	}
	pool, err := pgxpool.New(ctx, db.URL)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	s, err := NewSession(ctx, pool, SessionConfig{Job: "star-inflight", CheckpointSchema: db.Schema, beforeCommit: hook,
		Retry: RetryPolicy{InitialBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: 50}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(ctx) })
	j := newStarJob(t, db, s, 2000, RejectToTable)
	var lastSeq int64
	var lastCursor int64
	var order []string
	j.cfgs[0].InFlight = 4
	j.cfgs[0].OnCommitFunc = func(r BatchResult) {
		c, _ := strconv.ParseInt(r.Cursor, 10, 64)
		if r.Seq != lastSeq+1 || c < lastCursor {
			order = append(order, fmt.Sprintf("seq %d after %d, cursor %d after %d", r.Seq, lastSeq, c, lastCursor))
		}
		lastSeq, lastCursor = r.Seq, c
	}
	bad := map[int64]bool{}
	for i := int64(badEvery); i <= n; i += badEvery {
		bad[i] = true
	}
	require.NoError(t, j.run(ctx, 1, n, customers, products, badEvery, nil))
	require.Empty(t, order, "batches committed out of order")
	requireStar(t, db, n, customers, products, bad)
	cp, err := ReadCheckpoint(ctx, db.Pool, db.Schema, "star-inflight")
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(n), cp.Cursor)
	require.Equal(t, int64(len(bad)), cp.Rejects)
	require.Equal(t, lastSeq, cp.Seq)
	t.Logf("%d batches, %d backends terminated, retries %v", cp.Seq, kills.Load(), s.Stat().Retries())
	require.Positive(t, kills.Load())
}

// TestBatchSetClosedBySession: Session.Close closes an open batch set, committing what
// it buffered, and the set refuses rows afterwards.
func TestBatchSetClosedBySession(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	db.Exec(t, "CREATE TABLE t (n int PRIMARY KEY)")
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "set-close", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	set, err := s.Batches(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"n"}, CommitInterval: -1})
	require.NoError(t, err)
	for i := range 100 {
		require.NoError(t, set.Add(ctx, strconv.Itoa(i), []any{int32(i)}))
	}
	require.NoError(t, s.Close(ctx))
	require.Equal(t, int64(100), db.Int(t, "SELECT count(*) FROM t"))
	require.ErrorIs(t, set.Add(ctx, "x", []any{int32(1000)}), ErrClosed)
	_, err = s.Batches(ctx, BatchConfig{Table: db.Schema + ".t", Columns: []string{"n"}})
	require.ErrorIs(t, err, ErrClosed)
}

// TestBatchSetIgnoreExistingGoesStraight: headers (IgnoreExisting) are COPYed straight
// into their table; a batch holding a header whose key exists is rolled back and
// retried as a merge (the existing row stays), the next batch merges too, and the
// batches after it go straight again (a second conflict, far later, is a second
// retry). Nothing is rejected and every line lands.
func TestBatchSetIgnoreExistingGoesStraight(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	const n, customers, products = 12_000, 300, 500
	starSchema(t, db, products)
	ctx := context.Background()
	// Orders 300 (batch 2 of 800 lines) and 1900 (batch 10) exist, with their own
	// customer and time.
	db.Exec(t, `INSERT INTO customers (email, name) VALUES ('old@example.com', 'Old');
		INSERT INTO orders SELECT o, (SELECT id FROM customers WHERE email = 'old@example.com'), '2000-01-01Z' FROM unnest(ARRAY[300, 1900]) o`)
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "straight", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(ctx) })
	j := newStarJob(t, db, s, 1000, RejectToTable)
	require.NoError(t, j.run(ctx, 1, n, customers, products, 0, nil))

	require.Equal(t, int64(2), s.Stat().Retries()["key_conflict"], "one retry per batch holding an existing key")
	require.Equal(t, int64(n/4), db.Int(t, "SELECT count(*) FROM orders"))
	require.Equal(t, int64(2), db.Int(t, "SELECT count(*) FROM orders WHERE ordered_at = '2000-01-01Z'"), "the existing headers stay")
	require.Equal(t, int64(n), db.Int(t, "SELECT count(*) FROM order_lines"))
	require.Zero(t, db.Int(t, "SELECT count(*) FROM reject"))
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, strconv.Itoa(n), cp.Cursor)
}

// TestBatchSetStatement: a set's table may be a statement (the statement path): its
// rows run in the batch's transaction after the tables before it, in order; a row
// the statement fails on is rejected naming the statement, the row and the reason,
// and the rows of its record in the other tables stay (RejectToTable), or the job
// stops at it with the rows before it committed (RejectFail). Also through PgBouncer
// in transaction mode.
func TestBatchSetStatement(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		policy  RejectPolicy
		bouncer bool
	}{{RejectToTable, false}, {RejectFail, false}, {RejectToTable, true}} {
		policy := c.policy
		name := map[RejectPolicy]string{RejectToTable: "reject_to_table", RejectFail: "reject_fail"}[policy]
		if c.bouncer {
			name += "/pgbouncer"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db := pgtest.New(t)
			ctx := context.Background()
			pool := db.Pool
			if c.bouncer {
				var err error
				pool, err = NewPool(ctx, pgtest.WithParam(pgtest.PgBouncerURL(t), PoolerKey, "pgbouncer"))
				require.NoError(t, err)
				defer pool.Close()
			}
			db.Exec(t, `CREATE TABLE orders (order_id bigint PRIMARY KEY, total numeric(12,2) NOT NULL);
				CREATE TABLE audit (order_id bigint NOT NULL REFERENCES orders, seq int NOT NULL, note text NOT NULL CHECK (note <> 'bad'),
					PRIMARY KEY (order_id, seq))`)
			s, err := NewSession(ctx, pool, SessionConfig{Job: "stmt", CheckpointSchema: db.Schema})
			require.NoError(t, err)
			defer s.Close(ctx)
			set, err := s.Batches(ctx,
				BatchConfig{Table: db.Schema + ".orders", Columns: []string{"order_id", "total"}, CommitRows: 150, Rejects: policy},
				// Each order's audit row, numbered by a subquery: a statement, not a COPY.
				BatchConfig{Table: "audit statement", SQL: `INSERT INTO ` + db.Schema + `.audit (order_id, seq, note)
					SELECT $1, coalesce(max(seq), 0) + 1, $2 FROM ` + db.Schema + `.audit WHERE order_id = $1`})
			require.NoError(t, err)
			const n, bad = 400, 237
			for i := int64(1); i <= n; i++ {
				note := "order " + strconv.FormatInt(i, 10)
				if i == bad {
					note = "bad"
				}
				err := set.Add(ctx, strconv.FormatInt(i, 10), []any{i, "12.50"}, []any{i, note})
				if policy == RejectFail && err != nil {
					break
				}
				require.NoError(t, err)
			}
			err = set.Close(ctx)
			if policy == RejectFail {
				var be *BatchError
				require.ErrorAs(t, err, &be)
				require.Equal(t, strconv.Itoa(bad), be.Cursor)
				require.Equal(t, "23514", be.SQLState)
				require.True(t, be.Committed, "the rows before it are committed")
				require.Contains(t, be.Error(), "audit statement")
				require.Equal(t, int64(bad-1), db.Int(t, "SELECT count(*) FROM audit"))
				require.Equal(t, int64(bad-1), db.Int(t, "SELECT count(*) FROM orders"))
				cp, err := s.Checkpoint(ctx)
				require.NoError(t, err)
				require.Equal(t, strconv.Itoa(bad-1), cp.Cursor)
				return
			}
			require.NoError(t, err)
			require.Equal(t, int64(n), db.Int(t, "SELECT count(*) FROM orders"))
			require.Equal(t, int64(n-1), db.Int(t, "SELECT count(*) FROM audit WHERE seq = 1 AND note = 'order ' || order_id"))
			var table, sqlstate, row string
			require.NoError(t, db.Pool.QueryRow(ctx, "SELECT table_name, sqlstate, row::text FROM reject WHERE cursor = $1",
				strconv.Itoa(bad)).Scan(&table, &sqlstate, &row))
			require.Equal(t, "audit statement", table)
			require.Equal(t, "23514", sqlstate)
			require.JSONEq(t, `{"$1": 237, "$2": "bad"}`, row)
			cp, err := s.Checkpoint(ctx)
			require.NoError(t, err)
			require.Equal(t, strconv.Itoa(n), cp.Cursor)
			require.Equal(t, int64(1), cp.Rejects)
		})
	}
}

// TestBatchSetRefusesRecordWhole: a record one of whose rows Add refuses is
// refused whole: the rows of its other tables do not commit under the cursor
// before it (a rerun from the checkpoint adds the record again, which would then
// load them twice). And a record one reject too many stops the set, as it stops a
// BatchSession: the records before it commit, and the error is sticky.
func TestBatchSetRefusesRecordWhole(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.New(t)
	db.Exec(t, `CREATE TABLE a (id bigint); CREATE TABLE b (id bigint, v int)`)
	cfgs := func(mod func(*BatchConfig)) []BatchConfig {
		c := []BatchConfig{{Table: db.Schema + ".a", Columns: []string{"id"}}, {Table: db.Schema + ".b", Columns: []string{"id", "v"}}}
		mod(&c[0])
		return c
	}
	// run loads records from..to (bad ones with a value b.v cannot take) in a new
	// session of job, stopping at the first error, and returns the checkpoint's
	// cursor, that error and Close's.
	run := func(job string, mod func(*BatchConfig), from, to int64, bad map[int64]bool) (cursor string, addErr, closeErr error) {
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: job, CheckpointSchema: db.Schema})
		require.NoError(t, err)
		set, err := s.Batches(ctx, cfgs(mod)...)
		require.NoError(t, err)
		for i := from; i <= to; i++ {
			v := any(int32(i))
			if bad[i] {
				v = "not a number"
			}
			if addErr = set.Add(ctx, strconv.FormatInt(i, 10), []any{i}, []any{i, v}); addErr != nil {
				if errors.Is(addErr, ErrTooManyRejects) {
					require.ErrorIs(t, set.Add(ctx, "x", []any{int64(99)}, nil), ErrTooManyRejects, "sticky")
				}
				break
			}
		}
		closeErr = set.Close(ctx)
		require.NoError(t, s.Close(ctx))
		cp, err := ReadCheckpoint(ctx, db.Pool, db.Schema, job)
		require.NoError(t, err)
		return cp.Cursor, addErr, closeErr
	}
	count := func(tbl string) int64 { return db.Int(t, "SELECT count(*) FROM "+db.Ident(tbl)) }

	// RejectFail: record 2 stops the job; its row of a is not committed.
	cursor, addErr, closeErr := run("whole", func(*BatchConfig) {}, 1, 5, map[int64]bool{2: true})
	var berr *BatchError
	require.ErrorAs(t, addErr, &berr)
	require.Equal(t, "2", berr.Cursor)
	require.NoError(t, closeErr)
	require.Equal(t, "1", cursor)
	require.Equal(t, []int64{1, 1}, []int64{count("a"), count("b")})
	// The rerun resumes at record 2 (fixed) and loads each record once.
	cursor, addErr, closeErr = run("whole", func(*BatchConfig) {}, 2, 5, nil)
	require.NoError(t, addErr)
	require.NoError(t, closeErr)
	require.Equal(t, "5", cursor)
	require.Equal(t, []int64{5, 5}, []int64{count("a"), count("b")})
	require.Equal(t, int64(5), db.Int(t, "SELECT count(DISTINCT id) FROM "+db.Ident("a")))

	// MaxRejects 1: record 7's row of b is rejected (its row of a stays, by
	// design); record 8 is one reject too many: records 6 and 7 commit, 8 does not.
	db.Exec(t, "TRUNCATE a, b")
	cursor, addErr, _ = run("sticky", func(c *BatchConfig) { c.Rejects, c.MaxRejects = RejectToTable, 1 }, 6, 10, map[int64]bool{7: true, 8: true})
	require.ErrorIs(t, addErr, ErrTooManyRejects)
	require.ErrorAs(t, addErr, &berr)
	require.True(t, berr.Committed, "the records before it committed")
	require.Equal(t, "7", cursor)
	require.Equal(t, []int64{2, 1}, []int64{count("a"), count("b")})
	requireRejects(t, db.Pool, db.Schema, "sticky", []int64{4})
}
