package pgetl_test

import (
	"fmt"

	"github.com/pgetl/pgetl"
)

// ExampleCache shows the lookups a job makes between commits. In a real job the cache
// is filled with Preload (from a pool, page by page) and GetOrCreate (inside
// Session.Tx, published after the commit); Put is for values known to be committed.
func ExampleCache() {
	products, err := pgetl.NewCache[string, int64](pgetl.CacheConfig{MaxBytes: 64 << 20})
	if err != nil {
		panic(err)
	}
	// In a job:
	//	err := products.Preload(ctx, pool, pgetl.Lookup{Table: "products", Key: "sku", Value: "id"})
	//	err = session.Tx(ctx, func(tx pgx.Tx) error {
	//		ids, err := products.GetOrCreate(ctx, tx, src, skus) // one round trip for the misses
	//		…
	//	})
	products.Put("SKU-0000001", 101)
	products.Put("SKU-0000002", 102)

	if id, ok := products.Get("SKU-0000002"); ok {
		fmt.Println("SKU-0000002 →", id)
	}
	if _, ok := products.Get("SKU-0000003"); !ok {
		fmt.Println("SKU-0000003 is not cached: ask the database")
	}
	products.Invalidate("SKU-0000001") // changed elsewhere
	st := products.Stat()
	fmt.Printf("len=%d hits=%d misses=%d rejected=%d\n", st.Len(), st.Hits(), st.Misses(), st.Rejected())
	// Output:
	// SKU-0000002 → 102
	// SKU-0000003 is not cached: ask the database
	// len=1 hits=1 misses=1 rejected=0
}
