package products

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/contrib/river/internal/dbtest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// TestRowText pins row 1 to the text the core module's workload test pins.
func TestRowText(t *testing.T) {
	if got := string(text(nil, 1, 1)); got != "SKU-0000001|Product 1 v1|89.32|32|1705067201" {
		t.Fatalf("row 1 v1 = %q", got)
	}
}

// TestGeneratorMatchesFormulas checks the Go generator against the documented
// formulas evaluated by the server: a table filled by generate_series with the
// formulas has the generator's checksum, and so does one loaded with AppendRow.
func TestGeneratorMatchesFormulas(t *testing.T) {
	db := dbtest.New(t)
	ctx := context.Background()
	const n, v = 5000, 3
	for _, tbl := range []string{"by_sql", "by_go"} {
		if _, err := db.Pool.Exec(ctx, CreateSQL(db.Ident(tbl))); err != nil {
			t.Fatal(err)
		}
	}
	_, err := db.Pool.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (sku, name, price, inventory, updated_at)
		SELECT 'SKU-' || lpad(i::text, 7, '0'), 'Product ' || i || ' v' || %[2]d,
			((i * 7919 + %[2]d * 1013) %% 10000000) / 100.0, (i * 31 + %[2]d) %% 10000,
			to_timestamp(1704067200 + i + %[2]d * 1000000)
		FROM generate_series(1, %d) i`, db.Ident("by_sql"), v, n))
	if err != nil {
		t.Fatal(err)
	}
	rows := make([][]any, 0, n)
	for i := int64(1); i <= n; i++ {
		rows = append(rows, AppendRow(nil, i, v))
	}
	if _, err := db.Pool.CopyFrom(ctx, []string{db.Schema, "by_go"}, Columns, pgxRows(rows)); err != nil {
		t.Fatal(err)
	}
	wantN, wantSum := Checksum(n, v)
	for _, tbl := range []string{"by_sql", "by_go"} {
		gotN, gotSum, err := QueryChecksum(ctx, db.Pool, db.Ident(tbl))
		if err != nil {
			t.Fatal(err)
		}
		if gotN != wantN || gotSum != wantSum {
			t.Errorf("%s: %d rows, checksum %s; generator: %d, %s", tbl, gotN, gotSum, wantN, wantSum)
		}
	}
	if _, other := Checksum(n, v+1); other == wantSum {
		t.Fatal("checksums of two versions are equal")
	}
}

func pgxRows(rows [][]any) pgx.CopyFromSource { return pgx.CopyFromRows(rows) }
