package pgetl_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl"
)

// exampleDSN is where the examples connect: DATABASE_URL, else
// PGETL_TEST_DATABASE_URL, else libpq's defaults.
func exampleDSN() string {
	if s := os.Getenv("DATABASE_URL"); s != "" {
		return s
	}
	return os.Getenv("PGETL_TEST_DATABASE_URL")
}

// Example shows the main flow: a job loads rows from a slow source through a
// BatchSession. Each batch is committed with its checkpoint in one short
// transaction; between batches the job holds no connection and no transaction. Run
// again, the job resumes after the last committed cursor.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := pgetl.NewPool(ctx, exampleDSN())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS example_main CASCADE; CREATE SCHEMA example_main;
		CREATE TABLE example_main.events (id bigint PRIMARY KEY, payload text NOT NULL)`); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), "DROP SCHEMA example_main CASCADE")

	run := func(upTo int) error {
		s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "events", CheckpointSchema: "example_main"})
		if err != nil {
			return err
		}
		defer s.Close(ctx)
		cp, err := s.Checkpoint(ctx)
		if err != nil {
			return err
		}
		start := 1
		if cp.Cursor != "" {
			last, _ := strconv.Atoi(cp.Cursor)
			start = last + 1
		}
		fmt.Println("resuming at", start)
		b, err := s.Batch(ctx, pgetl.BatchConfig{Table: "example_main.events", Columns: []string{"id", "payload"}, CommitRows: 100})
		if err != nil {
			return err
		}
		for i := start; i <= upTo; i++ {
			// The cursor is the row's position in the source.
			if err := b.Add(ctx, strconv.Itoa(i), int64(i), fmt.Sprintf("event %d", i)); err != nil {
				return err
			}
		}
		return b.Close(ctx) // the final flush
	}
	if err := run(250); err != nil {
		fmt.Println(err)
		return
	}
	if err := run(1000); err != nil {
		fmt.Println(err)
		return
	}
	var n int
	_ = pool.QueryRow(ctx, "SELECT count(*) FROM example_main.events").Scan(&n)
	fmt.Println("rows:", n)
	// Output:
	// resuming at 1
	// resuming at 251
	// rows: 1000
}

// ExampleBatchSession_Add shows a bad row under the default policy: the rows before
// it are committed, and the error names the row, its cursor, the column and the
// SQLSTATE.
func ExampleBatchSession_Add() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := pgetl.NewPool(ctx, exampleDSN())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS example_add CASCADE; CREATE SCHEMA example_add;
		CREATE TABLE example_add.prices (sku text PRIMARY KEY, cents int NOT NULL CHECK (cents >= 0))`); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), "DROP SCHEMA example_add CASCADE")
	s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "prices", CheckpointSchema: "example_add"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close(ctx)
	b, err := s.Batch(ctx, pgetl.BatchConfig{Table: "example_add.prices", Columns: []string{"sku", "cents"}})
	if err != nil {
		fmt.Println(err)
		return
	}
	for i, cents := range []int32{100, 250, -5, 300} {
		if err := b.Add(ctx, fmt.Sprintf("line %d", i+1), fmt.Sprintf("SKU-%d", i+1), cents); err != nil {
			break
		}
	}
	err = b.Close(ctx)
	var berr *pgetl.BatchError
	if errors.As(err, &berr) {
		fmt.Println("row:", berr.Row, "cursor:", berr.Cursor, "sqlstate:", berr.SQLState, "committed before it:", berr.Committed)
	}
	cp, _ := s.Checkpoint(ctx)
	fmt.Println("checkpoint:", cp.Cursor, "rows:", cp.Rows)
	// Output:
	// row: 2 cursor: line 3 sqlstate: 23514 committed before it: true
	// checkpoint: line 2 rows: 2
}

// ExampleSession_Tx runs custom work in a guarded, retried transaction: after a
// transient failure fn runs again on a fresh connection.
func ExampleSession_Tx() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := pgetl.NewPool(ctx, exampleDSN())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS example_tx CASCADE; CREATE SCHEMA example_tx;
		CREATE TABLE example_tx.runs (job text PRIMARY KEY, runs int NOT NULL)`); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), "DROP SCHEMA example_tx CASCADE")
	s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "tx", CheckpointSchema: "example_tx"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close(ctx)
	for range 3 {
		err := s.Tx(ctx, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `INSERT INTO example_tx.runs VALUES ('tx', 1)
				ON CONFLICT (job) DO UPDATE SET runs = runs.runs + 1`)
			return err
		})
		if err != nil {
			fmt.Println(err)
			return
		}
	}
	var runs int
	_ = pool.QueryRow(ctx, "SELECT runs FROM example_tx.runs").Scan(&runs)
	fmt.Println("runs:", runs, "tx units:", s.Stat().Txs(), "batches:", s.Stat().Batches())
	// Output:
	// runs: 3 tx units: 3 batches: 0
}
