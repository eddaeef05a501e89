package workload

import (
	"bufio"
	"context"
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"io"
	"math/big"
	"math/bits"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

// OrdersCreateSQL creates the three tables of the orders workload in a schema; its
// %[1]s is the schema of the orders tables and %[2]s the products table, both quoted.
// The tables are created only if missing.
const OrdersCreateSQL = `CREATE TABLE IF NOT EXISTS %[1]s.customers (id bigserial primary key, email text unique not null, name text not null);
CREATE TABLE IF NOT EXISTS %[1]s.orders (order_id bigint primary key, customer_id bigint not null references %[1]s.customers(id), ordered_at timestamptz not null);
CREATE TABLE IF NOT EXISTS %[1]s.order_lines (order_id bigint not null references %[1]s.orders(order_id), line_no int not null, product_id bigint not null references %[2]s(id), qty int not null check (qty > 0), unit_price numeric(12,2) not null, primary key (order_id, line_no))`

// OrdersCSVHeader is the header line of [OrdersCSV], without its newline: the
// source columns.
const OrdersCSVHeader = "order_id,line_no,email,customer_name,sku,qty,unit_price,ordered_at"

// Orders defines the orders workload: N source lines over P products, every K-th
// line bad (K = 0: none). Source line i (1..N), [Orders.Line], is one order line
// of a star schema: customers (a dimension created by e-mail), orders (a header
// per order) and order_lines (the detail, whose product is looked up by SKU in the
// products table of [CreateTableSQL]):
//
//	order_id      (i-1)/4 + 1                  (integer division: 4 lines per order)
//	line_no       (i-1)%4 + 1
//	customer      c = (order_id*7919) % C + 1  with C = max(1, N/40)
//	email         "cust<c>@example.com"
//	customer_name "Customer <c>"
//	sku           fmt.Sprintf("SKU-%07d", (i*31) % P + 1)
//	qty           i%5 + 1, but 0 when K > 0 && i%K == 0 (a bad line, refused by the check)
//	unit_price    ((i*7) % 10000)/100 + 0.01   numeric(12,2), exact: ((i*7) % 10000 + 1) cents
//	ordered_at    2024-01-01T00:00:00Z + order_id minutes
type Orders struct {
	N        int64 // source lines
	Products int64 // P, the products the SKUs range over (at least 1)
	BadEvery int64 // K: line i is bad (qty 0) when K > 0 && i%K == 0
}

// Customers returns C = max(1, N/40), the number of customer numbers.
func (o Orders) Customers() int64 { return max(1, o.N/40) }

// OrderLine is one source line of the orders workload.
type OrderLine struct {
	I            int64 // the line's number, 1..N
	OrderID      int64
	LineNo       int32
	Customer     int64 // c
	Email        string
	CustomerName string
	Product      int64 // the product number: SKU is SKU(Product)
	SKU          string
	Qty          int32
	PriceCents   int64 // unit_price = PriceCents/100 exactly
	OrderedAt    time.Time
}

// OrderID returns the order of line i.
func OrderID(i int64) int64 { return (i-1)/4 + 1 }

// CustomerOf returns the customer number c of order orderID among c customers.
func CustomerOf(orderID, customers int64) int64 { return mod(orderID*7919, customers) + 1 }

// Email returns "cust<c>@example.com".
func Email(c int64) string {
	var b [40]byte
	n := append(b[:0], "cust"...)
	n = strconv.AppendInt(n, c, 10)
	return string(append(n, "@example.com"...))
}

// CustomerName returns "Customer <c>".
func CustomerName(c int64) string {
	var b [32]byte
	n := append(b[:0], "Customer "...)
	return string(strconv.AppendInt(n, c, 10))
}

// OrderedAt returns ordered_at of order orderID: Epoch + orderID minutes.
func OrderedAt(orderID int64) time.Time {
	return time.Unix(epochUnix+orderID*60, 0).UTC()
}

// Bad reports whether line i is a bad line (qty 0).
func (o Orders) Bad(i int64) bool { return o.BadEvery > 0 && i%o.BadEvery == 0 }

// Line returns source line i.
func (o Orders) Line(i int64) OrderLine {
	orderID := OrderID(i)
	c := CustomerOf(orderID, o.Customers())
	prod := mod(i*31, max(1, o.Products)) + 1
	qty := int32(i%5 + 1)
	if o.Bad(i) {
		qty = 0
	}
	return OrderLine{
		I: i, OrderID: orderID, LineNo: int32((i-1)%4 + 1),
		Customer: c, Email: Email(c), CustomerName: CustomerName(c),
		Product: prod, SKU: SKU(prod), Qty: qty,
		PriceCents: mod(i*7, 10_000) + 1,
		OrderedAt:  OrderedAt(orderID),
	}
}

// Price returns unit_price as a [pgtype.Numeric] (cents with exponent -2).
func (l OrderLine) Price() pgtype.Numeric {
	return pgtype.Numeric{Int: big.NewInt(l.PriceCents), Exp: -2, Valid: true}
}

// PriceString returns unit_price in PostgreSQL's text form for numeric(12,2).
func (l OrderLine) PriceString() string { return string(appendPrice(nil, l.PriceCents)) }

// OrdersCSV writes lines from..to (inclusive) of o to w as CSV with the header
// [OrdersCSVHeader]: unit_price as a decimal with two fraction digits, ordered_at in
// RFC 3339 UTC. No field needs quoting.
func OrdersCSV(w io.Writer, o Orders, from, to int64) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	if _, err := bw.WriteString(OrdersCSVHeader + "\n"); err != nil {
		return fmt.Errorf("workload: write csv: %w", err)
	}
	var line []byte
	for i := from; i <= to; i++ {
		line = AppendOrderCSV(line[:0], o.Line(i))
		if _, err := bw.Write(line); err != nil {
			return fmt.Errorf("workload: write csv: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("workload: write csv: %w", err)
	}
	return nil
}

// AppendOrderCSV appends l as one record of [OrdersCSV], newline included, to b.
func AppendOrderCSV(b []byte, l OrderLine) []byte {
	b = strconv.AppendInt(b, l.OrderID, 10)
	b = append(b, ',')
	b = strconv.AppendInt(b, int64(l.LineNo), 10)
	b = append(b, ',')
	b = append(b, l.Email...)
	b = append(b, ',')
	b = append(b, l.CustomerName...)
	b = append(b, ',')
	b = append(b, l.SKU...)
	b = append(b, ',')
	b = strconv.AppendInt(b, int64(l.Qty), 10)
	b = append(b, ',')
	b = appendPrice(b, l.PriceCents)
	b = append(b, ',')
	b = l.OrderedAt.UTC().AppendFormat(b, time.RFC3339)
	return append(b, '\n')
}

// FieldError is a field of an orders CSV record that does not parse.
type FieldError struct {
	Column string // the source column, one of OrdersCSVHeader's
	Raw    string // the field as read
	Reason string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("%s %q: %s", e.Column, e.Raw, e.Reason)
}

// ParseOrderCSV parses the fields of one record of [OrdersCSV] (no header). Line
// numbers that the record does not carry (I, Customer, Product) are left 0. A
// field that does not parse is a *FieldError naming its column.
func ParseOrderCSV(fields []string) (OrderLine, error) {
	var l OrderLine
	if len(fields) != 8 {
		return l, &FieldError{Column: "record", Raw: strings.Join(fields, ","),
			Reason: fmt.Sprintf("%d fields, want 8 (%s)", len(fields), OrdersCSVHeader)}
	}
	bad := func(col int, reason string) error {
		return &FieldError{Column: strings.Split(OrdersCSVHeader, ",")[col], Raw: fields[col], Reason: reason}
	}
	var err error
	if l.OrderID, err = strconv.ParseInt(fields[0], 10, 64); err != nil {
		return l, bad(0, "not a 64-bit integer")
	}
	n, err := strconv.ParseInt(fields[1], 10, 32)
	if err != nil {
		return l, bad(1, "not a 32-bit integer")
	}
	l.LineNo = int32(n)
	if l.Email = fields[2]; l.Email == "" {
		return l, bad(2, "empty")
	}
	l.CustomerName = fields[3]
	if l.SKU = fields[4]; l.SKU == "" {
		return l, bad(4, "empty")
	}
	if n, err = strconv.ParseInt(fields[5], 10, 32); err != nil {
		return l, bad(5, "not a 32-bit integer")
	}
	l.Qty = int32(n)
	units, frac, ok := strings.Cut(fields[6], ".")
	if !ok {
		frac = "00"
	}
	u, err1 := strconv.ParseUint(units, 10, 40)
	c, err2 := strconv.ParseUint(frac, 10, 7)
	if err1 != nil || err2 != nil || len(frac) != 2 {
		return l, bad(6, "not a decimal with two fraction digits")
	}
	l.PriceCents = int64(u)*100 + int64(c)
	if l.OrderedAt, err = ParseTimestamp(fields[7]); err != nil {
		return l, bad(7, "not an RFC 3339 or PostgreSQL timestamp (2024-01-01T00:01:00Z, 2024-01-01 00:01:00+00)")
	}
	l.OrderedAt = l.OrderedAt.UTC()
	return l, nil
}

// TableSum is a table's count and order-independent sum, as [Sum] and the
// checksum SQL of this package compute them.
type TableSum struct {
	Count int64
	Sum   string
}

func (c TableSum) String() string { return fmt.Sprintf("%d rows, sum %s", c.Count, c.Sum) }

// OrdersChecksums are the checksums of the three tables of the orders workload.
type OrdersChecksums struct {
	Customers, Orders, Lines TableSum
}

// Customers: email|name. Orders: order_id|email of its customer|ordered_at as Unix
// seconds. Lines: order_id|line_no|sku of its product|qty|unit_price.
const (
	// CustomersChecksumSQL's %[1]s is the customers table.
	CustomersChecksumSQL = `SELECT count(*), coalesce(sum(('x' || substr(md5(email || '|' || name), 1, 16))::bit(64)::bigint), 0)::text FROM %[1]s`
	// OrdersChecksumSQL's %[1]s is the orders table, %[2]s the customers table.
	OrdersChecksumSQL = `SELECT count(*), coalesce(sum(('x' || substr(md5(o.order_id::text || '|' || c.email || '|' ||
	extract(epoch FROM o.ordered_at)::bigint::text), 1, 16))::bit(64)::bigint), 0)::text
FROM %[1]s o JOIN %[2]s c ON c.id = o.customer_id`
	// LinesChecksumSQL's %[1]s is the order_lines table, %[2]s the products table.
	LinesChecksumSQL = `SELECT count(*), coalesce(sum(('x' || substr(md5(l.order_id::text || '|' || l.line_no::text || '|' ||
	p.sku || '|' || l.qty::text || '|' || l.unit_price::text), 1, 16))::bit(64)::bigint), 0)::text
FROM %[1]s l JOIN %[2]s p ON p.id = l.product_id`
)

// AddText adds a row given by its text form to the set: [Sum.Add] is AddText of
// [Product.Text].
func (s *Sum) AddText(text []byte) {
	h := md5.Sum(text)
	t := int64(binary.BigEndian.Uint64(h[:8]))
	var carry uint64
	s.lo, carry = bits.Add64(s.lo, uint64(t), 0)
	s.hi += t>>63 + int64(carry)
	s.count++
}

func (s *Sum) checksum() TableSum { return TableSum{Count: s.Count(), Sum: s.String()} }

// Checksums returns the checksums of the tables loaded from lines 1..o.N: every
// customer of an order once, every order once (also one whose lines were all
// rejected), and every line that is not bad and not in skip (lines rejected for
// another reason, such as an unknown SKU; nil for none).
func (o Orders) Checksums(skip func(i int64) bool) OrdersChecksums {
	var s OrdersSum
	for i := int64(1); i <= o.N; i++ {
		s.Add(o.Line(i), !o.Bad(i) && (skip == nil || !skip(i)))
	}
	return s.Checksums()
}

// OrdersSum accumulates the checksums of the tables loaded from any order lines
// (such as a file's), in the form of [QueryOrdersChecksums]. The zero value is
// empty.
type OrdersSum struct {
	cust, ord, lines Sum
	customers        map[string]bool
	orders           map[int64]bool
	b                []byte
}

// Add adds line l: its customer and its order, if new, and the line itself if
// loaded (not rejected).
func (s *OrdersSum) Add(l OrderLine, loaded bool) {
	if s.customers == nil {
		s.customers, s.orders = make(map[string]bool), make(map[int64]bool)
	}
	b := s.b[:0]
	if !s.customers[l.Email] {
		s.customers[l.Email] = true
		b = append(append(append(b[:0], l.Email...), '|'), l.CustomerName...)
		s.cust.AddText(b)
	}
	if !s.orders[l.OrderID] {
		s.orders[l.OrderID] = true
		b = strconv.AppendInt(b[:0], l.OrderID, 10)
		b = append(append(append(b, '|'), l.Email...), '|')
		b = strconv.AppendInt(b, l.OrderedAt.Unix(), 10)
		s.ord.AddText(b)
	}
	if loaded {
		b = strconv.AppendInt(b[:0], l.OrderID, 10)
		b = append(b, '|')
		b = strconv.AppendInt(b, int64(l.LineNo), 10)
		b = append(append(append(b, '|'), l.SKU...), '|')
		b = strconv.AppendInt(b, int64(l.Qty), 10)
		b = append(b, '|')
		b = appendPrice(b, l.PriceCents)
		s.lines.AddText(b)
	}
	s.b = b
}

// Checksums returns the checksums of the lines added.
func (s *OrdersSum) Checksums() OrdersChecksums {
	return OrdersChecksums{Customers: s.cust.checksum(), Orders: s.ord.checksum(), Lines: s.lines.checksum()}
}

// QueryOrdersChecksums computes the checksums of the tables of schema (quoted)
// through q, with the products table products (quoted).
func QueryOrdersChecksums(ctx context.Context, q Queryer, schema, products string) (OrdersChecksums, error) {
	var c OrdersChecksums
	for _, x := range []struct {
		dst *TableSum
		sql string
	}{
		{&c.Customers, fmt.Sprintf(CustomersChecksumSQL, schema+".customers")},
		{&c.Orders, fmt.Sprintf(OrdersChecksumSQL, schema+".orders", schema+".customers")},
		{&c.Lines, fmt.Sprintf(LinesChecksumSQL, schema+".order_lines", products)},
	} {
		if err := q.QueryRow(ctx, x.sql).Scan(&x.dst.Count, &x.dst.Sum); err != nil {
			return c, fmt.Errorf("workload: orders checksum: %w", err)
		}
	}
	return c, nil
}
