// Package workload generates the fixed products workload shared by pgetl's
// benchmarks, tests and example job, so that every run loads the same rows and a
// table's content can be compared with the generator exactly.
//
// # Rows
//
// Row i (1..N) at version v of the products table is:
//
//	sku        fmt.Sprintf("SKU-%07d", i)
//	name       "Product <i> v<v>"
//	price      ((i*7919 + v*1013) mod 10^7) / 100     numeric(12,2), exact
//	inventory  (i*31 + v) mod 10000
//	updated_at 2024-01-01T00:00:00Z + (i + v*10^6) seconds
//
// A new version of a row keeps its sku (the key) and changes every other column, so
// version 2 of rows already loaded at version 1 is the update half of an upsert.
//
// # Checksums
//
// [Sum] folds rows into an order-independent checksum: the count of rows and the sum,
// as a decimal string, of the first 8 bytes (big-endian, signed) of the MD5 of each
// row's text form (see [Product.Text]). [ChecksumSQL] computes the same pair from a
// table in one scan, with no sort and constant memory, so tests compare a table with
// the generator exactly with [QueryChecksum].
package workload

import (
	"context"
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"math/big"
	"math/bits"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// Table is the conventional name of the products table.
const Table = "products"

// Columns are the columns a load writes, in the order of [Product.Values]; id is
// left to its bigserial default.
var Columns = []string{"sku", "name", "price", "inventory", "updated_at"}

// CreateTableSQL creates the products table; its %s is the table's name, quoted and
// qualified as needed (for example with [pgx.Identifier.Sanitize]).
const CreateTableSQL = `CREATE TABLE %s (
	id bigserial PRIMARY KEY,
	sku text UNIQUE NOT NULL,
	name text NOT NULL,
	price numeric(12,2) NOT NULL,
	inventory int NOT NULL,
	updated_at timestamptz NOT NULL
)`

// CreateTableNoAutovacuumSQL is [CreateTableSQL] with autovacuum off on the table
// and its TOAST table, so that benchmarks do not compete with autovacuum for the
// server they measure. Its %s is the table's name.
const CreateTableNoAutovacuumSQL = CreateTableSQL + ` WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)`

// CreateSQL returns the CREATE TABLE statement for the products table named table
// (already quoted), with autovacuum on or off.
func CreateSQL(table string, autovacuum bool) string {
	if autovacuum {
		return fmt.Sprintf(CreateTableSQL, table)
	}
	return fmt.Sprintf(CreateTableNoAutovacuumSQL, table)
}

// CreateIfMissingSQL is [CreateTableSQL] with IF NOT EXISTS, for table (already
// quoted): for a job that may run again on a table it loaded before.
func CreateIfMissingSQL(table string) string {
	return "CREATE TABLE IF NOT EXISTS " + fmt.Sprintf(CreateTableSQL[len("CREATE TABLE "):], table)
}

// ChecksumSQL computes (count bigint, sum text) of a products table in the form of
// [Sum]; its %s is the table's name. An empty table gives (0, "0").
const ChecksumSQL = `SELECT count(*), coalesce(sum(('x' || substr(md5(
	sku || '|' || name || '|' || price::text || '|' || inventory::text || '|' ||
	extract(epoch FROM updated_at)::bigint::text), 1, 16))::bit(64)::bigint), 0)::text
FROM %s`

// Epoch is updated_at of row 0 at version 0: 2024-01-01T00:00:00Z.
var Epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// epochUnix is Epoch in Unix seconds.
const epochUnix = 1704067200

// Product is one row of the products workload.
type Product struct {
	// I is the row's number, 1..N; it determines SKU.
	I int64
	// V is the row's version.
	V int64
	// SKU is the row's unique key, "SKU-%07d" of I.
	SKU string
	// Name is "Product <I> v<V>".
	Name string
	// PriceCents is the price in cents: price = PriceCents/100 exactly.
	PriceCents int64
	// Inventory is (I*31 + V) mod 10000.
	Inventory int32
	// UpdatedAt is Epoch + (I + V*10^6) seconds, in UTC.
	UpdatedAt time.Time
}

// SKU returns the key of row i: fmt.Sprintf("SKU-%07d", i).
func SKU(i int64) string {
	if i >= 0 && i < 10_000_000 {
		var b [11]byte
		copy(b[:], "SKU-0000000")
		for j, n := len(b)-1, i; n > 0; j, n = j-1, n/10 {
			b[j] = byte('0' + n%10)
		}
		return string(b[:])
	}
	return fmt.Sprintf("SKU-%07d", i)
}

// name returns "Product <i> v<v>" with one allocation.
func name(i, v int64) string {
	var b [48]byte
	n := append(b[:0], "Product "...)
	n = strconv.AppendInt(n, i, 10)
	n = append(n, " v"...)
	n = strconv.AppendInt(n, v, 10)
	return string(n)
}

// PriceCents returns the price of row i at version v in cents.
func PriceCents(i, v int64) int64 { return mod(i*7919+v*1013, 10_000_000) }

// Inventory returns the inventory of row i at version v.
func Inventory(i, v int64) int32 { return int32(mod(i*31+v, 10_000)) }

// UpdatedAtUnix returns updated_at of row i at version v in Unix seconds.
func UpdatedAtUnix(i, v int64) int64 { return epochUnix + i + v*1_000_000 }

// mod is the non-negative remainder of a by m.
func mod(a, m int64) int64 {
	r := a % m
	if r < 0 {
		r += m
	}
	return r
}

// Row returns row i at version v.
func Row(i, v int64) Product {
	return Product{
		I:          i,
		V:          v,
		SKU:        SKU(i),
		Name:       name(i, v),
		PriceCents: PriceCents(i, v),
		Inventory:  Inventory(i, v),
		UpdatedAt:  time.Unix(UpdatedAtUnix(i, v), 0).UTC(),
	}
}

// PriceNumeric returns the price as a [pgtype.Numeric] (cents with exponent -2),
// which pgx encodes in binary for CopyFrom and queries alike.
func (p Product) PriceNumeric() pgtype.Numeric {
	return pgtype.Numeric{Int: big.NewInt(p.PriceCents), Exp: -2, Valid: true}
}

// PriceString returns the price in PostgreSQL's text form for numeric(12,2), such
// as "12345.67" or "0.05".
func (p Product) PriceString() string { return string(appendPrice(nil, p.PriceCents)) }

// appendPrice appends cents as a decimal with two fraction digits.
func appendPrice(b []byte, cents int64) []byte {
	if cents < 0 {
		b = append(b, '-')
		cents = -cents
	}
	b = strconv.AppendInt(b, cents/100, 10)
	b = append(b, '.', byte('0'+cents%100/10), byte('0'+cents%10))
	return b
}

// Values returns the row's values in the order of [Columns], typed for pgx (price
// as a [pgtype.Numeric]), ready for CopyFrom or a parameterized INSERT.
func (p Product) Values() []any {
	return p.AppendValues(make([]any, 0, len(Columns)))
}

// AppendValues appends the row's values in the order of [Columns] to dst and
// returns the extended slice, so a loop can reuse one slice.
func (p Product) AppendValues(dst []any) []any {
	return append(dst, p.SKU, p.Name, p.PriceNumeric(), p.Inventory, p.UpdatedAt)
}

// Text returns the row's text form hashed by [Sum] and [ChecksumSQL]:
// sku|name|price|inventory|updated_at as Unix seconds, for example
// "SKU-0000001|Product 1 v1|89.32|32|1705067201".
func (p Product) Text() string { return string(p.appendText(nil)) }

func (p Product) appendText(b []byte) []byte {
	b = append(b, p.SKU...)
	b = append(b, '|')
	b = append(b, p.Name...)
	b = append(b, '|')
	b = appendPrice(b, p.PriceCents)
	b = append(b, '|')
	b = strconv.AppendInt(b, int64(p.Inventory), 10)
	b = append(b, '|')
	b = strconv.AppendInt(b, p.UpdatedAt.Unix(), 10)
	return b
}

// Sum accumulates the checksum of a set of rows in the form of [ChecksumSQL]. The
// zero value is an empty set. The result does not depend on the order of Add calls.
type Sum struct {
	count int64
	hi    int64  // high word of the 128-bit two's complement sum
	lo    uint64 // low word
	buf   []byte // Add's scratch space
}

// Add adds p to the set.
func (s *Sum) Add(p Product) {
	s.buf = p.appendText(s.buf[:0])
	h := md5.Sum(s.buf)
	t := int64(binary.BigEndian.Uint64(h[:8]))
	var carry uint64
	s.lo, carry = bits.Add64(s.lo, uint64(t), 0)
	s.hi += t>>63 + int64(carry) // t>>63 sign-extends t to 128 bits
	s.count++
}

// Count returns the number of rows added.
func (s *Sum) Count() int64 { return s.count }

// String returns the sum in decimal, as [ChecksumSQL] renders it.
func (s *Sum) String() string {
	var v, lo big.Int
	v.Lsh(big.NewInt(s.hi), 64)
	v.Add(&v, lo.SetUint64(s.lo))
	return v.String()
}

// Checksum returns the checksum of rows 1..n at version v, as [ChecksumSQL] computes
// it from a table holding exactly those rows.
func Checksum(n, v int64) (count int64, sum string) {
	var s Sum
	for i := int64(1); i <= n; i++ {
		s.Add(Row(i, v))
	}
	return s.Count(), s.String()
}

// Queryer is what [QueryChecksum] needs: a *pgx.Conn, *pgxpool.Pool or pgx.Tx.
type Queryer interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// QueryChecksum returns [ChecksumSQL] of table (already quoted) through q.
func QueryChecksum(ctx context.Context, q Queryer, table string) (count int64, sum string, err error) {
	err = q.QueryRow(ctx, fmt.Sprintf(ChecksumSQL, table)).Scan(&count, &sum)
	if err != nil {
		return 0, "", fmt.Errorf("workload: checksum of %s: %w", table, err)
	}
	return count, sum, nil
}

// Source is a [pgx.CopyFromSource] of rows from..to (inclusive) at one version. Its
// Values reuses one slice between rows, which CopyFrom allows because it encodes
// each row before asking for the next.
type Source struct {
	i, to, v int64
	vals     []any
}

// NewSource returns a source of rows from..to (inclusive) at version v.
func NewSource(from, to, v int64) *Source {
	return &Source{i: from - 1, to: to, v: v, vals: make([]any, 0, len(Columns))}
}

// Next advances to the next row and reports whether there is one.
func (s *Source) Next() bool {
	if s.i >= s.to {
		return false
	}
	s.i++
	return true
}

// Values returns the current row's values in the order of [Columns].
func (s *Source) Values() ([]any, error) {
	s.vals = Row(s.i, s.v).AppendValues(s.vals[:0])
	return s.vals, nil
}

// Err returns nil: generating rows cannot fail.
func (s *Source) Err() error { return nil }

// EnvBenchSmall names the environment variable that, set to 1, asks benchmarks for
// reduced sizes (make bench-ci runs them once each to check that they work).
const EnvBenchSmall = "PGETL_BENCH_SMALL"

// Small reports whether PGETL_BENCH_SMALL=1.
func Small() bool { return os.Getenv(EnvBenchSmall) == "1" }

// N returns full, or small when [Small] reports true: the row count a benchmark
// should load.
func N(full, small int) int {
	if Small() {
		return small
	}
	return full
}
