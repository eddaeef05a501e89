package pgetl_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgetl/pgetl"
)

// ExampleBatchSession_Reject shows a job refusing rows its own parser cannot read:
// they go to the reject table in the transaction of their batch, with the reason
// and the raw fields, and count toward MaxRejects like rows the server refuses.
func ExampleBatchSession_Reject() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := pgetl.NewPool(ctx, exampleDSN())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS example_reject CASCADE; CREATE SCHEMA example_reject;
		CREATE TABLE example_reject.prices (sku text PRIMARY KEY, price numeric NOT NULL)`); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), "DROP SCHEMA example_reject CASCADE")

	s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "prices", CheckpointSchema: "example_reject"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close(ctx)
	b, err := s.Batch(ctx, pgetl.BatchConfig{Table: "example_reject.prices", Columns: []string{"sku", "price"}, MaxRejects: 10})
	if err != nil {
		fmt.Println(err)
		return
	}
	source := []string{"A-1;1.50", "A-2;1,75", "A-3;2.00", "A-4"}
	for i, line := range source {
		cursor := strconv.Itoa(i + 1)
		f := strings.Split(line, ";")
		if len(f) != 2 {
			err = b.Reject(ctx, cursor, "want 2 fields", line)
		} else if _, perr := strconv.ParseFloat(f[1], 64); perr != nil {
			err = b.Reject(ctx, cursor, "price: not a number", f[0], f[1])
		} else {
			err = b.Add(ctx, cursor, f[0], f[1])
		}
		if err != nil {
			fmt.Println(err)
			return
		}
	}
	if err := b.Close(ctx); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("loaded", s.Stat().Rows(), "rejected", s.Stat().Rejects())
	rows, _ := pool.Query(ctx, "SELECT cursor, message, row::text FROM example_reject.reject ORDER BY row_index")
	var cursor, msg, row string
	_, err = pgx.ForEachRow(rows, []any{&cursor, &msg, &row}, func() error {
		fmt.Println(cursor, msg, row)
		return nil
	})
	if err != nil {
		fmt.Println(err)
	}
	// Output:
	// loaded 2 rejected 2
	// 2 price: not a number {"sku": "A-2", "price": "1,75"}
	// 4 want 2 fields {"values": ["A-4"]}
}

// printTracer is a pgx.QueryTracer that prints pgetl's own exchanges.
type printTracer struct{ mu sync.Mutex }

func (t *printTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.HasPrefix(d.SQL, "-- pgetl ") {
		t.mu.Lock()
		fmt.Println(d.SQL)
		t.mu.Unlock()
	}
	return ctx
}

func (t *printTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// Example_queryTracer shows pgetl's batches in a pgx.QueryTracer set on the pool,
// as otelpgx or tracelog would see them: pgetl sends a batch as one message of its
// own, and reports it to the tracer with a comment describing it as its SQL.
func Example_queryTracer() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := pgetl.ParseConfig(exampleDSN())
	if err != nil {
		fmt.Println(err)
		return
	}
	cfg.ConnConfig.Tracer = &printTracer{}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS example_trace CASCADE; CREATE SCHEMA example_trace;
		CREATE TABLE example_trace.events (id bigint PRIMARY KEY)`); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), "DROP SCHEMA example_trace CASCADE")
	s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "events", CheckpointSchema: "example_trace"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close(ctx)
	b, err := s.Batch(ctx, pgetl.BatchConfig{Table: "example_trace.events", Columns: []string{"id"}, CommitRows: 3, InFlight: 1})
	if err != nil {
		fmt.Println(err)
		return
	}
	for i := 1; i <= 5; i++ {
		if err := b.Add(ctx, strconv.Itoa(i), int64(i)); err != nil {
			fmt.Println(err)
			return
		}
	}
	if err := b.Close(ctx); err != nil {
		fmt.Println(err)
	}
	// Output:
	// -- pgetl batch job="events" seq=1 attempt=1 rows=3 rejects=0
	// -- pgetl batch job="events" seq=2 attempt=1 rows=2 rejects=0
}
