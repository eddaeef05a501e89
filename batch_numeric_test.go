package pgetl

import (
	"bytes"
	"context"
	"math"
	"math/big"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// TestAppendNumeric: for numerics of many mantissas and exponents, appendNumeric
// gives exactly the bytes the server sends for the value pgx's codec encodes
// (numeric_send of it): the same value, in the server's canonical form.
func TestAppendNumeric(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(16, 1))
	mants := []int64{0, 1, -1, 5, 10, 100, 1000, 9999, 10000, 10001, 123400, 123450, -123400, 100000000,
		math.MaxInt64, math.MinInt64, math.MinInt64 + 1, 1_0000_0000_0000}
	for range 300 {
		mants = append(mants, rng.Int64N(1<<62)-1<<61, rng.Int64N(100000))
	}
	exps := []int32{-64, -20, -19, -9, -8, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 8, 20, 64}
	for _, m := range mants {
		for _, e := range exps {
			n := pgtype.Numeric{Int: big.NewInt(m), Exp: e, Valid: true}
			got, ok := appendNumeric([]byte("x"), n)
			require.True(t, ok)
			var want []byte
			require.NoError(t, db.Pool.QueryRow(ctx, "SELECT numeric_send($1::numeric)", n).Scan(&want))
			require.True(t, bytes.Equal(want, got[1:]), "%de%d: got %x, the server sends %x", m, e, got[1:], want)
		}
	}
	for _, n := range []pgtype.Numeric{{}, {NaN: true, Valid: true}, {InfinityModifier: pgtype.Infinity, Valid: true},
		{Int: new(big.Int).Lsh(big.NewInt(1), 70), Valid: true}, {Int: big.NewInt(1), Exp: 65, Valid: true}} {
		_, ok := appendNumeric(nil, n)
		require.False(t, ok, "%+v is left to pgx's codec", n)
	}
}

// TestAppendFast: the fast encodings equal pgx's codecs byte for byte.
func TestAppendFast(t *testing.T) {
	t.Parallel()
	m := pgtype.NewMap()
	rng := rand.New(rand.NewPCG(16, 2))
	var vals []struct {
		oid uint32
		v   any
	}
	add := func(oid uint32, v any) {
		vals = append(vals, struct {
			oid uint32
			v   any
		}{oid, v})
	}
	for _, s := range []string{"", "SKU-0000001", "Product 17 v2", "ünïcode ✓", string(make([]byte, 300))} {
		add(pgtype.TextOID, s)
		add(pgtype.VarcharOID, s)
	}
	for _, i := range []int32{0, 1, -1, math.MaxInt32, math.MinInt32, 9999} {
		add(pgtype.Int4OID, i)
	}
	for _, i := range []int64{0, 1, -1, math.MaxInt64, math.MinInt64} {
		add(pgtype.Int8OID, i)
	}
	for range 200 {
		sec := rng.Int64N(8_000_000_000) - 4_000_000_000
		add(pgtype.TimestamptzOID, time.Unix(sec, rng.Int64N(1e9)))
		add(pgtype.TimestamptzOID, time.Unix(sec, 0).In(time.FixedZone("x", 3600*5)))
	}
	add(pgtype.TimestamptzOID, time.Date(1999, 12, 31, 23, 59, 59, 999_999_999, time.UTC))
	add(pgtype.TimestamptzOID, time.Date(1, 1, 1, 0, 0, 0, 1500, time.UTC))
	for _, c := range vals {
		want, err := m.Encode(c.oid, pgtype.BinaryFormatCode, c.v, nil)
		require.NoError(t, err)
		got, ok := appendFast(c.oid, c.v, nil)
		require.True(t, ok, "%T for %d", c.v, c.oid)
		require.Equal(t, want, got, "%T %v for %d", c.v, c.v, c.oid)
	}
	_, ok := appendFast(pgtype.Int8OID, int32(1), nil)
	require.False(t, ok, "other pairs are left to pgx")
}

// TestNumericsCanonical: numericsCanonical says a tuple's numerics are in the
// server's form exactly when canonNumerics would leave the tuple as it is, for
// numerics as pgx's codec encodes them (often with leading or trailing zero
// digits) and as appendNumeric does (canonical), NULL and NaN among them.
func TestNumericsCanonical(t *testing.T) {
	t.Parallel()
	m := pgtype.NewMap()
	rng := rand.New(rand.NewPCG(16, 3))
	var nums []pgtype.Numeric
	for _, s := range []string{"0", "0.00", "-0.00", "1234.00", "1234", "0.0100", "-0.0100", "100000000", "12.5",
		"99999999.99", "0.0001", "10000.0000", "NaN"} {
		var n pgtype.Numeric
		require.NoError(t, n.Scan(s))
		nums = append(nums, n)
	}
	for range 500 {
		nums = append(nums, pgtype.Numeric{Int: big.NewInt(rng.Int64N(1_000_000_000) - 500_000_000), Exp: int32(rng.IntN(13) - 8), Valid: true})
	}
	nums = append(nums, pgtype.Numeric{})
	tuple := func(enc func(pgtype.Numeric) []byte, a, b pgtype.Numeric) []byte {
		tup := []byte{0, 3}
		for _, f := range [][]byte{[]byte("key"), enc(a), enc(b)} {
			if f == nil {
				tup = append(tup, 0xff, 0xff, 0xff, 0xff)
				continue
			}
			tup = append(append(tup, byte(len(f)>>24), byte(len(f)>>16), byte(len(f)>>8), byte(len(f))), f...)
		}
		return tup
	}
	pgxEnc := func(n pgtype.Numeric) []byte {
		out, err := m.Encode(pgtype.NumericOID, pgtype.BinaryFormatCode, n, nil)
		require.NoError(t, err)
		return out
	}
	fastEnc := func(n pgtype.Numeric) []byte {
		if out, ok := appendNumeric(nil, n); ok {
			return out
		}
		return pgxEnc(n)
	}
	cols := []int{1, 2}
	nonCanonical := 0
	for i, a := range nums {
		b := nums[(i*7+3)%len(nums)]
		for _, enc := range []func(pgtype.Numeric) []byte{pgxEnc, fastEnc} {
			tup := tuple(enc, a, b)
			same := bytes.Equal(canonNumerics(tup, cols, nil), tup)
			require.Equal(t, same, numericsCanonical(tup, cols), "%x", tup)
			if !same {
				nonCanonical++
			}
		}
		require.True(t, numericsCanonical(tuple(fastEnc, a, b), cols), "appendNumeric's form is canonical")
	}
	require.Positive(t, nonCanonical, "pgx's codec gave some numerics in a form the server does not send")
}
