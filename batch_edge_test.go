package pgetl

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// Edge cases found in review: each would lose or corrupt rows, or crash.

func TestBatchCursorQuotingAnyStandardConformingStrings(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	// A server (or role) with standard_conforming_strings off must not turn a
	// cursor into SQL.
	url := pgtest.WithParam(bd.db.URL, "options", "'-c standard_conforming_strings=off'")
	if strings.Contains(bd.db.URL, "://") {
		url = pgtest.WithParam(bd.db.URL, "options", "-c%20standard_conforming_strings%3Doff")
	}
	pool, err := pgxpool.New(ctx, url)
	require.NoError(t, err)
	defer pool.Close()
	var scs string
	require.NoError(t, pool.QueryRow(ctx, "SHOW standard_conforming_strings").Scan(&scs))
	require.Equal(t, "off", scs)
	s, err := NewSession(ctx, pool, SessionConfig{Job: `j\'ob`, CheckpointSchema: bd.db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	evil := `\'` + `, 1, 0, $$1 second$$); CREATE TABLE ` + bd.db.Schema + `.pwned(); COMMIT; --`
	require.NoError(t, b.Add(ctx, evil, itemRow(1)...))
	require.NoError(t, b.Close(ctx))
	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'pwned'", bd.db.Schema))
	cp, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, `j\'ob`)
	require.NoError(t, err)
	require.Equal(t, evil, cp.Cursor)
}

func TestBatchOddJobNames(t *testing.T) {
	t.Parallel()
	for _, job := range []string{"naïve job é", "a;b'c", "x%d%s"} {
		t.Run(strconv.Quote(job), func(t *testing.T) {
			t.Parallel()
			bd := setupItems(t)
			ctx := context.Background()
			s := bd.session(t, job)
			for _, cfg := range []BatchConfig{
				{Table: bd.table, Columns: itemCols, CommitRows: 10},
				{SQL: "INSERT INTO " + bd.table + " (id, name, price, qty, at) VALUES ($1, $2, $3, $4, $5)", CommitRows: 10},
			} {
				b, err := s.Batch(ctx, cfg)
				require.NoError(t, err)
				off := int64(0)
				if cfg.SQL != "" {
					off = 100
				}
				require.NoError(t, load(ctx, b, off+1, off+25))
				require.NoError(t, b.Close(ctx))
			}
			require.Equal(t, int64(50), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
		})
	}
	_, err := NewSession(context.Background(), nil, SessionConfig{Job: "bad\xff"})
	require.Error(t, err)
}

func TestBatchInvalidCursor(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "cursor")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable})
	require.NoError(t, err)
	var berr *BatchError
	require.ErrorAs(t, b.Add(ctx, "bad\xffcursor", itemRow(1)...), &berr)
	require.NoError(t, b.Add(ctx, "2", itemRow(2)...))
	require.NoError(t, b.Close(ctx))
	require.Equal(t, int64(1), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
}

func TestBatchConcurrentClose(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "close")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 10))
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() { require.NoError(t, b.Close(ctx)) })
		wg.Go(func() { require.NoError(t, s.Close(ctx)) })
	}
	wg.Wait()
	bd.requireExactly(t, 10)
}

// TestBatchAddContext: the ctx of the Add that fills a batch bounds the hand-off,
// not the batch's commit in the background.
func TestBatchAddContext(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "addctx")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 100})
	require.NoError(t, err)
	for i := int64(1); i <= 1000; i++ {
		c, cancel := context.WithCancel(ctx)
		err := b.Add(c, strconv.FormatInt(i, 10), itemRow(i)...)
		cancel()
		require.NoError(t, err)
	}
	require.NoError(t, b.Close(ctx))
	bd.requireExactly(t, 1000)
}

// TestBatchTwoBatchSessionsRejects: rows of two batch sessions of one session get
// distinct indices, so their rejects never collide.
func TestBatchTwoBatchSessionsRejects(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "two")
	b1, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable})
	require.NoError(t, err)
	b2, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable})
	require.NoError(t, err)
	bad := badKinds[0].row
	require.NoError(t, b1.Add(ctx, "1", bad(1)...))
	require.NoError(t, b2.Add(ctx, "2", bad(2)...))
	require.NoError(t, b1.Close(ctx))
	require.NoError(t, b2.Close(ctx))
	require.Equal(t, int64(2), bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'two'"))
	require.Equal(t, int64(2), s.Stat().Rejects())
}
