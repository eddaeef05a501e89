package workload

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestRow(t *testing.T) {
	t.Parallel()
	p := Row(1, 1)
	require.Equal(t, Product{
		I: 1, V: 1, SKU: "SKU-0000001", Name: "Product 1 v1",
		PriceCents: 8932, Inventory: 32,
		UpdatedAt: time.Date(2024, 1, 12, 13, 46, 41, 0, time.UTC),
	}, p)
	require.Equal(t, "89.32", p.PriceString())
	require.Equal(t, "SKU-0000001|Product 1 v1|89.32|32|1705067201", p.Text())

	p = Row(1234567, 3)
	require.Equal(t, "SKU-1234567", p.SKU)
	require.Equal(t, "Product 1234567 v3", p.Name)
	require.Equal(t, (int64(1234567)*7919+3*1013)%10_000_000, p.PriceCents)
	require.Equal(t, int32((1234567*31+3)%10000), p.Inventory)
	require.Equal(t, time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).Add((1234567+3_000_000)*time.Second), p.UpdatedAt)
	require.Equal(t, time.UTC, p.UpdatedAt.Location())

	for _, i := range []int64{0, 1, 9, 10, 999_999, 9_999_999, 10_000_000, 123_456_789} {
		require.Equal(t, fmt.Sprintf("SKU-%07d", i), SKU(i))
	}
	for cents, want := range map[int64]string{0: "0.00", 5: "0.05", 10: "0.10", 100: "1.00", 9_999_999: "99999.99"} {
		require.Equal(t, want, Product{PriceCents: cents}.PriceString())
		n := Product{PriceCents: cents}.PriceNumeric()
		require.True(t, n.Valid)
		require.Equal(t, int32(-2), n.Exp)
		require.Equal(t, cents, n.Int.Int64())
	}
}

func TestValuesMatchColumns(t *testing.T) {
	t.Parallel()
	p := Row(42, 7)
	v := p.Values()
	require.Len(t, v, len(Columns))
	require.Equal(t, []any{p.SKU, p.Name, p.PriceNumeric(), p.Inventory, p.UpdatedAt}, v)

	src := NewSource(5, 7, 2)
	var got []string
	for src.Next() {
		vals, err := src.Values()
		require.NoError(t, err)
		got = append(got, vals[0].(string))
	}
	require.NoError(t, src.Err())
	require.Equal(t, []string{"SKU-0000005", "SKU-0000006", "SKU-0000007"}, got)
}

func TestSum(t *testing.T) {
	t.Parallel()
	var empty Sum
	require.Equal(t, int64(0), empty.Count())
	require.Equal(t, "0", empty.String())

	// The 128-bit accumulator agrees with a big.Int sum of the same terms.
	var s Sum
	want := new(big.Int)
	for i := int64(1); i <= 5000; i++ {
		p := Row(i, 3)
		s.Add(p)
		h := md5.Sum([]byte(p.Text()))
		want.Add(want, big.NewInt(int64(binary.BigEndian.Uint64(h[:8]))))
	}
	require.Equal(t, want.String(), s.String())
	require.Equal(t, int64(5000), s.Count())

	// Order does not matter.
	var r Sum
	for i := int64(5000); i >= 1; i-- {
		r.Add(Row(i, 3))
	}
	require.Equal(t, s.String(), r.String())

	n, sum := Checksum(5000, 3)
	require.Equal(t, int64(5000), n)
	require.Equal(t, s.String(), sum)
	_, other := Checksum(5000, 4)
	require.NotEqual(t, sum, other)
}

func TestCSV(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	require.NoError(t, CSV(&buf, 1, 3, 1))
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	require.Equal(t, []string{
		"sku,name,price,inventory,updated_at",
		"SKU-0000001,Product 1 v1,89.32,32,2024-01-12T13:46:41Z",
		"SKU-0000002,Product 2 v1,168.51,63,2024-01-12T13:46:42Z",
		"SKU-0000003,Product 3 v1,247.70,94,2024-01-12T13:46:43Z",
	}, lines)
	for i, line := range lines[1:] {
		p, err := ParseCSV(strings.Split(line, ","))
		require.NoError(t, err)
		require.Equal(t, Row(int64(i+1), 1), p)
	}
	_, err := ParseCSV([]string{"SKU-1", "Product 1 v1", "1.5", "3", "2024-01-01T00:00:00Z"})
	require.ErrorContains(t, err, "price")
	_, err = ParseCSV([]string{"x"})
	require.ErrorContains(t, err, "fields")
}

// TestChecksumMatchesDatabase loads rows through each path the library and the
// example job use and compares the table with the generator.
func TestChecksumMatchesDatabase(t *testing.T) {
	t.Parallel()
	const n = 1000
	ctx := context.Background()
	db := pgtest.New(t)

	create := func(t *testing.T, name string, autovacuum bool) string {
		table := db.Ident(name)
		db.Exec(t, CreateSQL(table, autovacuum))
		return table
	}
	check := func(t *testing.T, table string, wantN int64, wantSum string) {
		t.Helper()
		gotN, gotSum, err := QueryChecksum(ctx, db.Pool, table)
		require.NoError(t, err)
		require.Equal(t, wantN, gotN)
		require.Equal(t, wantSum, gotSum)
	}

	t.Run("empty", func(t *testing.T) {
		table := create(t, "empty", true)
		n, sum := Checksum(0, 1)
		check(t, table, n, sum)
	})

	t.Run("copyfrom", func(t *testing.T) {
		table := create(t, "copyfrom", false)
		copied, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "copyfrom"}, Columns, NewSource(1, n, 1))
		require.NoError(t, err)
		require.Equal(t, int64(n), copied)
		wantN, wantSum := Checksum(n, 1)
		check(t, table, wantN, wantSum)

		var av string
		require.NoError(t, db.Pool.QueryRow(ctx,
			"SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = $1::regclass", table).Scan(&av))
		require.Contains(t, av, "autovacuum_enabled=false")

		// Every column reads back exactly as generated.
		rows, err := db.Pool.Query(ctx, "SELECT sku, name, price::text, inventory, updated_at FROM "+table+" ORDER BY id")
		require.NoError(t, err)
		i := int64(0)
		for rows.Next() {
			i++
			var p Product
			var price string
			require.NoError(t, rows.Scan(&p.SKU, &p.Name, &price, &p.Inventory, &p.UpdatedAt))
			want := Row(i, 1)
			require.Equal(t, want.SKU, p.SKU)
			require.Equal(t, want.Name, p.Name)
			require.Equal(t, want.PriceString(), price)
			require.Equal(t, want.Inventory, p.Inventory)
			require.True(t, want.UpdatedAt.Equal(p.UpdatedAt), "row %d: %v != %v", i, p.UpdatedAt, want.UpdatedAt)
		}
		require.NoError(t, rows.Err())
		require.Equal(t, int64(n), i)

		// Any change to any column changes the checksum.
		for _, set := range []string{"name = name || 'x'", "price = price + 0.01", "inventory = inventory + 1", "updated_at = updated_at + interval '1 second'", "sku = 'SKU-x'"} {
			tx, err := db.Pool.Begin(ctx)
			require.NoError(t, err)
			_, err = tx.Exec(ctx, "UPDATE "+table+" SET "+set+" WHERE sku = 'SKU-0000500'")
			require.NoError(t, err)
			_, gotSum, err := QueryChecksum(ctx, tx, table)
			require.NoError(t, err)
			require.NotEqual(t, wantSum, gotSum, set)
			require.NoError(t, tx.Rollback(ctx))
		}
	})

	t.Run("upsert_mixed_versions", func(t *testing.T) {
		table := create(t, "upsert", true)
		_, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "upsert"}, Columns, NewSource(1, n, 1))
		require.NoError(t, err)
		// Version 2 of the upper half, as text parameters (price as a string).
		batch := &pgx.Batch{}
		var want Sum
		for i := int64(1); i <= n; i++ {
			if i <= n/2 {
				want.Add(Row(i, 1))
				continue
			}
			p := Row(i, 2)
			want.Add(p)
			batch.Queue("UPDATE "+table+" SET name = $2, price = $3, inventory = $4, updated_at = $5 WHERE sku = $1",
				p.SKU, p.Name, p.PriceString(), p.Inventory, p.UpdatedAt)
		}
		require.NoError(t, db.Pool.SendBatch(ctx, batch).Close())
		check(t, table, want.Count(), want.String())
	})

	t.Run("csv", func(t *testing.T) {
		table := create(t, "csv", true)
		var buf bytes.Buffer
		require.NoError(t, CSV(&buf, 1, n, 5))
		conn, err := db.Pool.Acquire(ctx)
		require.NoError(t, err)
		defer conn.Release()
		tag, err := conn.Conn().PgConn().CopyFrom(ctx, &buf,
			"COPY "+table+" ("+strings.Join(Columns, ", ")+") FROM STDIN (FORMAT csv, HEADER)")
		require.NoError(t, err)
		require.Equal(t, int64(n), tag.RowsAffected())
		wantN, wantSum := Checksum(n, 5)
		check(t, table, wantN, wantSum)
	})
}

// TestGeneratorMatchesFormulas checks the generator against the formulas of the
// package doc evaluated by the server: a table filled by generate_series with the
// formulas has the generator's checksum, and so does one loaded with Row.
func TestGeneratorMatchesFormulas(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	const n, v = 5000, 3
	for _, tbl := range []string{"by_sql", "by_go"} {
		db.Exec(t, CreateIfMissingSQL(db.Ident(tbl)))
	}
	db.Exec(t, fmt.Sprintf(`INSERT INTO %s (sku, name, price, inventory, updated_at)
		SELECT 'SKU-' || lpad(i::text, 7, '0'), 'Product ' || i || ' v' || %[2]d,
			((i * 7919 + %[2]d * 1013) %% 10000000) / 100.0, (i * 31 + %[2]d) %% 10000,
			to_timestamp(1704067200 + i + %[2]d * 1000000)
		FROM generate_series(1, %d) i`, db.Ident("by_sql"), v, n))
	rows := make([][]any, 0, n)
	for i := int64(1); i <= n; i++ {
		rows = append(rows, Row(i, v).Values())
	}
	_, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "by_go"}, Columns, pgx.CopyFromRows(rows))
	require.NoError(t, err)
	wantN, wantSum := Checksum(n, v)
	for _, tbl := range []string{"by_sql", "by_go"} {
		gotN, gotSum, err := QueryChecksum(ctx, db.Pool, db.Ident(tbl))
		require.NoError(t, err)
		require.Equal(t, wantN, gotN, tbl)
		require.Equal(t, wantSum, gotSum, tbl)
	}
	_, other := Checksum(n, v+1)
	require.NotEqual(t, wantSum, other, "checksums of two versions")
}
