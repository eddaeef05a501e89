package pgetl

import (
	"context"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// TestCachePreloadTextForm: Preload reads its pages in QueryExecModeExec (one round
// trip each, text form), so keys travel to the server as untyped text ($2 of the
// next page) and values come back as text. Keys and values of types pgx decodes
// from both forms (uuid as [16]byte, int4, timestamptz, numeric as float64) load as
// they would in binary, over several pages.
func TestCachePreloadTextForm(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.New(t)
	db.Exec(t, `CREATE TABLE dim (u uuid PRIMARY KEY, n int4 UNIQUE NOT NULL, at timestamptz NOT NULL, price numeric NOT NULL)`)
	db.Exec(t, `INSERT INTO dim SELECT md5(i::text)::uuid, i, '2024-01-01T00:00:00.123456Z'::timestamptz + i * interval '1 hour', i / 4.0
		FROM generate_series(1, 250) i`)

	byUUID, err := NewCache[[16]byte, time.Time](CacheConfig{})
	require.NoError(t, err)
	require.NoError(t, byUUID.Preload(ctx, db.Pool, Lookup{Table: db.Qualified("dim"), Key: "u", Value: "at", PageSize: 60}))
	require.EqualValues(t, 250, byUUID.Stat().Len())
	require.EqualValues(t, 5, byUUID.Stat().PreloadedPages())
	rows, err := db.Pool.Query(ctx, `SELECT u, at FROM dim`)
	require.NoError(t, err)
	var u [16]byte
	var at time.Time
	n := 0
	for rows.Next() {
		require.NoError(t, rows.Scan(&u, &at))
		got, ok := byUUID.Get(u)
		require.True(t, ok, "key %x", u)
		require.True(t, at.Equal(got), "key %x: %v, want %v", u, got, at)
		n++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, 250, n)

	byInt, err := NewCache[int32, float64](CacheConfig{})
	require.NoError(t, err)
	require.NoError(t, byInt.Preload(ctx, db.Pool, Lookup{Table: db.Qualified("dim"), Key: "n", Value: "price", PageSize: 100}))
	require.EqualValues(t, 250, byInt.Stat().Len())
	for i := int32(1); i <= 250; i++ {
		got, ok := byInt.Get(i)
		require.True(t, ok, "key %d", i)
		require.Equal(t, float64(i)/4, got)
	}
}
