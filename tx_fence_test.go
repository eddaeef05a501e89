package pgetl

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// TestTxFencedKeepsConnection: Tx sends BEGIN, its guards and its fence as one
// message; when the fence fails (the job was taken over) the message's transaction
// is aborted, and the attempt ends it, so Tx returns ErrFenced without running fn
// and the connection goes back to the pool usable rather than being destroyed.
func TestTxFencedKeepsConnection(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.New(t)
	pool, err := NewPool(ctx, pgtest.WithParam(db.URL, "pool_max_conns", "1")) // one connection: a destroyed one shows as a new one

	require.NoError(t, err)
	defer pool.Close()
	s1, err := NewSession(ctx, pool, SessionConfig{Job: "fenced-tx", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s1.Close(ctx)
	require.NoError(t, s1.Tx(ctx, func(pgx.Tx) error { return nil }))
	s2, err := NewSession(ctx, db.Pool, SessionConfig{Job: "fenced-tx", CheckpointSchema: db.Schema, Takeover: true})
	require.NoError(t, err)
	defer s2.Close(ctx)

	conns := pool.Stat().NewConnsCount()
	ran := false
	err = s1.Tx(ctx, func(pgx.Tx) error { ran = true; return nil })
	require.ErrorIs(t, err, ErrFenced)
	require.False(t, ran, "fn runs after the fence")
	var status string
	require.NoError(t, pool.QueryRow(ctx, "SELECT 'ok'").Scan(&status))
	require.Equal(t, conns, pool.Stat().NewConnsCount(), "the connection of the fenced attempt went back to the pool, usable")
	require.Zero(t, db.Int(t, `SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND application_name LIKE 'pgetl fenced-tx%'`))
}
