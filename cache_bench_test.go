package pgetl

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
)

// benchSizes returns the key counts of the cache benchmarks: 1M and 10M, or 100k with
// PGETL_BENCH_SMALL=1 (CI).
func benchSizes() []int {
	if os.Getenv("PGETL_BENCH_SMALL") == "1" {
		return []int{100_000}
	}
	return []int{1_000_000, 10_000_000}
}

func sizeName(n int) string {
	switch {
	case n%1_000_000 == 0:
		return strconv.Itoa(n/1_000_000) + "M"
	case n%1000 == 0:
		return strconv.Itoa(n/1000) + "k"
	}
	return strconv.Itoa(n)
}

// benchKey appends the i-th short key ("SKU-0001234", 11 bytes up to 10M keys).
func benchKey(buf []byte, i int) []byte {
	buf = append(buf[:0], "SKU-"...)
	s := strconv.Itoa(i)
	for range 7 - len(s) {
		buf = append(buf, '0')
	}
	return append(buf, s...)
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkCacheBytesPerKey measures the heap taken by n short string keys with int64
// values in a Cache and in a map[string]int64 (HeapAlloc after GC, before and after).
func BenchmarkCacheBytesPerKey(b *testing.B) {
	for _, n := range benchSizes() {
		b.Run("keys="+sizeName(n), func(b *testing.B) {
			b.Run("pgetl", func(b *testing.B) {
				var perKey, statPerKey float64
				for b.Loop() {
					before := heapAlloc()
					c, err := NewCache[string, int64](CacheConfig{MaxBytes: 1 << 40})
					if err != nil {
						b.Fatal(err)
					}
					var buf []byte
					for i := range n {
						buf = benchKey(buf, i)
						c.Put(string(buf), int64(i))
					}
					after := heapAlloc()
					perKey = float64(after-before) / float64(n)
					st := c.Stat()
					if st.Len() != int64(n) {
						b.Fatalf("len %d", st.Len())
					}
					statPerKey = st.BytesPerKey()
					runtime.KeepAlive(c)
				}
				b.ReportMetric(perKey, "B/key")
				b.ReportMetric(statPerKey, "stat-B/key")
			})
			b.Run("map", func(b *testing.B) {
				var perKey float64
				for b.Loop() {
					before := heapAlloc()
					m := make(map[string]int64)
					var buf []byte
					for i := range n {
						buf = benchKey(buf, i)
						m[string(buf)] = int64(i)
					}
					after := heapAlloc()
					perKey = float64(after-before) / float64(n)
					if len(m) != n {
						b.Fatal(len(m))
					}
					runtime.KeepAlive(m)
				}
				b.ReportMetric(perKey, "B/key")
			})
		})
	}
}

// BenchmarkCacheLookup measures a hit (random order) in a Cache and in a
// map[string]int64 of the same keys; "parallel" runs lookups on every P.
func BenchmarkCacheLookup(b *testing.B) {
	n := benchSizes()[0]
	keys := make([]string, n)
	var buf []byte
	for i := range keys {
		buf = benchKey(buf, i)
		keys[i] = string(buf)
	}
	c, err := NewCache[string, int64](CacheConfig{MaxBytes: 1 << 40})
	if err != nil {
		b.Fatal(err)
	}
	m := make(map[string]int64, n)
	for i, k := range keys {
		c.Put(k, int64(i))
		m[k] = int64(i)
	}
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
	b.Run("keys="+sizeName(n), func(b *testing.B) {
		b.Run("pgetl", func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := c.Get(keys[i]); !ok {
					b.Fatal("miss")
				}
				if i++; i == n {
					i = 0
				}
			}
		})
		b.Run("map", func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := m[keys[i]]; !ok {
					b.Fatal("miss")
				}
				if i++; i == n {
					i = 0
				}
			}
		})
		b.Run("pgetl/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := rand.IntN(n)
				for pb.Next() {
					if _, ok := c.Get(keys[i]); !ok {
						panic("miss")
					}
					if i++; i == n {
						i = 0
					}
				}
			})
		})
	})
}

// BenchmarkCacheGetOrCreate resolves 1,000 keys per transaction, half of them existing,
// with an empty cache (every key goes to the database): pgetl's statement (INSERT … ON
// CONFLICT DO NOTHING RETURNING, plus a SELECT of the existing keys in the same
// statement) beside the plain-pgx ON CONFLICT DO UPDATE SET k = EXCLUDED.k RETURNING.
func BenchmarkCacheGetOrCreate(b *testing.B) {
	const perTx = 1000
	ctx := context.Background()
	for _, strategy := range []string{"pgetl", "doupdate"} {
		b.Run(strategy, func(b *testing.B) {
			db := pgtest.New(b)
			db.Exec(b, `CREATE TABLE products (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
				sku text NOT NULL UNIQUE, name text)`)
			db.Exec(b, `INSERT INTO products (sku) SELECT format('SKU-%s', lpad(g::text, 7, '0'))
				FROM generate_series(0, 499) AS g`)
			c, err := NewCache[string, int64](CacheConfig{})
			if err != nil {
				b.Fatal(err)
			}
			src := Lookup{Table: "products", Key: "sku", Value: "id"}
			doUpdate := `INSERT INTO products AS t (sku) SELECT k FROM unnest($1::text[]) AS u(k) ORDER BY k
				ON CONFLICT (sku) DO UPDATE SET sku = EXCLUDED.sku RETURNING t.sku, t.id`
			next := 500 // keys [0, next) exist
			b.ReportAllocs()
			for b.Loop() {
				keys := make([]string, 0, perTx)
				var buf []byte
				for i := next - perTx/2; i < next+perTx/2; i++ {
					buf = benchKey(buf, i)
					keys = append(keys, string(buf))
				}
				next += perTx / 2
				c.Reset()
				err := inHookTx(ctx, db.Pool, func(tx pgx.Tx) error {
					if strategy == "pgetl" {
						ids, err := c.GetOrCreate(ctx, tx, src, keys)
						if err == nil && len(ids) != perTx {
							err = fmt.Errorf("%d ids", len(ids))
						}
						return err
					}
					rows, err := tx.Query(ctx, doUpdate, keys)
					if err != nil {
						return err
					}
					got := map[string]int64{}
					for rows.Next() {
						var k string
						var v int64
						if err := rows.Scan(&k, &v); err != nil {
							return err
						}
						got[k] = v
					}
					if err := rows.Err(); err != nil {
						return err
					}
					if len(got) != perTx {
						return fmt.Errorf("%d ids", len(got))
					}
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*perTx)/b.Elapsed().Seconds(), "keys/s")
		})
	}
}
