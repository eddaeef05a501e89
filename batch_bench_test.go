package pgetl

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
)

func benchRows(b *testing.B) int64 {
	if os.Getenv("PGETL_BENCH_SMALL") != "" {
		return 20_000
	}
	return 200_000
}

// benchRow is one product row of the fixed workload (version v).
func benchRow(i, v int64) []any {
	return []any{fmt.Sprintf("SKU-%07d", i), fmt.Sprintf("Product %d v%d", i, v),
		fmt.Sprintf("%d.%02d", ((i*7919+v*1013)%10_000_000)/100, ((i*7919+v*1013)%10_000_000)%100),
		int32((i*31 + v) % 10000), time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(i+v*1_000_000) * time.Second)}
}

var benchCols = []string{"sku", "name", "price", "inventory", "updated_at"}

func benchTable(b *testing.B, db *pgtest.DB, name string) string {
	b.Helper()
	db.Exec(b, "DROP TABLE IF EXISTS "+name)
	db.Exec(b, `CREATE TABLE `+name+` (id bigserial primary key, sku text unique not null, name text not null,
		price numeric(12,2) not null, inventory int not null, updated_at timestamptz not null) WITH (autovacuum_enabled = false)`)
	return db.Schema + "." + name
}

func BenchmarkBaseline(b *testing.B) {
	db := pgtest.New(b)
	n := benchRows(b)
	rows := make([][]any, n)
	for i := range rows {
		rows[i] = benchRow(int64(i+1), 1)
	}
	for _, chunk := range []int64{n, 1000, 10000} {
		name := fmt.Sprintf("copyfrom_chunk=%d", chunk)
		if chunk == n {
			name = "copyfrom_one_tx"
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			ctx := context.Background()
			var el time.Duration
			for b.Loop() {
				b.StopTimer()
				tbl := benchTable(b, db, "base")
				b.StartTimer()
				t0 := time.Now()
				for off := int64(0); off < n; off += chunk {
					end := min(off+chunk, n)
					err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
						_, err := tx.CopyFrom(ctx, pgx.Identifier{db.Schema, "base"}, benchCols, pgx.CopyFromRows(rows[off:end]))
						return err
					})
					if err != nil {
						b.Fatal(err)
					}
				}
				el += time.Since(t0)
				_ = tbl
			}
			b.ReportMetric(float64(n)*float64(b.N)/el.Seconds(), "rows/s")
		})
	}
}

func BenchmarkBatchInsert(b *testing.B) {
	db := pgtest.New(b)
	n := benchRows(b)
	rows := make([][]any, n)
	for i := range rows {
		rows[i] = benchRow(int64(i+1), 1)
	}
	for _, cr := range []int{1000, 10000, 0} {
		name := fmt.Sprintf("rows=%d", cr)
		if cr == 0 {
			name = "rows=default"
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			ctx := context.Background()
			var el time.Duration
			job := 0
			for b.Loop() {
				b.StopTimer()
				tbl := benchTable(b, db, "ins")
				job++
				s, err := NewSession(ctx, db.Pool, SessionConfig{Job: fmt.Sprintf("bench-%s-%d", name, job), CheckpointSchema: db.Schema})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				t0 := time.Now()
				bs, err := s.Batch(ctx, BatchConfig{Table: tbl, Columns: benchCols, CommitRows: cr})
				if err != nil {
					b.Fatal(err)
				}
				for i, r := range rows {
					if err := bs.Add(ctx, "c", r...); err != nil {
						b.Fatal(err, i)
					}
				}
				if err := bs.Close(ctx); err != nil {
					b.Fatal(err)
				}
				el += time.Since(t0)
				b.StopTimer()
				_ = s.Close(ctx)
				b.StartTimer()
			}
			b.ReportMetric(float64(n)*float64(b.N)/el.Seconds(), "rows/s")
		})
	}
}
