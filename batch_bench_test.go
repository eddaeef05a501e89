package pgetl

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

// The benchmarks load the fixed products workload (internal/workload) into a fresh
// table with autovacuum off, and report rows/s and B/row beside the plain-pgx
// baselines of the same run; `make bench` prints each one's ratio to
// BenchmarkBaseline/copyfrom_one_tx. PGETL_BENCH_SMALL=1 (CI) shrinks the sizes.

func benchN() int64 { return int64(workload.N(200_000, 20_000)) }

// benchData returns the workload's rows 1..n at version v, built once.
var benchData = struct {
	sync.Mutex
	m map[[2]int64][][]any
}{m: map[[2]int64][][]any{}}

func benchRows(n, v int64) [][]any {
	benchData.Lock()
	defer benchData.Unlock()
	if r, ok := benchData.m[[2]int64{n, v}]; ok {
		return r
	}
	rows := make([][]any, n)
	for i := range rows {
		rows[i] = workload.Row(int64(i+1), v).Values()
	}
	benchData.m[[2]int64{n, v}] = rows
	return rows
}

// benchTable creates a fresh products table and returns its qualified name.
func benchTable(b *testing.B, db *pgtest.DB) string {
	b.Helper()
	db.Exec(b, "DROP TABLE IF EXISTS products")
	db.Exec(b, workload.CreateSQL(pgx.Identifier{db.Schema, "products"}.Sanitize(), false))
	return db.Schema + ".products"
}

// measure runs load b.N times on a fresh table each time (untimed set-up), checks
// the row count after each run, and reports rows/s and B/row.
func measure(b *testing.B, db *pgtest.DB, n int64, setup func(tbl string), load func(tbl string) error) {
	b.Helper()
	b.ReportAllocs()
	var el time.Duration
	var ms0, ms1 runtime.MemStats
	var alloc uint64
	for b.Loop() {
		b.StopTimer()
		tbl := benchTable(b, db)
		if setup != nil {
			setup(tbl)
		}
		runtime.ReadMemStats(&ms0)
		b.StartTimer()
		t0 := time.Now()
		if err := load(tbl); err != nil {
			b.Fatal(err)
		}
		el += time.Since(t0)
		b.StopTimer()
		runtime.ReadMemStats(&ms1)
		alloc += ms1.TotalAlloc - ms0.TotalAlloc
		if got := db.Int(b, "SELECT count(*) FROM "+tbl); got < n {
			b.Fatalf("table has %d rows, want %d", got, n)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(n)*float64(b.N)/el.Seconds(), "rows/s")
	b.ReportMetric(float64(alloc)/float64(n)/float64(b.N), "B/row")
}

func copyChunks(ctx context.Context, db *pgtest.DB, rows [][]any, chunk int) error {
	for off := 0; off < len(rows); off += chunk {
		end := min(off+chunk, len(rows))
		err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
			_, err := tx.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, workload.Columns, pgx.CopyFromRows(rows[off:end]))
			return err
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// BenchmarkBaseline: plain pgx, the ceiling (all rows in one transaction), chunked
// commits, and the field report's loop ported naively (one INSERT per row, a
// commit every 25 rows).
func BenchmarkBaseline(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	n := benchN()
	rows := benchRows(n, 1)
	b.Run("copyfrom_one_tx", func(b *testing.B) {
		measure(b, db, n, nil, func(string) error { return copyChunks(ctx, db, rows, len(rows)) })
	})
	for _, chunk := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("copyfrom_chunk=%d", chunk), func(b *testing.B) {
			measure(b, db, n, nil, func(string) error { return copyChunks(ctx, db, rows, chunk) })
		})
	}
	b.Run("naive_insert_commit25", func(b *testing.B) {
		nn := n / 10 // the same rate on a tenth of the rows keeps the run short
		measure(b, db, nn, nil, func(tbl string) error {
			ins := "INSERT INTO " + tableIdent(tbl) + " (sku, name, price, inventory, updated_at) VALUES ($1, $2, $3, $4, $5)"
			for off := int64(0); off < nn; off += 25 {
				err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
					for _, r := range rows[off:min(off+25, nn)] {
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
		})
	})
}

var benchJob int

func benchSession(b *testing.B, db *pgtest.DB, mod ...func(*SessionConfig)) *Session {
	b.Helper()
	benchJob++
	cfg := SessionConfig{Job: fmt.Sprintf("bench-%d", benchJob), CheckpointSchema: db.Schema}
	for _, f := range mod {
		f(&cfg)
	}
	s, err := NewSession(context.Background(), db.Pool, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// loadBatch adds rows through a BatchSession with cursor = row number; work, if
// set, runs per row (a producer's own work between rows).
func loadBatch(ctx context.Context, s *Session, cfg BatchConfig, rows [][]any, work func(int)) error {
	bs, err := s.Batch(ctx, cfg)
	if err != nil {
		return err
	}
	for i, r := range rows {
		if work != nil {
			work(i)
		}
		if err := bs.Add(ctx, strconv.Itoa(i+1), r...); err != nil {
			return err
		}
	}
	return bs.Close(ctx)
}

// spin burns about d of CPU: a producer transforming its rows.
func spin(d time.Duration) {
	for t0 := time.Now(); time.Since(t0) < d; {
	}
}

// BenchmarkBatchInsert: the BatchSession insert path, checkpoint on, at 1,000 and
// 10,000 rows per commit and at the defaults; and with a producer that spends 5 µs
// of CPU per row, beside the same producer feeding chunked CopyFrom, to show the
// overlap of producing and flushing.
func BenchmarkBatchInsert(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	n := benchN()
	rows := benchRows(n, 1)
	for _, cr := range []int{1000, 10000, 20000, 50000, 0} {
		name := fmt.Sprintf("rows=%d", cr)
		if cr == 0 {
			name = "rows=default"
		}
		b.Run(name, func(b *testing.B) {
			measure(b, db, n, nil, func(tbl string) error {
				return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns, CommitRows: cr}, rows, nil)
			})
		})
	}
	b.Run("rows=1000/async_commit", func(b *testing.B) {
		measure(b, db, n, nil, func(tbl string) error {
			s := benchSession(b, db, func(c *SessionConfig) { c.AsyncCommit = true })
			return loadBatch(ctx, s, BatchConfig{Table: tbl, Columns: workload.Columns, CommitRows: 1000}, rows, nil)
		})
	})
	b.Run("rows=1000/no_checkpoint", func(b *testing.B) {
		measure(b, db, n, nil, func(tbl string) error {
			s := benchSession(b, db, func(c *SessionConfig) { c.skipCheckpoint = true })
			return loadBatch(ctx, s, BatchConfig{Table: tbl, Columns: workload.Columns, CommitRows: 1000}, rows, nil)
		})
	})
	b.Run("rows=10000/no_checkpoint", func(b *testing.B) {
		measure(b, db, n, nil, func(tbl string) error {
			s := benchSession(b, db, func(c *SessionConfig) { c.skipCheckpoint = true })
			return loadBatch(ctx, s, BatchConfig{Table: tbl, Columns: workload.Columns, CommitRows: 10000}, rows, nil)
		})
	})
	const work = 5 * time.Microsecond
	b.Run("slow_producer/pgetl", func(b *testing.B) {
		measure(b, db, n, nil, func(tbl string) error {
			return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns}, rows, func(int) { spin(work) })
		})
	})
	b.Run("slow_producer/copyfrom_chunk=10000", func(b *testing.B) {
		measure(b, db, n, nil, func(string) error {
			for off := 0; off < len(rows); off += 10000 {
				chunk := rows[off:min(off+10000, len(rows))]
				for range chunk {
					spin(work)
				}
				if err := copyChunks(ctx, db, chunk, len(chunk)); err != nil {
					return err
				}
			}
			return nil
		})
	})
}

// BenchmarkBatchUpsert: version 2 of all rows over a table holding version 1 of the
// odd half (50 % existing keys), beside the one-transaction CopyFrom baseline of the
// same rows into an empty table.
func BenchmarkBatchUpsert(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	n := benchN()
	v1, v2 := benchRows(n, 1), benchRows(n, 2)
	var odd [][]any
	for i := 0; i < len(v1); i += 2 {
		odd = append(odd, v1[i])
	}
	seed := func(string) {
		if err := copyChunks(ctx, db, odd, len(odd)); err != nil {
			b.Fatal(err)
		}
		db.Exec(b, "VACUUM ANALYZE products")
	}
	for _, cr := range []int{10000, 0} {
		name := fmt.Sprintf("merge/rows=%d", cr)
		if cr == 0 {
			name = "merge/rows=default"
		}
		b.Run(name, func(b *testing.B) {
			measure(b, db, n, seed, func(tbl string) error {
				return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns, Key: []string{"sku"}, CommitRows: cr}, v2, nil)
			})
		})
	}
	// The key cache is preloaded in the untimed set-up: a job loads it once and it
	// survives every commit.
	b.Run("key_cache", func(b *testing.B) {
		var keys *Cache[string, struct{}]
		measure(b, db, n, func(tbl string) {
			seed(tbl)
			var err error
			if keys, err = NewCache[string, struct{}](CacheConfig{}); err != nil {
				b.Fatal(err)
			}
			if err := keys.Preload(ctx, db.Pool, Lookup{Table: tableIdent(tbl), Key: "sku"}); err != nil {
				b.Fatal(err)
			}
		}, func(tbl string) error {
			return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns, Key: []string{"sku"}, KeyCache: keys}, v2, nil)
		})
	})
	b.Run("merge_only_changed", func(b *testing.B) {
		measure(b, db, n, seed, func(tbl string) error {
			return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns, Key: []string{"sku"}, OnlyChanged: true}, v2, nil)
		})
	})
}

// BenchmarkBadRow: what one bad row (a CHECK violation) in a 10,000-row batch costs
// beside a clean batch, under RejectToTable.
func BenchmarkBadRow(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	const n = 10_000
	rows := benchRows(n, 1)
	bad := make([][]any, n)
	copy(bad, rows)
	r := append([]any(nil), rows[n/2]...)
	r[3] = int32(-1)
	bad[n/2] = r
	for _, tc := range []struct {
		name string
		rows [][]any
		want int64
	}{{"clean", rows, n}, {"one_bad", bad, n - 1}} {
		b.Run(tc.name, func(b *testing.B) {
			measure(b, db, tc.want, func(tbl string) {
				db.Exec(b, "ALTER TABLE products ADD CHECK (inventory >= 0)")
			}, func(tbl string) error {
				return loadBatch(ctx, benchSession(b, db), BatchConfig{Table: tbl, Columns: workload.Columns, CommitRows: n, Rejects: RejectToTable}, tc.rows, nil)
			})
		})
	}
}

// BenchmarkPeakHeap: peak live heap while loading N rows generated on the fly, for
// two N ten times apart: the BatchSession's memory is bounded by the batch, not the
// job. The sampler collects garbage before each reading (every 20 ms), so it reads
// what the job holds, not what the collector has yet to free; the heap held before
// the job started (other benchmarks' data) is subtracted. That makes this
// benchmark's own rows/s meaningless.
func BenchmarkPeakHeap(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	for _, n := range []int64{benchN(), 10 * benchN()} {
		b.Run(fmt.Sprintf("rows=%d", n), func(b *testing.B) {
			var peak uint64
			measure(b, db, n, nil, func(tbl string) error {
				var ms runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&ms)
				base := ms.HeapAlloc
				stop := make(chan struct{})
				done := make(chan uint64)
				go func() {
					var ms runtime.MemStats
					var p uint64
					t := time.NewTicker(20 * time.Millisecond)
					defer t.Stop()
					for {
						select {
						case <-stop:
							done <- p
							return
						case <-t.C:
						}
						runtime.GC()
						runtime.ReadMemStats(&ms)
						p = max(p, ms.HeapAlloc-min(ms.HeapAlloc, base))
					}
				}()
				s := benchSession(b, db)
				bs, err := s.Batch(ctx, BatchConfig{Table: tbl, Columns: workload.Columns})
				if err != nil {
					return err
				}
				vals := make([]any, 0, 5)
				for i := int64(1); i <= n; i++ {
					vals = workload.Row(i, 1).AppendValues(vals[:0])
					if err := bs.Add(ctx, strconv.FormatInt(i, 10), vals...); err != nil {
						return err
					}
				}
				err = bs.Close(ctx)
				close(stop)
				peak = max(peak, <-done)
				return err
			})
			b.ReportMetric(float64(peak), "peak-live-heap-B")
		})
	}
}
