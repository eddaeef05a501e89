package remotebench_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/testkit/faultproxy"
	"github.com/pgetl/pgetl/internal/workload"
)

// The benchmark loads the products workload (internal/workload) into a fresh table
// (autovacuum off) through a faultproxy.Proxy that adds a round trip of 1, 10 or
// 50 ms (half each way), and reports rows/s, x_copy, the ratio to the
// one-transaction CopyFrom baseline, and x_psql, the ratio to `psql \copy` of the
// same rows from a CSV file (psql run as a subprocess against the proxy's
// address), both over the same link in the same run. The psql time is the whole
// process, as a user would time it: start, connection (startup and authentication,
// about 2 round trips), the \copy, exit; psql_setup reports what the same process
// costs with a SELECT 1 instead of the \copy. The timed
// part of a pgetl load is the whole job: NewSession, Batch, the Adds, Close of the
// batch session and of the session. The pool is warmed (its connections open)
// before each timed run, on both sides: a long job's pool is warm, and opening K
// connections over the link is not what K batches in flight should be judged by.
// Table set-up, seeding and the checks (row count and checksum) are untimed and go
// straight to the server.

// inFlights are the BatchConfig.InFlight values measured.
var inFlights = []int{1, 2, 4, 8}

// poolConns is the pool size through the link: enough for 8 batches in flight, the
// session's own statements and the lease renewal.
const poolConns = 12

// rtts returns the round trips to measure: 1, 10 and 50 ms; 1 and 10 ms at the
// reduced size.
func rtts() []time.Duration {
	if workload.Small() {
		return []time.Duration{time.Millisecond, 10 * time.Millisecond}
	}
	return []time.Duration{time.Millisecond, 10 * time.Millisecond, 50 * time.Millisecond}
}

// link is a distant database: a proxy adding rtt in front of the test database and
// a pgetl pool through it.
type link struct {
	rtt  time.Duration
	url  string // the test database's connection string through the proxy
	pool *pgxpool.Pool
	// measured is the median time of a SELECT 1 over the link (simple protocol: one
	// round trip).
	measured time.Duration
}

// newLink starts a proxy adding rtt and a pool through it, and checks that a
// round trip over it takes about rtt. Both are stopped in tb.Cleanup.
func newLink(tb testing.TB, db *pgtest.DB, rtt time.Duration) *link {
	tb.Helper()
	ctx := context.Background()
	px := faultproxy.NewProxy(tb, faults.TCPAddr(tb, db.URL))
	px.RoundTrip(tb, rtt)
	pool, err := pgetl.NewPool(ctx, pgtest.WithParam(px.URL(db.URL), "pool_max_conns", strconv.Itoa(poolConns)))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(pool.Close) // before the proxy stops (cleanups run last-in first-out)
	l := &link{rtt: rtt, url: px.URL(db.URL), pool: pool}
	l.measured = l.roundTrip(tb)
	// Above rtt is the machine's own time (loopback, the proxy, the server's reply):
	// about 0.3 ms when idle, more when it is busy, which the summary shows; far
	// beyond, or below rtt, the proxy is not doing its job.
	if l.measured < rtt*95/100 || l.measured > 2*rtt+5*time.Millisecond {
		tb.Fatalf("a round trip through the proxy takes %v, want about %v", l.measured, rtt)
	}
	return l
}

// roundTrip returns the median of 11 SELECT 1 round trips over the link.
func (l *link) roundTrip(tb testing.TB) time.Duration {
	tb.Helper()
	ctx := context.Background()
	conn, err := l.pool.Acquire(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Release()
	var ts []time.Duration
	for range 11 {
		t0 := time.Now()
		if _, err := conn.Conn().PgConn().Exec(ctx, "SELECT 1").ReadAll(); err != nil {
			tb.Fatal(err)
		}
		ts = append(ts, time.Since(t0))
	}
	slices.Sort(ts)
	return ts[len(ts)/2]
}

// warm opens n of the pool's connections (and pings those idle for over a second,
// as pgxpool does on Acquire), then releases them.
func (l *link) warm(tb testing.TB, n int) {
	tb.Helper()
	conns := make([]*pgxpool.Conn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { conns[i], errs[i] = l.pool.Acquire(context.Background()) })
	}
	wg.Wait()
	for i, c := range conns {
		if errs[i] != nil {
			tb.Fatal(errs[i])
		}
		c.Release()
	}
}

// rowsAt returns the workload's rows 1..n at version v as Values.
func rowsAt(n, v int64) [][]any {
	rows := make([][]any, n)
	for i := range rows {
		rows[i] = workload.Row(int64(i+1), v).Values()
	}
	return rows
}

// checksums caches workload.Checksum per (n, v).
var checksums = struct {
	sync.Mutex
	m map[[2]int64]string
}{m: map[[2]int64]string{}}

func checksum(n, v int64) string {
	checksums.Lock()
	defer checksums.Unlock()
	if s, ok := checksums.m[[2]int64{n, v}]; ok {
		return s
	}
	_, s := workload.Checksum(n, v)
	checksums.m[[2]int64{n, v}] = s
	return s
}

// freshTable (re)creates the products table in db's schema, straight on the server.
func freshTable(tb testing.TB, db *pgtest.DB) {
	tb.Helper()
	db.Exec(tb, "DROP TABLE IF EXISTS products")
	db.Exec(tb, workload.CreateSQL(db.Ident(workload.Table), false))
}

// requireRows fails unless the products table holds exactly rows 1..n at version v.
func requireRows(tb testing.TB, db *pgtest.DB, n, v int64) {
	tb.Helper()
	cnt, sum, err := workload.QueryChecksum(context.Background(), db.Pool, db.Ident(workload.Table))
	if err != nil {
		tb.Fatal(err)
	}
	if cnt != n || sum != checksum(n, v) {
		tb.Fatalf("products holds %d rows (checksum %s), want rows 1..%d at version %d (checksum %s)", cnt, sum, n, v, checksum(n, v))
	}
}

// psqlCopy is `psql \copy` of a CSV file into a table over a link: psql as a
// user runs it, one process per load.
type psqlCopy struct {
	bin  string // the psql binary
	file string // the CSV file (workload.CSV, with its header)
}

// newPSQLCopy writes rows 1..n at version v as CSV into a temporary file and finds
// psql (unavailable without it: a failure under CI=true).
func newPSQLCopy(tb testing.TB, n, v int64) *psqlCopy {
	tb.Helper()
	bin, err := exec.LookPath("psql")
	if err != nil {
		pgtest.Unavailable(tb, "remotebench: psql not found: "+err.Error())
	}
	file := filepath.Join(tb.TempDir(), "products.csv")
	f, err := os.Create(file)
	if err != nil {
		tb.Fatal(err)
	}
	if err := workload.CSV(f, 1, n, v); err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
	return &psqlCopy{bin: bin, file: file}
}

// run runs psql on connString with command, failing on any error (ON_ERROR_STOP).
// psql gets the connection's host, port, user, password and database only (libpq
// refuses pgx's runtime parameters such as search_path), without TLS, as the
// pgx side connects through the proxy.
func (p *psqlCopy) run(ctx context.Context, connString, command string) error {
	cc, err := pgx.ParseConfig(connString)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, p.bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", command)
	cmd.Env = append(os.Environ(), "PGHOST="+cc.Host, "PGPORT="+strconv.Itoa(int(cc.Port)), "PGUSER="+cc.User,
		"PGDATABASE="+cc.Database, "PGPASSWORD="+cc.Password, "PGSSLMODE=disable", "PGOPTIONS=",
		"PGAPPNAME=remotebench psql", "PGCONNECT_TIMEOUT=10")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("psql %q: %w\n%s", command, err, out)
	}
	return nil
}

// load copies the file into table (qualified, quoted) with \copy over connString.
func (p *psqlCopy) load(ctx context.Context, connString, table string) error {
	return p.run(ctx, connString, `\copy `+table+` (`+strings.Join(workload.Columns, ", ")+`) FROM '`+
		strings.ReplaceAll(p.file, "'", "''")+`' WITH (FORMAT csv, HEADER)`)
}

// setup returns the median of 3 runs of the same psql process with a SELECT 1: its
// start, connection and exit over the link.
func (p *psqlCopy) setup(tb testing.TB, connString string) time.Duration {
	tb.Helper()
	var ts []time.Duration
	for range 3 {
		t0 := time.Now()
		if err := p.run(context.Background(), connString, "SELECT 1"); err != nil {
			tb.Fatal(err)
		}
		ts = append(ts, time.Since(t0))
	}
	slices.Sort(ts)
	return ts[1]
}

// measure runs load b.N times, each after an untimed setup and followed by an
// untimed check, and reports and returns rows/s for n rows per run.
func measure(b *testing.B, n int64, setup func(), load func() error, check func()) float64 {
	b.Helper()
	b.ReportAllocs()
	var el time.Duration
	for b.Loop() {
		b.StopTimer()
		setup()
		b.StartTimer()
		t0 := time.Now()
		if err := load(); err != nil {
			b.Fatal(err)
		}
		el += time.Since(t0)
		b.StopTimer()
		check()
		b.StartTimer()
	}
	rate := float64(n) * float64(b.N) / el.Seconds()
	b.ReportMetric(rate, "rows/s")
	return rate
}

var jobSeq int

// loadPgetl runs a whole job: a session, one batch session with cfg adding rows
// (cursor = row number), Close of both.
func loadPgetl(ctx context.Context, pool *pgxpool.Pool, schema string, cfg pgetl.BatchConfig, rows [][]any) (err error) {
	jobSeq++
	s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: fmt.Sprintf("remote-%d", jobSeq), CheckpointSchema: schema})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := s.Close(ctx); err == nil {
			err = cerr
		}
	}()
	bs, err := s.Batch(ctx, cfg)
	if err != nil {
		return err
	}
	for i, r := range rows {
		if err := bs.Add(ctx, strconv.Itoa(i+1), r...); err != nil {
			return err
		}
	}
	return bs.Close(ctx)
}

// seedRows is how many rows the field report's pattern loads over a link of round
// trip rtt: it costs about 27 round trips per 25 rows (BEGIN, 25 INSERTs, COMMIT),
// so at 50 ms 200,000 rows would take two hours. It loads what fits in a few
// seconds (at least 100 rows, at most 4,000) and its rows/s is that rate.
func seedRows(rtt time.Duration) int64 {
	budget := 5 * time.Second
	if workload.Small() {
		budget = 1500 * time.Millisecond
	}
	per25 := 27*rtt + time.Millisecond
	return 25 * min(160, max(4, int64(budget/per25)))
}

// result is one measurement of the summary table.
type result struct {
	rate float64
	rows int64
}

// linkInfo is what the summary says about a link.
type linkInfo struct {
	selectOne, psqlSetup time.Duration
}

// BenchmarkRemote: pgetl over a distant link (see the top of this file), beside
// CopyFrom of all rows in one transaction and the field report's pattern over the
// same link, and psql \copy of the same rows. The run ends printing a table of
// rows/s, x_psql and x_copy per round trip.
func BenchmarkRemote(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	n := int64(workload.N(200_000, 10_000))
	v1, v2 := rowsAt(n, 1), rowsAt(n, 2)
	psql := newPSQLCopy(b, n, 1)
	var odd [][]any // version 1 of the odd rows: half the keys of the upsert exist
	for i := 0; i < len(v1); i += 2 {
		odd = append(odd, v1[i])
	}
	// The checkpoint objects are made once, straight on the server, so that no timed
	// run pays their DDL.
	s, err := pgetl.NewSession(ctx, db.Pool, pgetl.SessionConfig{Job: "remote-setup", CheckpointSchema: db.Schema})
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		b.Fatal(err)
	}
	table := db.Qualified(workload.Table)
	ident := pgx.Identifier{db.Schema, workload.Table}

	results := map[string]result{}
	var names []string
	measured := map[time.Duration]linkInfo{}
	record := func(name string, r result) {
		if _, ok := results[name]; !ok {
			names = append(names, name)
		}
		results[name] = r
	}

	for _, rtt := range rtts() {
		rttName := fmt.Sprintf("rtt=%dms", rtt.Milliseconds())
		b.Run(rttName, func(b *testing.B) {
			l := newLink(b, db, rtt)
			measured[rtt] = linkInfo{selectOne: l.measured, psqlSetup: psql.setup(b, l.url)}
			fresh := func() { freshTable(b, db); l.warm(b, poolConns) }
			var copyRate, psqlRate float64
			report := func(b *testing.B, name string, rate float64, rows int64) {
				if psqlRate > 0 {
					b.ReportMetric(rate/psqlRate, "x_psql")
				}
				if copyRate > 0 {
					b.ReportMetric(rate/copyRate, "x_copy")
				}
				record(rttName+"/"+name, result{rate: rate, rows: rows})
			}

			b.Run("psql_copy", func(b *testing.B) {
				psqlRate = measure(b, n, fresh, func() error {
					return psql.load(ctx, l.url, db.Ident(workload.Table))
				}, func() { requireRows(b, db, n, 1) })
				report(b, "psql_copy", psqlRate, n)
			})

			b.Run("copyfrom_one_tx", func(b *testing.B) {
				copyRate = measure(b, n, fresh, func() error {
					return pgx.BeginFunc(ctx, l.pool, func(tx pgx.Tx) error {
						_, err := tx.CopyFrom(ctx, ident, workload.Columns, pgx.CopyFromRows(v1))
						return err
					})
				}, func() { requireRows(b, db, n, 1) })
				report(b, "copyfrom_one_tx", copyRate, n)
			})

			modes := []struct {
				name string
				cfg  pgetl.BatchConfig
				seed bool
			}{
				{"insert_default", pgetl.BatchConfig{Table: table, Columns: workload.Columns}, false},
				{"insert_rows=1000", pgetl.BatchConfig{Table: table, Columns: workload.Columns, CommitRows: 1000}, false},
				{"upsert_default", pgetl.BatchConfig{Table: table, Columns: workload.Columns, Key: []string{"sku"}}, true},
			}
			for _, m := range modes {
				for _, k := range inFlights {
					name := fmt.Sprintf("%s/K=%d", m.name, k)
					b.Run(name, func(b *testing.B) {
						cfg := m.cfg
						cfg.InFlight = k
						rows, v := v1, int64(1)
						setup := fresh
						if m.seed {
							rows, v = v2, 2
							setup = func() {
								freshTable(b, db)
								if _, err := db.Pool.CopyFrom(ctx, ident, workload.Columns, pgx.CopyFromRows(odd)); err != nil {
									b.Fatal(err)
								}
								db.Exec(b, "VACUUM ANALYZE products")
								l.warm(b, poolConns)
							}
						}
						rate := measure(b, n, setup, func() error {
							return loadPgetl(ctx, l.pool, db.Schema, cfg, rows)
						}, func() { requireRows(b, db, n, v) })
						report(b, name, rate, n)
					})
				}
			}

			// The field report's loop, ported naively: one INSERT per row, a commit
			// every 25 rows, on a few hundred rows (see seedRows), over the 10 ms
			// link only (the goal compares with it there).
			if rtt != 10*time.Millisecond {
				return
			}
			b.Run("seed_pattern_commit25", func(b *testing.B) {
				nn := min(n, seedRows(rtt))
				ins := "INSERT INTO " + ident.Sanitize() + " (" + strings.Join(workload.Columns, ", ") + ") VALUES ($1, $2, $3, $4, $5)"
				rate := measure(b, nn, fresh, func() error {
					for off := int64(0); off < nn; off += 25 {
						err := pgx.BeginFunc(ctx, l.pool, func(tx pgx.Tx) error {
							for _, r := range v1[off:min(off+25, nn)] {
								if _, err := tx.Exec(ctx, ins, r...); err != nil {
									return err
								}
							}
							return nil
						})
						if err != nil {
							return err
						}
					}
					return nil
				}, func() { requireRows(b, db, nn, 1) })
				b.ReportMetric(float64(nn), "rows_measured")
				report(b, "seed_pattern_commit25", rate, nn)
			})
		})
	}
	// Printed, not logged: a parent benchmark's log shows only under -v.
	fmt.Print(summary(n, names, results, measured))
}

// summary formats the results as a table: one line per load, one column per
// InFlight value holding rows/s and, in brackets, x_psql / x_copy, computed here
// from the same round trip's baselines (so the baselines' own lines show their
// ratio to each other). The last line compares the default insert at 10 ms with
// the seed pattern.
func summary(n int64, names []string, results map[string]result, measured map[time.Duration]linkInfo) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "pgetl over a distant link, %d product rows; cells: rows/s (x_psql / x_copy), the ratios to psql \\copy and to CopyFrom in one transaction over the same link\n", n)
	for _, rtt := range rtts() {
		if m, ok := measured[rtt]; ok {
			fmt.Fprintf(&sb, "rtt %v: a SELECT 1 takes %v through the proxy; a psql process with a SELECT 1 takes %v\n",
				rtt, m.selectOne.Round(10*time.Microsecond), m.psqlSetup.Round(100*time.Microsecond))
		}
	}
	fmt.Fprintf(&sb, "%-8s %-22s", "rtt", "load")
	for _, k := range inFlights {
		fmt.Fprintf(&sb, " %24s", fmt.Sprintf("K=%d", k))
	}
	sb.WriteString("\n")
	ratio := func(r, base float64) string {
		switch {
		case base == 0:
			return "-"
		case r/base < 0.01:
			return fmt.Sprintf("%.4f", r/base)
		}
		return fmt.Sprintf("%.2f", r/base)
	}
	seen := map[string]bool{}
	for _, name := range names {
		rtt, load, _ := strings.Cut(name, "/")
		load, _, perK := strings.Cut(load, "/K=")
		if seen[rtt+"/"+load] {
			continue
		}
		seen[rtt+"/"+load] = true
		psql, cp := results[rtt+"/psql_copy"].rate, results[rtt+"/copyfrom_one_tx"].rate
		cell := func(r result) string {
			return fmt.Sprintf("%.0f (%s / %s)", r.rate, ratio(r.rate, psql), ratio(r.rate, cp))
		}
		fmt.Fprintf(&sb, "%-8s %-22s", strings.TrimPrefix(rtt, "rtt="), load)
		if !perK {
			r := results[name]
			fmt.Fprintf(&sb, " %24s", cell(r))
			if r.rows != n {
				fmt.Fprintf(&sb, "  (measured on %d rows)", r.rows)
			}
		} else {
			for _, k := range inFlights {
				r, ok := results[fmt.Sprintf("%s/%s/K=%d", rtt, load, k)]
				s := "-"
				if ok {
					s = cell(r)
				}
				fmt.Fprintf(&sb, " %24s", s)
			}
		}
		sb.WriteString("\n")
	}
	// psql's rate counts its process start and connection, which on a busy machine
	// cost more than the link's round trips: show what it is without them.
	for _, rtt := range rtts() {
		r, ok := results[fmt.Sprintf("rtt=%dms/psql_copy", rtt.Milliseconds())]
		if m := measured[rtt]; ok && r.rate > 0 && m.psqlSetup > 0 {
			if copyOnly := time.Duration(float64(r.rows)/r.rate*float64(time.Second)) - m.psqlSetup; copyOnly > 0 {
				fmt.Fprintf(&sb, "%v: psql \\copy without its process start and connection (%v): %.0f rows/s\n",
					rtt, m.psqlSetup.Round(time.Millisecond), float64(r.rows)/copyOnly.Seconds())
			}
		}
	}
	if seed, ok := results["rtt=10ms/seed_pattern_commit25"]; ok && seed.rate > 0 {
		for _, k := range inFlights {
			if r, ok := results[fmt.Sprintf("rtt=10ms/insert_default/K=%d", k)]; ok {
				fmt.Fprintf(&sb, "10 ms: insert_default at K=%d is %.0f× the seed pattern\n", k, r.rate/seed.rate)
			}
		}
	}
	return sb.String()
}
