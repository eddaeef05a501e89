package pgetl_test

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgetl/pgetl"
)

// ExampleIdleInTransaction finds a session left idle in transaction (here one the
// example opens itself: BEGIN; SELECT 1; and nothing more) and ends it, as
// `go run ./cmd/pgetl doctor -terminate` does for an operator.
func ExampleIdleInTransaction() {
	connString := exampleDSN()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgetl.NewPool(ctx, connString)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()

	// The forgotten transaction.
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "BEGIN; SELECT 1"); err != nil {
		fmt.Println(err)
		return
	}

	backends, err := pgetl.IdleInTransaction(ctx, pool, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	var mine []pgetl.Backend
	for _, b := range backends {
		if b.PID == int32(conn.PgConn().PID()) {
			mine = append(mine, b)
			fmt.Printf("found: %s, last query %q\n", b.State, b.Query)
		}
	}
	ended, err := pgetl.TerminateBackends(ctx, pool, mine)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("terminated:", len(ended))
	// Output:
	// found: idle in transaction, last query "BEGIN; SELECT 1"
	// terminated: 1
}
