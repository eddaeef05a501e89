// Package products is the products example job split into key-range partitions:
// the row generator, the coordinator and the worker that the command
// cmd/products-partitioned and the tests run.
//
// # Rows
//
// The generator is a copy of the core module's internal/workload (a module cannot
// import another module's internal packages) and produces the same rows, so a
// table loaded here has the same checksum as one loaded by examples/products. Row i
// (1..N) at version v is:
//
//	sku        fmt.Sprintf("SKU-%07d", i)
//	name       "Product <i> v<v>"
//	price      ((i*7919 + v*1013) mod 10^7) / 100     numeric(12,2), exact
//	inventory  (i*31 + v) mod 10000
//	updated_at 2024-01-01T00:00:00Z + (i + v*10^6) seconds
//
// [Sum] and [ChecksumSQL] compute the same order-independent checksum (count and
// the sum of the first 8 bytes of each row's MD5) from the generator and from a
// table.
package products

import (
	"context"
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"math/big"
	"math/bits"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// Columns are the columns a load writes, in the order of [AppendRow].
var Columns = []string{"sku", "name", "price", "inventory", "updated_at"}

// CreateSQL creates the products table named table (already quoted), if missing.
func CreateSQL(table string) string {
	return `CREATE TABLE IF NOT EXISTS ` + table + ` (
	id bigserial PRIMARY KEY,
	sku text UNIQUE NOT NULL,
	name text NOT NULL,
	price numeric(12,2) NOT NULL,
	inventory int NOT NULL,
	updated_at timestamptz NOT NULL
)`
}

// ChecksumSQL computes (count bigint, sum text) of a products table in the form of
// [Sum]; its %s is the table's name.
const ChecksumSQL = `SELECT count(*), coalesce(sum(('x' || substr(md5(
	sku || '|' || name || '|' || price::text || '|' || inventory::text || '|' ||
	extract(epoch FROM updated_at)::bigint::text), 1, 16))::bit(64)::bigint), 0)::text
FROM %s`

const epochUnix = 1704067200 // 2024-01-01T00:00:00Z

// SKU returns the key of row i.
func SKU(i int64) string { return fmt.Sprintf("SKU-%07d", i) }

func mod(a, m int64) int64 {
	r := a % m
	if r < 0 {
		r += m
	}
	return r
}

func priceCents(i, v int64) int64    { return mod(i*7919+v*1013, 10_000_000) }
func inventory(i, v int64) int32     { return int32(mod(i*31+v, 10_000)) }
func updatedAtUnix(i, v int64) int64 { return epochUnix + i + v*1_000_000 }
func name(i, v int64) string {
	return "Product " + strconv.FormatInt(i, 10) + " v" + strconv.FormatInt(v, 10)
}

// AppendRow appends row i at version v, in the order of [Columns] and typed for
// pgx, to dst.
func AppendRow(dst []any, i, v int64) []any {
	return append(dst, SKU(i), name(i, v), pgtype.Numeric{Int: big.NewInt(priceCents(i, v)), Exp: -2, Valid: true},
		inventory(i, v), time.Unix(updatedAtUnix(i, v), 0).UTC())
}

// text is the row's text form hashed by Sum and ChecksumSQL.
func text(b []byte, i, v int64) []byte {
	b = append(b, SKU(i)...)
	b = append(b, '|')
	b = append(b, name(i, v)...)
	b = append(b, '|')
	c := priceCents(i, v)
	b = strconv.AppendInt(b, c/100, 10)
	b = append(b, '.', byte('0'+c%100/10), byte('0'+c%10), '|')
	b = strconv.AppendInt(b, int64(inventory(i, v)), 10)
	b = append(b, '|')
	return strconv.AppendInt(b, updatedAtUnix(i, v), 10)
}

// Sum is an order-independent checksum of rows, as ChecksumSQL computes it.
type Sum struct {
	count int64
	hi    int64
	lo    uint64
	buf   []byte
}

// Add adds row i at version v.
func (s *Sum) Add(i, v int64) {
	s.buf = text(s.buf[:0], i, v)
	h := md5.Sum(s.buf)
	t := int64(binary.BigEndian.Uint64(h[:8]))
	var carry uint64
	s.lo, carry = bits.Add64(s.lo, uint64(t), 0)
	s.hi += t>>63 + int64(carry)
	s.count++
}

// Count returns the number of rows added.
func (s *Sum) Count() int64 { return s.count }

// String returns the sum in decimal, as ChecksumSQL renders it.
func (s *Sum) String() string {
	var v, lo big.Int
	v.Lsh(big.NewInt(s.hi), 64)
	v.Add(&v, lo.SetUint64(s.lo))
	return v.String()
}

// Checksum returns the checksum of rows 1..n at version v.
func Checksum(n, v int64) (count int64, sum string) {
	var s Sum
	for i := int64(1); i <= n; i++ {
		s.Add(i, v)
	}
	return s.Count(), s.String()
}

// QueryChecksum returns ChecksumSQL of table (already quoted).
func QueryChecksum(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, table string) (count int64, sum string, err error) {
	err = q.QueryRow(ctx, fmt.Sprintf(ChecksumSQL, table)).Scan(&count, &sum)
	if err != nil {
		return 0, "", fmt.Errorf("products: checksum of %s: %w", table, err)
	}
	return count, sum, nil
}
