package pgetl

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

// BenchmarkSync is the re-sync: a table of rows 1..n at version 1 synced
// with rows 1..1.01n where every 100th row is at version 2 and every 200th is
// missing (n = 500,000 and 1,000,000; 20,000 with PGETL_BENCH_SMALL=1). In the same
// run it measures, on the same machine and server:
//
//   - resync: NewSession, Batch with Sync (its preload included), Add of every
//     source row, Sweep, Close;
//   - psql_copy: psql \copy of the same source rows (a CSV file written
//     beforehand) into an empty table, psql's start included;
//   - seed: the seed job's pattern doing the same re-sync, ported to pgx: one
//     upsert statement per row and a commit every 25 rows, on a sample of the
//     source rows (its rate is what matters; the deletes are not even counted);
//   - seed_orm: the seed job's own pattern, Python and the SQLAlchemy ORM
//     (testdata/seed_sync.py run by /usr/bin/python3: a lookup by sku, attributes
//     set or a Product added, a commit every 25 rows), on a sample of 2,000 source
//     rows spread over the source (200 with PGETL_BENCH_SMALL=1), Python's start-up
//     and connection excluded. It needs SQLAlchemy and psycopg2 for
//     /usr/bin/python3 (apt-get install -y python3-sqlalchemy python3-psycopg2):
//     the benchmark fails without them;
//   - seed_orm_cached: the same script in its "cached" mode, which first loads
//     every product of the table into a dict (so an unchanged row costs no SQL),
//     as a seed job with an object cache would: its rate is the source's rows over
//     the time of that load plus the sample's loop time scaled to the source.
//
// It reports each one's source rows/s and the ratios x_copy (resync speed over
// \copy's: the bar is 2 at 500k, its goal 3 at 1M; x_copy_best compares
// the fastest iteration of each), x_seed and x_seed_orm (the bar: 100),
// x_seed_orm_cached, and the bytes the seen set takes on the server per source
// row.
func BenchmarkSync(b *testing.B) {
	if _, err := exec.LookPath("psql"); err != nil {
		b.Fatalf("psql is needed for the \\copy baseline: %v", err)
	}
	checkSeedORM(b)
	sizes := []int64{500_000, 1_000_000}
	if workload.Small() {
		sizes = []int64{20_000}
	}
	for _, n := range sizes {
		b.Run("rows="+sizeName(int(n)), func(b *testing.B) { benchSync(b, n) })
	}
}

func benchSync(b *testing.B, n int64) {
	ctx := context.Background()
	db := pgtest.New(b)
	src := syncSource{n: n + n/100, v: 2, changedEvery: 100, missingEvery: 200}
	var rows [][]any
	var cursors []string
	for i := int64(1); i <= src.n; i++ {
		if !workload.Missing(i, src.missingEvery) {
			rows = append(rows, workload.Row(i, workload.SyncVersion(i, src.v, src.changedEvery)).Values())
			cursors = append(cursors, strconv.FormatInt(i, 10))
		}
	}
	csvPath := filepath.Join(b.TempDir(), "source.csv")
	writeSyncCSV(b, csvPath, src)
	tbl := db.Ident("products")
	var resync, copyT, seedT time.Duration
	bestResync, bestCopy := time.Duration(math.MaxInt64), time.Duration(math.MaxInt64)
	var seedRows int64
	var ormRows, ormSeconds, cachedSeconds float64
	var seenBytes int64
	job := 0
	for b.Loop() {
		b.StopTimer()
		db.Exec(b, "DROP TABLE IF EXISTS "+tbl)
		db.Exec(b, workload.CreateSQL(tbl, false))
		if _, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, n, 1)); err != nil {
			b.Fatal(err)
		}
		db.Exec(b, "VACUUM ANALYZE "+tbl)
		job++
		b.StartTimer()

		t0 := time.Now()
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: fmt.Sprint("resync-", job), CheckpointSchema: db.Schema})
		if err != nil {
			b.Fatal(err)
		}
		bs, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"},
			Sync: &SyncConfig{}})
		if err != nil {
			b.Fatal(err)
		}
		for k, r := range rows {
			if err := bs.Add(ctx, cursors[k], r...); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := bs.Sweep(ctx); err != nil {
			b.Fatal(err)
		}
		if err := bs.Close(ctx); err != nil {
			b.Fatal(err)
		}
		st := s.Stat()
		if err := s.Close(ctx); err != nil {
			b.Fatal(err)
		}
		resync += time.Since(t0)
		bestResync = min(bestResync, time.Since(t0))
		b.StopTimer()
		if want := n / 200; st.Deleted() != want || st.Updated() != n/100 {
			b.Fatalf("deleted %d (want %d), updated %d (want %d)", st.Deleted(), want, st.Updated(), n/100)
		}
		seenBytes += db.Int(b, "SELECT pg_total_relation_size($1)", db.Schema+".sync_seen")
		db.Exec(b, "TRUNCATE "+db.Ident("sync_seen"))

		// psql \copy of the same source rows into an empty table.
		db.Exec(b, "DROP TABLE "+tbl)
		db.Exec(b, workload.CreateSQL(tbl, false))
		t0 = time.Now()
		cmd := exec.Command("psql", pgtest.URL(b), "-v", "ON_ERROR_STOP=1", "-qc",
			`\copy `+tbl+` (`+strings.Join(workload.Columns, ", ")+`) FROM '`+csvPath+`' WITH (FORMAT csv, HEADER true)`)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("psql \\copy: %v: %s", err, out)
		}
		copyT += time.Since(t0)
		bestCopy = min(bestCopy, time.Since(t0))
		if got := db.Int(b, "SELECT count(*) FROM "+tbl); got != int64(len(rows)) {
			b.Fatalf("\\copy loaded %d rows, want %d", got, len(rows))
		}

		// The seed's pattern on a sample: one upsert per row, commit every 25, into the
		// table at version 1 (reloaded).
		db.Exec(b, "TRUNCATE "+tbl)
		if _, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, n, 1)); err != nil {
			b.Fatal(err)
		}
		sample := min(int64(len(rows)), 2000)
		ups := "INSERT INTO " + tbl + " (sku, name, price, inventory, updated_at) VALUES ($1, $2, $3, $4, $5)" +
			" ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, price = EXCLUDED.price, inventory = EXCLUDED.inventory, updated_at = EXCLUDED.updated_at"
		t0 = time.Now()
		for off := int64(0); off < sample; off += 25 {
			err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
				for _, r := range rows[off:min(off+25, sample)] {
					if _, err := tx.Exec(ctx, ups, r...); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		seedT += time.Since(t0)
		seedRows += sample

		// The seed job itself: testdata/seed_sync.py, SQLAlchemy ORM with a commit
		// every 25 rows, on a sample spread over the source rows, into the table at
		// version 1 (reloaded).
		db.Exec(b, "TRUNCATE "+tbl)
		if _, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, n, 1)); err != nil {
			b.Fatal(err)
		}
		orm := runSeedORM(b, db.BaseURL, db.Schema, csvPath, cursors, n, src, false)
		ormSeconds += orm.seconds
		ormRows += orm.rows
		db.Exec(b, "TRUNCATE "+tbl)
		if _, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, workload.Columns, workload.NewSource(1, n, 1)); err != nil {
			b.Fatal(err)
		}
		cached := runSeedORM(b, db.BaseURL, db.Schema, csvPath, cursors, n, src, true)
		cachedSeconds += cached.preloadSeconds + cached.seconds*float64(len(rows))/cached.rows
		b.StartTimer()
	}
	loops := float64(b.N)
	resyncRate := float64(len(rows)) * loops / resync.Seconds()
	copyRate := float64(len(rows)) * loops / copyT.Seconds()
	seedRate := float64(seedRows) / seedT.Seconds()
	b.ReportMetric(resyncRate, "rows/s")
	b.ReportMetric(copyRate, "copy_rows/s")
	b.ReportMetric(seedRate, "seed_rows/s")
	b.ReportMetric(resyncRate/copyRate, "x_copy")
	// The best of each over the iterations: on a shared machine the least disturbed
	// runs (-benchtime=3x or more).
	b.ReportMetric(bestCopy.Seconds()/bestResync.Seconds(), "x_copy_best")
	b.ReportMetric(resyncRate/seedRate, "x_seed")
	ormRate := ormRows / ormSeconds
	b.ReportMetric(ormRate, "seed_orm_rows/s")
	b.ReportMetric(resyncRate/ormRate, "x_seed_orm")
	cachedRate := float64(len(rows)) * loops / cachedSeconds
	b.ReportMetric(cachedRate, "seed_orm_cached_rows/s")
	b.ReportMetric(resyncRate/cachedRate, "x_seed_orm_cached")
	b.ReportMetric(float64(seenBytes)/loops/float64(len(rows)), "seen_B/row")
}

// seedPython is the interpreter of the seed job's ORM pattern: Debian's, where
// apt-get installs SQLAlchemy and psycopg2 (a python3 earlier on PATH, such as a
// pyenv shim, may lack them).
const seedPython = "/usr/bin/python3"

// checkSeedORM fails b unless seedPython imports SQLAlchemy and psycopg2.
func checkSeedORM(b *testing.B) {
	b.Helper()
	out, err := exec.Command(seedPython, "-c", "import sqlalchemy, psycopg2").CombinedOutput()
	if err != nil {
		b.Fatalf("the seed's ORM baseline needs SQLAlchemy and psycopg2 for %s: apt-get install -y python3-sqlalchemy python3-psycopg2 (%v: %s)",
			seedPython, err, strings.TrimSpace(string(out)))
	}
}

// seedORMResult is what testdata/seed_sync.py measured.
type seedORMResult struct {
	rows, seconds  float64
	preloadSeconds float64 // cached mode: loading every product
}

// runSeedORM runs testdata/seed_sync.py on a sample of the source rows in
// csvPath (every stride-th of src's rows: cursors are their row numbers, n the rows
// of the table at version 1) into schema's products table, and checks the rows it
// updated and inserted against the sample. cached runs it in its cached mode, which
// loads every product of the table first.
func runSeedORM(b *testing.B, url, schema, csvPath string, cursors []string, n int64, src syncSource, cached bool) seedORMResult {
	b.Helper()
	sample := workload.N(2000, 200)
	stride := max(1, len(cursors)/sample)
	var wantUpdated, wantInserted int
	for k, c := 0, 0; k < len(cursors) && c < sample; k, c = k+stride, c+1 {
		i, _ := strconv.ParseInt(cursors[k], 10, 64)
		switch {
		case i > n:
			wantInserted++
		case workload.SyncVersion(i, src.v, src.changedEvery) != 1:
			wantUpdated++
		}
	}
	args := []string{filepath.Join("testdata", "seed_sync.py"), url, schema, csvPath, strconv.Itoa(sample), strconv.Itoa(stride)}
	if cached {
		args = append(args, "cached")
	}
	out, err := exec.Command(seedPython, args...).CombinedOutput()
	if err != nil {
		b.Fatalf("testdata/seed_sync.py: %v: %s", err, out)
	}
	got := map[string]float64{}
	for _, f := range strings.Fields(string(out)) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		x, err := strconv.ParseFloat(v, 64)
		if err != nil {
			b.Fatalf("testdata/seed_sync.py: %q in %q", f, out)
		}
		got[k] = x
	}
	if got["rows"] != float64(min(sample, (len(cursors)+stride-1)/stride)) || got["seconds"] <= 0 ||
		got["updated"] != float64(wantUpdated) || got["inserted"] != float64(wantInserted) {
		b.Fatalf("testdata/seed_sync.py: %q: want %d rows, %d updated, %d inserted", out, sample, wantUpdated, wantInserted)
	}
	if cached && got["preloaded"] != float64(n) {
		b.Fatalf("testdata/seed_sync.py: %q: want %d products preloaded", out, n)
	}
	return seedORMResult{rows: got["rows"], seconds: got["seconds"], preloadSeconds: got["preload_seconds"]}
}

// writeSyncCSV writes the rows of src as a CSV file of workload.CSVHeader.
func writeSyncCSV(b *testing.B, path string, src syncSource) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	_, _ = w.WriteString(workload.CSVHeader + "\n")
	var line []byte
	for i := int64(1); i <= src.n; i++ {
		if !workload.Missing(i, src.missingEvery) {
			line = workload.AppendCSV(line[:0], workload.Row(i, workload.SyncVersion(i, src.v, src.changedEvery)))
			_, _ = w.Write(line)
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkSyncBytesPerKey measures the heap the sync's key cache (key hash and
// row hash per key) takes, at 1M and 10M synthetic keys (100k with
// PGETL_BENCH_SMALL=1), without the database: HeapAlloc after GC before and after
// filling it, as the preload does.
func BenchmarkSyncBytesPerKey(b *testing.B) {
	for _, n := range benchSizes() {
		b.Run("keys="+sizeName(n), func(b *testing.B) {
			var perKey float64
			var key []byte
			for b.Loop() {
				before := heapAlloc()
				t := newRowHashes(n)
				for i := range n {
					key = benchKey(key, i)
					t.set(keyHash(key), rowHash(key))
				}
				after := heapAlloc()
				if t.len() != n {
					b.Fatalf("%d keys held, want %d", t.len(), n)
				}
				perKey = float64(after-before) / float64(n)
				runtime.KeepAlive(t)
			}
			b.ReportMetric(perKey, "B/key")
		})
	}
}
