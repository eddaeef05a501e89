package pgetl

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// BenchmarkLookupMissVsHit measures what a lookup column costs per row when its key
// is in the cache (a hit: the id is encoded at Add and the row goes straight into the
// COPY) and when it is not (a miss: the row waits in the batch and its key is
// resolved in the batch's own transaction, through a staging table). Each row has
// a key of its own, so every row of a miss case misses. Same run, same rows, default
// batch size, checkpoint on, a batch set of one table:
//
//   - hit: the dimension holds every key and the cache was preloaded from it (the
//     preload, timed apart, is reported as preload-ns/key);
//   - miss_lookup: the dimension holds every key, the cache is empty (LookupOnly);
//   - miss_create: the dimension is empty (GetOrCreate creates every key).
//
// It reports ns per row of each and the ratios miss/hit.
func BenchmarkLookupMissVsHit(b *testing.B) {
	db := pgtest.New(b)
	ctx := context.Background()
	n := benchN()
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("K-%09d", i+1)
	}
	src := Lookup{Table: db.Schema + ".dims", Key: "key", Value: "id"}
	var hit, missLookup, missCreate, preload time.Duration
	for b.Loop() {
		for _, c := range []string{"hit", "miss_lookup", "miss_create"} {
			b.StopTimer()
			db.Exec(b, `DROP TABLE IF EXISTS facts; DROP TABLE IF EXISTS dims;
				CREATE TABLE dims (id bigserial PRIMARY KEY, key text UNIQUE NOT NULL);
				CREATE TABLE facts (id bigint PRIMARY KEY, dim_id bigint NOT NULL REFERENCES dims (id), v int NOT NULL)`)
			if c != "miss_create" {
				db.Exec(b, `INSERT INTO dims (key) SELECT format('K-%s', lpad(g::text, 9, '0')) FROM generate_series(1, `+
					strconv.FormatInt(n, 10)+`) g; ANALYZE dims`)
			}
			cache, err := NewCache[string, int64](CacheConfig{})
			if err != nil {
				b.Fatal(err)
			}
			mode := LookupOnly
			switch c {
			case "hit":
				t0 := time.Now()
				if err := cache.Preload(ctx, db.Pool, src); err != nil {
					b.Fatal(err)
				}
				preload += time.Since(t0)
			case "miss_create":
				mode = GetOrCreate
			}
			s := benchSession(b, db)
			b.StartTimer()
			t0 := time.Now()
			set, err := s.Batches(ctx, BatchConfig{Table: db.Schema + ".facts", Columns: []string{"id", "dim_id", "v"},
				Lookups: []LookupColumn{{Column: "dim_id", Mode: mode, Cache: cache, Source: src}}})
			if err != nil {
				b.Fatal(err)
			}
			for i, k := range keys {
				if err := set.Add(ctx, strconv.Itoa(i+1), []any{int64(i + 1), k, int32(i)}); err != nil {
					b.Fatal(err)
				}
			}
			if err := set.Close(ctx); err != nil {
				b.Fatal(err)
			}
			el := time.Since(t0)
			b.StopTimer()
			if got := db.Int(b, "SELECT count(*) FROM facts f JOIN dims d ON d.id = f.dim_id AND d.key = format('K-%s', lpad(f.id::text, 9, '0'))"); got != n {
				b.Fatalf("%s: %d facts with their own key, want %d", c, got, n)
			}
			switch c {
			case "hit":
				hit += el
			case "miss_lookup":
				missLookup += el
			default:
				missCreate += el
			}
			b.StartTimer()
		}
	}
	perRow := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(int64(b.N)*n) }
	b.ReportMetric(perRow(hit), "hit-ns/row")
	b.ReportMetric(perRow(missLookup), "miss_lookup-ns/row")
	b.ReportMetric(perRow(missCreate), "miss_create-ns/row")
	b.ReportMetric(perRow(preload), "preload-ns/key")
	b.ReportMetric(float64(missLookup)/float64(hit), "miss_lookup/hit")
	b.ReportMetric(float64(missCreate)/float64(hit), "miss_create/hit")
	b.ReportMetric(0, "ns/op")
}
