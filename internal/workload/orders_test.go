package workload

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// TestOrdersLine checks the generator against the formulas, written out
// once more with fmt and floats.
func TestOrdersLine(t *testing.T) {
	t.Parallel()
	for _, o := range []Orders{{N: 1000, Products: 100, BadEvery: 7}, {N: 39, Products: 1}, {N: 1_000_000, Products: 10_000, BadEvery: 0}} {
		C := max(1, o.N/40)
		require.Equal(t, C, o.Customers())
		for _, i := range []int64{1, 2, 3, 4, 5, 7, 14, 99, 100, 1428, 9999, o.N} {
			l := o.Line(i)
			orderID := (i-1)/4 + 1
			c := (orderID*7919)%C + 1
			qty := int32(i%5 + 1)
			if o.BadEvery > 0 && i%o.BadEvery == 0 {
				qty = 0
			}
			require.Equal(t, OrderLine{
				I: i, OrderID: orderID, LineNo: int32((i-1)%4 + 1), Customer: c,
				Email: fmt.Sprintf("cust%d@example.com", c), CustomerName: fmt.Sprintf("Customer %d", c),
				Product: (i*31)%o.Products + 1, SKU: fmt.Sprintf("SKU-%07d", (i*31)%o.Products+1), Qty: qty,
				PriceCents: (i*7)%10000 + 1,
				OrderedAt:  time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(orderID) * time.Minute),
			}, l, "line %d of %+v", i, o)
			want := float64((i*7)%10000)/100 + 0.01
			got, err := strconv.ParseFloat(l.PriceString(), 64)
			require.NoError(t, err)
			require.InDelta(t, want, got, 1e-9)
		}
	}
	require.Equal(t, "0.01", Orders{N: 1}.Line(10000).PriceString(), "(i*7)%10000 = 0")
	require.Equal(t, "100.00", Orders{N: 1}.Line(2857).PriceString(), "(i*7)%10000 = 9999")
}

func TestOrdersCSV(t *testing.T) {
	t.Parallel()
	o := Orders{N: 100, Products: 50, BadEvery: 3}
	var buf bytes.Buffer
	require.NoError(t, OrdersCSV(&buf, o, 1, 5))
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	require.Equal(t, []string{
		OrdersCSVHeader,
		"1,1,cust2@example.com,Customer 2,SKU-0000032,2,0.08,2024-01-01T00:01:00Z",
		"1,2,cust2@example.com,Customer 2,SKU-0000013,3,0.15,2024-01-01T00:01:00Z",
		"1,3,cust2@example.com,Customer 2,SKU-0000044,0,0.22,2024-01-01T00:01:00Z",
		"1,4,cust2@example.com,Customer 2,SKU-0000025,5,0.29,2024-01-01T00:01:00Z",
		"2,1,cust1@example.com,Customer 1,SKU-0000006,1,0.36,2024-01-01T00:02:00Z",
	}, lines)
	for i, line := range lines[1:] {
		l, err := ParseOrderCSV(strings.Split(line, ","))
		require.NoError(t, err)
		want := o.Line(int64(i + 1))
		want.I, want.Customer, want.Product = 0, 0, 0
		require.Equal(t, want, l)
	}
	var fe *FieldError
	_, err := ParseOrderCSV([]string{"1", "1", "a@b", "A", "SKU-1", "x", "1.00", "2024-01-01T00:00:00Z"})
	require.ErrorAs(t, err, &fe)
	require.Equal(t, "qty", fe.Column)
	_, err = ParseOrderCSV([]string{"1", "1", "a@b", "A", "SKU-1", "1", "1.5", "2024-01-01T00:00:00Z"})
	require.ErrorAs(t, err, &fe)
	require.Equal(t, "unit_price", fe.Column)
	_, err = ParseOrderCSV([]string{"1"})
	require.ErrorContains(t, err, "1 fields, want 8")
}

// TestOrdersChecksumsMatchDatabase loads the workload with plain SQL (the set-based
// load, from the CSV) and compares the tables with the generator's checksums.
func TestOrdersChecksumsMatchDatabase(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.New(t)
	o := Orders{N: 4001, Products: 300, BadEvery: 13}
	products := db.Ident("products")
	schema := pgx.Identifier{db.Schema}.Sanitize()
	db.Exec(t, CreateSQL(products, true))
	_, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "products"}, Columns, NewSource(1, o.Products, 1))
	require.NoError(t, err)
	db.Exec(t, fmt.Sprintf(OrdersCreateSQL, schema, products))

	empty, err := QueryOrdersChecksums(ctx, db.Pool, schema, products)
	require.NoError(t, err)
	require.Equal(t, OrdersChecksums{Customers: TableSum{0, "0"}, Orders: TableSum{0, "0"}, Lines: TableSum{0, "0"}}, empty)

	var buf bytes.Buffer
	require.NoError(t, OrdersCSV(&buf, o, 1, o.N))
	conn, err := db.Pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(ctx, `CREATE TEMP TABLE raw (order_id bigint, line_no int, email text, customer_name text, sku text, qty int, unit_price numeric(12,2), ordered_at timestamptz)`)
	require.NoError(t, err)
	_, err = conn.Conn().PgConn().CopyFrom(ctx, &buf, "COPY raw FROM STDIN (FORMAT csv, HEADER)")
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `INSERT INTO customers (email, name) SELECT DISTINCT email, customer_name FROM raw;
		INSERT INTO orders SELECT DISTINCT r.order_id, c.id, r.ordered_at FROM raw r JOIN customers c USING (email);
		INSERT INTO order_lines SELECT r.order_id, r.line_no, p.id, r.qty, r.unit_price FROM raw r JOIN products p USING (sku)
			WHERE r.qty > 0 AND r.sku <> 'SKU-0000007'`)
	require.NoError(t, err)
	got, err := QueryOrdersChecksums(ctx, db.Pool, schema, products)
	require.NoError(t, err)
	require.Equal(t, o.Checksums(func(i int64) bool { return o.Line(i).SKU == "SKU-0000007" }), got)
	require.NotEqual(t, o.Checksums(nil).Lines, got.Lines)
	require.Equal(t, o.Customers(), got.Customers.Count)
	require.Equal(t, (o.N+3)/4, got.Orders.Count)
}
