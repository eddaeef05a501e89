package pgetl

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/stretchr/testify/require"
)

// TestSyncUpdateByCtid runs a sync with a single-column Key (the key-cache path,
// whose changed rows are updated at the ctid the preload found, if the row there
// still holds the key) where keys come back in later batches: a changed row whose
// ctid is stale (updated by an earlier batch of the run, or by another writer
// after the preload) and a new key changed again (no ctid). The table must end up
// exactly as the source says.
func TestSyncUpdateByCtid(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.New(t)
	loadProducts(t, db, 2000)
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "tid", CheckpointSchema: db.Schema, Restart: true})
	require.NoError(t, err)
	defer s.Close(ctx)
	b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"},
		Sync: &SyncConfig{}, CommitRows: 100})
	require.NoError(t, err)
	// Another writer moves row 7 after the preload.
	db.Exec(t, "UPDATE "+db.Ident("products")+" SET inventory = inventory + 1 WHERE sku = $1", workload.SKU(7))
	want := map[int64]int64{} // row -> version in the end
	add := func(i, v int64) {
		t.Helper()
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), workload.Row(i, v).Values()...))
		want[i] = v
	}
	for i := int64(1); i <= 2010; i++ {
		v := int64(1)
		if i%10 == 0 || i == 7 {
			v = 2
		}
		add(i, v)
	}
	for _, i := range []int64{10, 20, 1990, 2005, 7} { // again, changed again
		add(i, 3)
	}
	_, err = b.Sweep(ctx)
	require.NoError(t, err)
	require.NoError(t, b.Close(ctx))
	// Row 7 (moved by the other writer) and the keys updated by an earlier batch
	// left stale ctids: their batches were retried as merges.
	require.Positive(t, s.Stat().Retries()["stale_key"], "stale ctids retried as merges")

	requireVersions(t, db, 2010, want)
}

// requireVersions checks that the products table holds exactly rows 1..n, row i
// at version want[i].
func requireVersions(t *testing.T, db *pgtest.DB, n int64, want map[int64]int64) {
	t.Helper()
	ctx := context.Background()
	cols := strings.Join(workload.Columns, ", ")
	db.Exec(t, "DROP TABLE IF EXISTS "+db.Ident("want"))
	db.Exec(t, "CREATE TABLE "+db.Ident("want")+" AS SELECT "+cols+" FROM "+db.Ident("products")+" WITH NO DATA")
	var rows [][]any
	for i := int64(1); i <= n; i++ {
		rows = append(rows, workload.Row(i, want[i]).Values())
	}
	_, err := db.Pool.CopyFrom(ctx, pgx.Identifier{db.Schema, "want"}, workload.Columns, pgx.CopyFromRows(rows))
	require.NoError(t, err)
	diff := db.Int(t, "SELECT count(*) FROM ((SELECT "+cols+" FROM "+db.Ident("products")+" EXCEPT SELECT "+cols+" FROM "+db.Ident("want")+
		") UNION ALL (SELECT "+cols+" FROM "+db.Ident("want")+" EXCEPT SELECT "+cols+" FROM "+db.Ident("products")+")) d")
	require.Equal(t, int64(0), diff, "rows differing from the source")
	require.Equal(t, n, db.Int(t, "SELECT count(*) FROM "+db.Ident("products")))
}

// TestSyncSameKeyInGroup adds keys twice in a row, so that both rows of a key are
// looked up in the same group (syncResolve): unchanged then changed, changed then
// back to the table's value (must be sent: the first is in flight), changed twice.
// Each key ends at its last row's version, under the key-cache and merge paths.
func TestSyncSameKeyInGroup(t *testing.T) {
	t.Parallel()
	for _, onlyChanged := range []bool{false, true} {
		t.Run(fmt.Sprint("OnlyChanged=", onlyChanged), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			db := pgtest.New(t)
			loadProducts(t, db, 300)
			s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "group", CheckpointSchema: db.Schema, Restart: true})
			require.NoError(t, err)
			defer s.Close(ctx)
			b, err := s.Batch(ctx, BatchConfig{Table: db.Schema + ".products", Columns: workload.Columns, Key: []string{"sku"},
				Sync: &SyncConfig{}, OnlyChanged: onlyChanged, CommitRows: 1000})
			require.NoError(t, err)
			want := map[int64]int64{}
			add := func(i, v int64) {
				t.Helper()
				require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), workload.Row(i, v).Values()...))
				want[i] = v
			}
			for i := int64(1); i <= 300; i++ {
				switch i % 4 {
				case 1: // unchanged, then changed
					add(i, 1)
					add(i, 2)
				case 2: // changed, then back to the table's row
					add(i, 2)
					add(i, 1)
				case 3: // changed twice
					add(i, 2)
					add(i, 3)
				default:
					add(i, 1)
				}
			}
			_, err = b.Sweep(ctx)
			require.NoError(t, err)
			require.NoError(t, b.Close(ctx))
			st := s.Stat()
			require.Equal(t, int64(0), st.Deleted())
			require.Equal(t, int64(0), st.Inserted())
			requireVersions(t, db, 300, want)
		})
	}
}
