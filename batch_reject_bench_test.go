package pgetl

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
)

// BenchmarkBatchRejects measures what bad rows cost (issue 13 item 6): one
// 10,000-row batch (RejectToTable) of the items table, clean and with 1% bad rows at
// random positions (fixed seed; they violate the CHECK on price), beside plain pgx
// CopyFrom of the clean rows in one transaction. bad=1% reports its time per batch
// as a ratio to clean's of the same run (x_clean).
func BenchmarkBatchRejects(b *testing.B) {
	const n = 10_000
	ctx := context.Background()
	db := pgtest.New(b)
	db.Exec(b, `CREATE TABLE items (
		id bigint PRIMARY KEY,
		name text NOT NULL,
		price numeric(12,2) NOT NULL CHECK (price >= 0),
		qty int NOT NULL,
		at timestamptz NOT NULL)`)
	// The checkpoint and reject tables, before any sub-benchmark truncates them.
	setup, err := NewSession(ctx, db.Pool, SessionConfig{Job: "setup", CheckpointSchema: db.Schema})
	if err != nil {
		b.Fatal(err)
	}
	_ = setup.Close(ctx)
	clean := make([][]any, n)
	for i := range clean {
		clean[i] = itemRow(int64(i + 1))
	}
	bad := make([][]any, n)
	copy(bad, clean)
	badRows := badPositions(n, n/100, 42)
	for _, i := range badRows {
		r := append([]any(nil), clean[i-1]...)
		r[2] = "-1.00"
		bad[i-1] = r
	}
	var cleanNs float64
	run := func(b *testing.B, load func() error, want int64) float64 {
		b.ReportAllocs()
		var el time.Duration
		for b.Loop() {
			b.StopTimer()
			db.Exec(b, "TRUNCATE items, reject")
			b.StartTimer()
			t0 := time.Now()
			if err := load(); err != nil {
				b.Fatal(err)
			}
			el += time.Since(t0)
			b.StopTimer()
			if got := db.Int(b, "SELECT count(*) FROM items"); got != want {
				b.Fatalf("%d rows loaded, want %d", got, want)
			}
			b.StartTimer()
		}
		b.ReportMetric(float64(n)*float64(b.N)/el.Seconds(), "rows/s")
		return float64(el.Nanoseconds()) / float64(b.N)
	}
	batch := func(b *testing.B, rows [][]any) func() error {
		s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "rejects-" + b.Name(), CheckpointSchema: db.Schema})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = s.Close(ctx) })
		return func() error {
			bs, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".items", Columns: itemCols, CommitRows: n, CommitInterval: -1, Rejects: RejectToTable})
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
	}
	b.Run("baseline_copyfrom", func(b *testing.B) {
		run(b, func() error {
			tx, err := db.Pool.Begin(ctx)
			if err != nil {
				return err
			}
			defer func() { _ = tx.Rollback(ctx) }()
			if _, err := tx.CopyFrom(ctx, pgx.Identifier{db.Schema, "items"}, itemCols, pgx.CopyFromRows(clean)); err != nil {
				return err
			}
			return tx.Commit(ctx)
		}, n)
	})
	b.Run("clean", func(b *testing.B) {
		cleanNs = run(b, batch(b, clean), n)
	})
	b.Run("bad=1%", func(b *testing.B) {
		ns := run(b, batch(b, bad), n-int64(len(badRows)))
		if cleanNs > 0 {
			b.ReportMetric(ns/cleanNs, "x_clean")
		}
	})
}
