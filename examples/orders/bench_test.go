package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

// EnvBenchLines sets the source lines of BenchmarkOrders (default 400,000; 20,000
// with PGETL_BENCH_SMALL=1).
const EnvBenchLines = "PGETL_BENCH_ORDERS_LINES"

const benchProducts = 10_000

// BenchmarkOrders runs, on the same lines, the orders job (exactly once: default
// batch size, checkpoint, lookups in the batch's transaction) and the set-based
// load a PostgreSQL expert would write (COPY of the raw lines into an unlogged
// staging table, then in one transaction INSERT customers … ON CONFLICT DO
// NOTHING, INSERT orders SELECT DISTINCT … JOIN customers, INSERT order_lines
// SELECT … JOIN products), each into empty tables of its own schema, and reports
// both rates in source lines per second, their ratio (job / reference), the job's
// peak live heap and its caches' bytes per key.
func BenchmarkOrders(b *testing.B) {
	n := int64(workload.N(400_000, 20_000))
	if s := os.Getenv(EnvBenchLines); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		require.NoError(b, err, EnvBenchLines)
		n = v
	}
	o := workload.Orders{N: n, Products: benchProducts}
	ctx := context.Background()
	var jobSecs, refSecs float64
	var peak uint64
	var custBPK, skuBPK float64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		ref := benchSchema(b, "ref")
		b.StartTimer()
		refSecs += setBased(b, ref, o).Seconds()
		b.StopTimer()

		db := benchSchema(b, "job")
		cfg, err := parseFlags([]string{"-dsn", db.BaseURL, "-schema", db.Schema, "-rows", strconv.FormatInt(n, 10),
			"-products", strconv.Itoa(benchProducts), "-progress", "off", "-job", "bench"}, os.Stderr)
		require.NoError(b, err)
		var stdout, stderr bytes.Buffer
		j := &job{cfg: cfg, stdout: &stdout, stderr: &stderr}
		runtime.GC()
		stop := watchPeakHeap(&peak)
		b.StartTimer()
		t0 := time.Now()
		code := j.run(ctx, ctx, func() os.Signal { return nil })
		jobSecs += time.Since(t0).Seconds()
		b.StopTimer()
		stop()
		require.Equal(b, 0, code, "stdout:\n%s\nstderr:\n%s", &stdout, &stderr)
		custBPK, skuBPK = j.customers.Stat().BytesPerKey(), j.skus.Stat().BytesPerKey()
		want := o.Checksums(nil)
		got, err := workload.QueryOrdersChecksums(ctx, db.Pool, pgx.Identifier{db.Schema}.Sanitize(), db.Ident("products"))
		require.NoError(b, err)
		require.Equal(b, want, got, "the job's tables")
		gotRef, err := workload.QueryOrdersChecksums(ctx, ref.Pool, pgx.Identifier{ref.Schema}.Sanitize(), ref.Ident("products"))
		require.NoError(b, err)
		require.Equal(b, want, gotRef, "the reference's tables")
		b.StartTimer()
	}
	jobRate := float64(n) * float64(b.N) / jobSecs
	refRate := float64(n) * float64(b.N) / refSecs
	b.ReportMetric(jobRate, "rows/s")
	b.ReportMetric(refRate, "ref-rows/s")
	b.ReportMetric(jobRate/refRate, "ratio")
	b.ReportMetric(float64(peak), "peak-live-heap-B")
	b.ReportMetric(custBPK, "customers-B/key")
	b.ReportMetric(skuBPK, "skus-B/key")
	b.ReportMetric(0, "ns/op")
}

// benchSchema returns a schema of its own with the products table loaded, as the
// products job (-mode insert -rows P) loads it.
func benchSchema(b *testing.B, name string) *pgtest.DB {
	b.Helper()
	db := pgtest.New(b)
	ctx := context.Background()
	db.Exec(b, workload.CreateSQL(db.Ident("products"), true))
	_, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, benchProducts, 1))
	require.NoError(b, err)
	db.Exec(b, "ANALYZE "+db.Ident("products"))
	_ = name
	return db
}

// setBased is the reference: the raw lines COPYed (binary, as pgx's CopyFrom
// sends them) into an unlogged staging table, then the three INSERTs in one
// transaction.
func setBased(b *testing.B, db *pgtest.DB, o workload.Orders) time.Duration {
	ctx := context.Background()
	t0 := time.Now()
	conn, err := db.Pool.Acquire(ctx)
	require.NoError(b, err)
	defer conn.Release()
	s := pgx.Identifier{db.Schema}.Sanitize()
	_, err = conn.Exec(ctx, fmt.Sprintf(workload.OrdersCreateSQL, s, db.Ident("products"))+
		";CREATE UNLOGGED TABLE "+s+".raw (order_id bigint, line_no int, email text, customer_name text, sku text, qty int, unit_price numeric(12,2), ordered_at timestamptz)")
	require.NoError(b, err)
	_, err = conn.CopyFrom(ctx, pgx.Identifier{db.Schema, "raw"},
		[]string{"order_id", "line_no", "email", "customer_name", "sku", "qty", "unit_price", "ordered_at"}, &rawLines{o: o})
	require.NoError(b, err)
	_, err = conn.Exec(ctx, `ANALYZE `+s+`.raw;
BEGIN;
INSERT INTO `+s+`.customers (email, name) SELECT DISTINCT email, customer_name FROM `+s+`.raw ON CONFLICT (email) DO NOTHING;
INSERT INTO `+s+`.orders (order_id, customer_id, ordered_at) SELECT DISTINCT r.order_id, c.id, r.ordered_at FROM `+s+`.raw r JOIN `+s+`.customers c ON c.email = r.email;
INSERT INTO `+s+`.order_lines (order_id, line_no, product_id, qty, unit_price)
	SELECT r.order_id, r.line_no, p.id, r.qty, r.unit_price FROM `+s+`.raw r JOIN `+s+`.products p ON p.sku = r.sku WHERE r.qty > 0;
COMMIT;
DROP TABLE `+s+`.raw`)
	require.NoError(b, err)
	return time.Since(t0)
}

// rawLines is a pgx.CopyFromSource of the workload's lines in the staging table's
// columns.
type rawLines struct {
	o    workload.Orders
	i    int64
	vals []any
}

func (r *rawLines) Next() bool {
	r.i++
	return r.i <= r.o.N
}

func (r *rawLines) Values() ([]any, error) {
	l := r.o.Line(r.i)
	r.vals = append(r.vals[:0], l.OrderID, l.LineNo, l.Email, l.CustomerName, l.SKU, l.Qty, l.Price(), l.OrderedAt)
	return r.vals, nil
}

func (r *rawLines) Err() error { return nil }

// watchPeakHeap samples the live heap every 5 ms into peak (the maximum seen)
// until stop.
func watchPeakHeap(peak *uint64) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(s)
			if v := s[0].Value.Uint64(); v > *peak {
				*peak = v
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}
