package pgetl

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

// A rejected row is stored as a JSON object keyed by column: a literal backslash-u-0000
// in its text is kept as it is (editing the JSON text broke it: 22P02, and the whole
// batch was lost), a real NUL byte (which jsonb cannot hold) is removed from the value,
// and the good rows of the batch commit.
func TestRejectJSON(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const literal = `C:\u0000dir` // backslash, u, 0000: text, not a NUL
	type reject struct {
		table *string
		row   map[string]any
	}
	rejectsOf := func(t *testing.T, bd *bundle, job string) map[int64]reject {
		t.Helper()
		rows, err := bd.pool.Query(ctx, "SELECT row_index + 1, table_name, row::text FROM "+bd.db.Schema+".reject WHERE job = $1", job)
		require.NoError(t, err)
		defer rows.Close()
		got := map[int64]reject{}
		for rows.Next() {
			var i int64
			var r reject
			var text string
			require.NoError(t, rows.Scan(&i, &r.table, &text))
			require.NoError(t, json.Unmarshal([]byte(text), &r.row), "the row is a JSON object: %s", text)
			got[i] = r
		}
		require.NoError(t, rows.Err())
		return got
	}

	t.Run("copy", func(t *testing.T) {
		t.Parallel()
		bd := setupItems(t)
		s := bd.session(t, "json")
		b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable})
		require.NoError(t, err)
		for i := int64(1); i <= 20; i++ {
			r := itemRow(i)
			switch i {
			case 5: // refused by the CHECK on price; its name is the literal text
				r[1], r[2] = literal, "-1.00"
			case 9: // refused by the server: text cannot hold NUL (22021)
				r[1] = "bad\x00name"
			case 13: // refused by Add (qty cannot take it), with a NUL in another column
				r[1], r[3] = "nul\x00here", "many"
			}
			require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), r...))
		}
		require.NoError(t, b.Close(ctx))
		bd.requireExactly(t, 20, 5, 9, 13)
		got := rejectsOf(t, bd, "json")
		require.Len(t, got, 3)
		for _, i := range []int64{5, 9, 13} {
			require.NotNil(t, got[i].table, "row %d: table_name", i)
			require.Equal(t, bd.table, *got[i].table)
			require.Equal(t, float64(i), got[i].row["id"], "row %d keyed by column", i)
			require.Len(t, got[i].row, len(itemCols))
		}
		require.Equal(t, literal, got[5].row["name"], "a literal backslash-u-0000 is kept exactly")
		require.Equal(t, "badname", got[9].row["name"], "a NUL is removed")
		require.Equal(t, "nulhere", got[13].row["name"])
		require.Equal(t, "many", got[13].row["qty"])
		cp, err := s.Checkpoint(ctx)
		require.NoError(t, err)
		require.Equal(t, int64(3), cp.Rejects)
		require.Equal(t, int64(17), cp.Rows)
	})

	t.Run("statement", func(t *testing.T) {
		t.Parallel()
		bd := setupItems(t)
		s := bd.session(t, "json-stmt")
		b, err := s.Batch(ctx, BatchConfig{SQL: "INSERT INTO " + bd.table + " (id, name, price, qty, at) VALUES ($1, $2, $3, $4, $5)",
			Rejects: RejectToTable})
		require.NoError(t, err)
		for i := int64(1); i <= 10; i++ {
			r := itemRow(i)
			switch i {
			case 3:
				r[1], r[2] = literal, "-1.00"
			case 7:
				r[1] = "bad\x00name"
			}
			require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), r...))
		}
		require.NoError(t, b.Close(ctx))
		bd.requireExactly(t, 10, 3, 7)
		got := rejectsOf(t, bd, "json-stmt")
		require.Len(t, got, 2)
		require.Nil(t, got[3].table, "the statement path has no target table")
		require.Equal(t, float64(3), got[3].row["$1"], "keyed by parameter without Columns")
		require.Equal(t, literal, got[3].row["$2"])
		require.Equal(t, "badname", got[7].row["$2"])
	})
}
