package pgetl_test

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/pgetl/pgetl"
)

// ExampleBatchSession_Sweep keeps a table in sync with a source read in full: the
// second run sends only the changed row, and its sweep deletes the row the source
// lost.
func ExampleBatchSession_Sweep() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := pgetl.NewPool(ctx, exampleDSN())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS example_sync CASCADE; CREATE SCHEMA example_sync;
		CREATE TABLE example_sync.prices (sku text PRIMARY KEY, cents bigint NOT NULL)`); err != nil {
		fmt.Println(err)
		return
	}
	sync := func(source map[string]int64, skus ...string) error {
		// Restart: each sync reads the whole source again.
		s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "prices", CheckpointSchema: "example_sync", Restart: true})
		if err != nil {
			return err
		}
		defer s.Close(ctx)
		b, err := s.Batch(ctx, pgetl.BatchConfig{Table: "example_sync.prices", Columns: []string{"sku", "cents"},
			Key: []string{"sku"}, Sync: &pgetl.SyncConfig{MaxDeleteRatio: 0.5}})
		if err != nil {
			return err
		}
		for i, sku := range skus {
			if err := b.Add(ctx, strconv.Itoa(i+1), sku, source[sku]); err != nil {
				return err
			}
		}
		if _, err := b.Sweep(ctx); err != nil { // the whole source was read
			return err
		}
		if err := b.Close(ctx); err != nil {
			return err
		}
		st := s.Stat()
		fmt.Printf("%d new, %d updated, %d unchanged, %d deleted\n", st.Inserted(), st.Updated(), st.Unchanged(), st.Deleted())
		return s.Finish(ctx)
	}
	if err := sync(map[string]int64{"a": 100, "b": 200, "c": 300}, "a", "b", "c"); err != nil {
		fmt.Println(err)
		return
	}
	if err := sync(map[string]int64{"a": 100, "b": 250}, "a", "b"); err != nil { // b changed, c is gone
		fmt.Println(err)
		return
	}
	// Output:
	// 3 new, 0 updated, 0 unchanged, 0 deleted
	// 0 new, 1 updated, 1 unchanged, 1 deleted
}
