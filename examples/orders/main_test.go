package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

const (
	e2eLines    = 20_000
	e2eProducts = 1_000
)

// e2e is the built job and the database it runs against.
type e2e struct {
	bin string
	dsn string
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// newE2E builds the job once per test binary.
func newE2E(t *testing.T) *e2e {
	t.Helper()
	base := pgtest.URL(t)
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "orders-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "orders")
		if out, err := exec.Command("go", "build", "-o", builtBin, ".").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %w: %s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return &e2e{bin: builtBin, dsn: base}
}

// result is one finished run of the job.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\n--- stdout:\n%s--- stderr:\n%s", r.code, r.stdout, r.stderr)
}

// command returns the job's command on schema with args; DATABASE_URL is cleared
// so that -dsn decides.
func (e *e2e) command(ctx context.Context, schema string, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	args = append([]string{"-dsn", e.dsn, "-schema", schema, "-progress", "off"}, args...)
	cmd := exec.CommandContext(ctx, e.bin, args...)
	cmd.Env = append(os.Environ(), "DATABASE_URL=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	return cmd, &stdout, &stderr
}

func (e *e2e) run(t *testing.T, schema string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd, stdout, stderr := e.command(ctx, schema, args...)
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %v: %v", args, err)
	}
	return result{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String()}
}

// loadProducts creates db's products table with products 1..p, as the products
// job (-mode insert -rows p) loads it.
func loadProducts(t *testing.T, db *pgtest.DB, p int64) {
	t.Helper()
	db.Exec(t, workload.CreateSQL(db.Ident("products"), true))
	_, err := db.Pool.CopyFrom(context.Background(), pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, p, 1))
	require.NoError(t, err)
}

// requireTables checks customers, orders and order_lines of db against want.
func requireTables(t *testing.T, db *pgtest.DB, want workload.OrdersChecksums) {
	t.Helper()
	got, err := workload.QueryOrdersChecksums(context.Background(), db.Pool, pgx.Identifier{db.Schema}.Sanitize(), db.Ident("products"))
	require.NoError(t, err)
	require.Equal(t, want, got)
	require.Zero(t, db.Int(t, `SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT FROM customers c WHERE c.id = o.customer_id)`))
}

// requireRejects checks that the reject table holds exactly the lines want of job
// (by cursor), each once.
func requireRejects(t *testing.T, db *pgtest.DB, job string, want []int64) {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), "SELECT cursor::bigint FROM reject WHERE job = $1 ORDER BY 1", job)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	if want == nil {
		want = []int64{}
	}
	if got == nil {
		got = []int64{}
	}
	sort.Slice(want, func(a, b int) bool { return want[a] < want[b] })
	require.Equal(t, want, got)
}

func badLines(o workload.Orders) []int64 {
	var bad []int64
	for i := int64(1); i <= o.N; i++ {
		if o.Bad(i) {
			bad = append(bad, i)
		}
	}
	return bad
}

func requireFinished(t *testing.T, db *pgtest.DB, job string, last int64, rejects int) {
	t.Helper()
	cp, err := pgetl.ReadCheckpoint(context.Background(), db.Pool, db.Schema, job)
	require.NoError(t, err)
	require.True(t, cp.Finished)
	require.Equal(t, strconv.FormatInt(last, 10), cp.Cursor)
	require.Equal(t, int64(rejects), cp.Rejects)
}

func writeCSV(t *testing.T, lines []workload.OrderLine) string {
	t.Helper()
	b := []byte(workload.OrdersCSVHeader + "\n")
	for _, l := range lines {
		b = workload.AppendOrderCSV(b, l)
	}
	path := filepath.Join(t.TempDir(), "orders.csv")
	require.NoError(t, os.WriteFile(path, b, 0o644))
	return path
}

func TestOrdersJob(t *testing.T) {
	e := newE2E(t)

	t.Run("SyntheticWithBadLines", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		loadProducts(t, db, e2eProducts)
		o := workload.Orders{N: e2eLines, Products: e2eProducts, BadEvery: 97}
		r := e.run(t, db.Schema, "-job", "synthetic", "-rows", strconv.Itoa(e2eLines), "-products", strconv.Itoa(e2eProducts),
			"-bad-every", "97", "-commit-rows", "3000")
		require.Equal(t, 0, r.code, "%s", r)
		require.Contains(t, r.stdout, "orders load done: every source line accounted for")
		bad := badLines(o)
		require.Contains(t, r.stdout, fmt.Sprintf("rejects     %d\n", len(bad)), "%s", r)
		requireTables(t, db, o.Checksums(nil))
		requireRejects(t, db, "synthetic", bad)
		requireFinished(t, db, "synthetic", e2eLines, len(bad))
		require.Zero(t, db.Int(t, "SELECT count(*) FROM reject WHERE table_name <> $1 OR column_name <> 'qty'", db.Schema+".order_lines"))
		// A finished job run again loads nothing: its lines are all there.
		r = e.run(t, db.Schema, "-job", "synthetic", "-rows", strconv.Itoa(e2eLines), "-products", strconv.Itoa(e2eProducts), "-bad-every", "97")
		require.Equal(t, 0, r.code, "%s", r)
		require.Contains(t, r.stdout, "job synthetic finished in an earlier run", "%s", r)
		requireTables(t, db, o.Checksums(nil))
		// -max-rejects 0: the first bad line stops the job, the lines before it committed.
		r = e.run(t, db.Schema, "-job", "strict", "-rows", "1000", "-products", strconv.Itoa(e2eProducts), "-bad-every", "97", "-max-rejects", "0")
		require.Equal(t, 1, r.code, "%s", r)
		require.Contains(t, r.stderr, "orders: bad line at line 97: qty \"0\": violates the check qty > 0 of order_lines", "%s", r)
	})

	t.Run("CSVUnknownSKU", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		loadProducts(t, db, e2eProducts)
		o := workload.Orders{N: e2eLines, Products: e2eProducts}
		lines := make([]workload.OrderLine, o.N)
		unknown := map[int64]bool{1234: true, 1235: true, 17_001: true}
		var want workload.OrdersSum
		for i := range lines {
			l := o.Line(int64(i + 1))
			if unknown[l.I] {
				l.SKU = "SKU-NOPE-" + strconv.FormatInt(l.I, 10)
			}
			lines[i] = l
			want.Add(l, !unknown[l.I])
		}
		path := writeCSV(t, lines)
		r := e.run(t, db.Schema, "-job", "csv", "-source", "csv:"+path, "-products", strconv.Itoa(e2eProducts), "-commit-rows", "4000")
		require.Equal(t, 0, r.code, "%s", r)
		requireTables(t, db, want.Checksums())
		requireRejects(t, db, "csv", []int64{1234, 1235, 17_001})
		requireFinished(t, db, "csv", e2eLines, 3)
		var msg, table, col string
		require.NoError(t, db.Pool.QueryRow(context.Background(), "SELECT message, table_name, column_name FROM reject WHERE cursor = '1235'").Scan(&msg, &table, &col))
		require.Equal(t, "unknown "+db.Schema+".products.sku SKU-NOPE-1235", msg)
		require.Equal(t, db.Schema+".order_lines", table)
		require.Equal(t, "product_id", col)
		// The header of order 309 (lines 1233..1236) is written although two of its lines were rejected.
		require.Equal(t, int64(2), db.Int(t, "SELECT count(*) FROM order_lines WHERE order_id = 309"))
		require.Equal(t, int64(1), db.Int(t, "SELECT count(*) FROM orders WHERE order_id = 309"))
	})

	t.Run("BadCSVField", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		loadProducts(t, db, e2eProducts)
		o := workload.Orders{N: 2000, Products: e2eProducts}
		var lines []workload.OrderLine
		for i := int64(1); i <= o.N; i++ {
			lines = append(lines, o.Line(i))
		}
		path := writeCSV(t, lines)
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		text := strings.SplitAfter(string(b), "\n")
		f := strings.Split(text[500], ",") // line 500 (the header is text[0])
		f[6] = "1.2x"                      // unit_price
		text[500] = strings.Join(f, ",")
		require.NoError(t, os.WriteFile(path, []byte(strings.Join(text, "")), 0o644))
		r := e.run(t, db.Schema, "-source", "csv:"+path, "-products", strconv.Itoa(e2eProducts), "-max-rejects", "0", "-commit-rows", "300")
		require.Equal(t, 1, r.code, "%s", r)
		require.Contains(t, r.stderr, "orders: bad line at "+path+" line 501: unit_price", "%s", r)
		require.Contains(t, r.stderr, "resume with: go -C examples run ./orders", "%s", r)
		r = e.run(t, db.Schema, "-source", "csv:"+path, "-products", strconv.Itoa(e2eProducts), "-max-rejects", "1")
		require.Equal(t, 0, r.code, "%s", r)
		require.Contains(t, r.stdout, "resumed     after "+path+" line 500", "%s", r)
		var want workload.OrdersSum
		for _, l := range lines {
			want.Add(l, l.I != 500)
		}
		requireTables(t, db, want.Checksums())
		requireRejects(t, db, "orders-csv", []int64{500})
	})

	t.Run("NoProducts", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		r := e.run(t, db.Schema, "-rows", "10", "-products-schema", db.Schema+"_none")
		require.Equal(t, 1, r.code, "%s", r)
		require.Contains(t, r.stderr, `no products table "`+db.Schema+`_none"."products": load the products first: go -C examples run ./products -mode insert -rows 10000 -schema `+db.Schema+"_none", "%s", r)
	})

	t.Run("BadFlags", func(t *testing.T) {
		t.Parallel()
		r := e.run(t, "unused", "-source", "api")
		require.Equal(t, 2, r.code, "%s", r)
		require.Contains(t, r.stderr, `orders: -source "api": want synthetic or csv:PATH`)
	})
}

// TestOrdersConcurrentJobs runs two jobs at once, with different -job names, into
// the same tables: one loads the synthetic lines, the other a file of other
// orders (order ids from 1,000,001) of the same customers, so both create the
// same customers concurrently. Neither fails, no customer is duplicated, and the
// tables hold exactly both jobs' lines.
func TestOrdersConcurrentJobs(t *testing.T) {
	e := newE2E(t)
	db := pgtest.New(t)
	loadProducts(t, db, e2eProducts)
	o := workload.Orders{N: e2eLines, Products: e2eProducts, BadEvery: 101}
	var want workload.OrdersSum
	var other []workload.OrderLine
	for i := int64(1); i <= o.N; i++ {
		l := o.Line(i)
		want.Add(l, !o.Bad(i))
		m := o.Line(o.N + 1 - i) // the same customers, in the other order
		m.OrderID += 1_000_000
		m.LineNo = int32((i-1)%4 + 1)
		m.OrderedAt = l.OrderedAt
		m.I = i
		other = append(other, m)
		want.Add(m, !o.Bad(o.N+1-i))
	}
	path := writeCSV(t, other)
	var wg sync.WaitGroup
	results := make([]result, 2)
	for k, args := range [][]string{
		{"-job", "synthetic", "-rows", strconv.Itoa(e2eLines), "-products", strconv.Itoa(e2eProducts), "-bad-every", "101", "-commit-rows", "1000"},
		{"-job", "file", "-source", "csv:" + path, "-products", strconv.Itoa(e2eProducts), "-commit-rows", "1000"},
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[k] = e.run(t, db.Schema, args...)
		}()
	}
	wg.Wait()
	for _, r := range results {
		require.Equal(t, 0, r.code, "%s", r)
	}
	requireTables(t, db, want.Checksums())
	require.Equal(t, o.Customers(), db.Int(t, "SELECT count(*) FROM customers"))
	bad := badLines(o)
	requireRejects(t, db, "synthetic", bad)
	var fileBad []int64
	for _, i := range bad {
		fileBad = append(fileBad, o.N+1-i)
	}
	requireRejects(t, db, "file", fileBad)
}

// TestOrdersPgBouncer runs the job through PgBouncer in transaction mode.
func TestOrdersPgBouncer(t *testing.T) {
	e := newE2E(t)
	bouncer := pgtest.WithParam(pgtest.PgBouncerURL(t), pgetl.PoolerKey, "pgbouncer")
	db := pgtest.New(t)
	loadProducts(t, db, e2eProducts)
	o := workload.Orders{N: e2eLines, Products: e2eProducts, BadEvery: 89}
	r := e.run(t, db.Schema, "-dsn", bouncer, "-job", "bouncer", "-rows", strconv.Itoa(e2eLines), "-products", strconv.Itoa(e2eProducts),
		"-bad-every", "89", "-commit-rows", "2500")
	require.Equal(t, 0, r.code, "%s", r)
	requireTables(t, db, o.Checksums(nil))
	requireRejects(t, db, "bouncer", badLines(o))
	requireFinished(t, db, "bouncer", e2eLines, len(badLines(o)))
}
