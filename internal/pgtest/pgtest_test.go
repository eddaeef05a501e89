package pgtest

import (
	"context"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

func TestNewIsolatesSchema(t *testing.T) {
	db := New(t)
	db.Exec(t, "CREATE TABLE x (id int)")
	var schema string
	if err := db.Pool.QueryRow(context.Background(), "SELECT table_schema FROM information_schema.tables WHERE table_name='x' AND table_schema=current_schema()").Scan(&schema); err != nil {
		t.Fatal(err)
	}
	if schema != db.Schema {
		t.Fatalf("table in %q, want %q", schema, db.Schema)
	}
}
