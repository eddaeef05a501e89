package pgetl

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestBatchStatementReusedBuffer: the statement path keeps a copy of the values
// passed to Add. Before the fix it kept the caller's []byte, so a buffer reused for
// the next row rewrote the rows already added, and every row of a batch got the
// last row's bytes.
func TestBatchStatementReusedBuffer(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	bd.db.Exec(t, `CREATE TABLE blobs (id int PRIMARY KEY, data bytea NOT NULL, tags text[] NOT NULL)`)
	s := bd.session(t, "stmt-reuse")
	b, err := s.Batch(ctx, BatchConfig{SQL: "INSERT INTO " + bd.db.Schema + ".blobs (id, data, tags) VALUES ($1, $2, $3)",
		Columns: []string{"id", "data", "tags"}, CommitRows: 50})
	require.NoError(t, err)
	buf := make([]byte, 16)
	tags := make([]string, 2)
	for i := range 120 {
		for j := range buf {
			buf[j] = byte(i + j)
		}
		tags[0], tags[1] = "a"+strconv.Itoa(i), "b"+strconv.Itoa(i)
		require.NoError(t, b.Add(ctx, strconv.Itoa(i), int32(i), buf, tags))
	}
	require.NoError(t, b.Close(ctx))
	rows, err := bd.pool.Query(ctx, "SELECT id, data, tags FROM "+bd.db.Schema+".blobs ORDER BY id")
	require.NoError(t, err)
	defer rows.Close()
	n := 0
	for rows.Next() {
		var id int32
		var data []byte
		var got []string
		require.NoError(t, rows.Scan(&id, &data, &got))
		want := make([]byte, 16)
		for j := range want {
			want[j] = byte(int(id) + j)
		}
		require.Equal(t, want, data, "row %d holds its own bytes", id)
		require.Equal(t, []string{"a" + strconv.Itoa(int(id)), "b" + strconv.Itoa(int(id))}, got, "row %d holds its own tags", id)
		n++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, 120, n)
}

func TestOwnValue(t *testing.T) {
	t.Parallel()
	type inner struct {
		B []byte
		M map[string][]int
	}
	type outer struct {
		P    *inner
		Arr  [2][]byte
		Any  any
		name string
	}
	v := outer{P: &inner{B: []byte("x"), M: map[string][]int{"k": {1}}}, Arr: [2][]byte{[]byte("a"), nil}, Any: []byte("y"), name: "n"}
	c := ownValue(v).(outer)
	require.Equal(t, v, c)
	v.P.B[0], v.P.M["k"][0], v.Arr[0][0], v.Any.([]byte)[0] = 'X', 9, 'A', 'Y'
	require.Equal(t, "x", string(c.P.B))
	require.Equal(t, 1, c.P.M["k"][0])
	require.Equal(t, "a", string(c.Arr[0]))
	require.Equal(t, "y", string(c.Any.([]byte)))
	require.Nil(t, ownValue([]byte(nil)))
	require.Equal(t, []byte{}, ownValue([]byte{}))
	s := "str"
	ps := ownValue(&s).(*string)
	s = "changed"
	require.Equal(t, "str", *ps)
	now := time.Now()
	require.Equal(t, now, ownValue(now))
	require.Nil(t, ownValue(nil))
}
