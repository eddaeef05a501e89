package pgetl

import (
	"context"
	"strconv"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// TestSlowStartGrowsWhileSlotsBusy: during the slow start, a batch that reaches its
// step while every batch slot is in flight keeps filling instead of waiting for a
// slot (on a long link each step would cost a round trip, and Add would wait with
// it). The first InFlight batches (500, 1,000, … rows) are held before they are
// sent until rows well past the next batch's step are added; that batch then holds
// every row added meanwhile. On the code before, it held its step (twice the last
// batch) and waited for a slot. The same for a BatchSet (of one table).
func TestSlowStartGrowsWhileSlotsBusy(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		inFlight int
		set      bool
	}{{2, false}, {4, false}, {2, true}, {4, true}} {
		inFlight := c.inFlight
		name := "InFlight=" + strconv.Itoa(inFlight)
		if c.set {
			name = "BatchSet/" + name
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			db := pgtest.New(t)
			db.Exec(t, `CREATE TABLE t (id bigint PRIMARY KEY)`)
			held := make(chan int64, inFlight)
			release := make(chan struct{})
			s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "slowstart", CheckpointSchema: db.Schema,
				beforeCommit: func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
					if seq <= int64(inFlight) && attempt == 1 {
						held <- seq
						<-release
					}
				}})
			require.NoError(t, err)
			defer s.Close(ctx)
			var mu sync.Mutex
			var sizes []int64
			cfg := BatchConfig{Table: db.Schema + ".t", Columns: []string{"id"}, InFlight: inFlight,
				OnCommitFunc: func(r BatchResult) {
					mu.Lock()
					sizes = append(sizes, r.Rows)
					mu.Unlock()
				}}
			var add func(i int64) error
			var closeBatch func() error
			if c.set {
				set, err := s.Batches(ctx, cfg)
				require.NoError(t, err)
				add = func(i int64) error { return set.Add(ctx, strconv.FormatInt(i, 10), []any{i}) }
				closeBatch = func() error { return set.Close(ctx) }
			} else {
				bs, err := s.Batch(ctx, cfg)
				require.NoError(t, err)
				add = func(i int64) error { return bs.Add(ctx, strconv.FormatInt(i, 10), i) }
				closeBatch = func() error { return bs.Close(ctx) }
			}
			// The held batches' steps, their rows, and the next batch's step.
			var steps []int64
			var heldRows int64
			step := int64(slowStartRows)
			for range inFlight {
				steps = append(steps, step)
				heldRows += step
				step *= 2
			}
			// Released before the batch after next would be full (the code before
			// then waited in Add for the held batches: no deadlock either way).
			releaseAt := heldRows + 2*step - 500
			const n = 40000
			for i := int64(1); i <= n; i++ {
				if i == heldRows+1 {
					// Every slot is taken by a held batch.
					for range inFlight {
						<-held
					}
				}
				if i == releaseAt+1 {
					close(release)
				}
				require.NoError(t, add(i))
			}
			require.NoError(t, closeBatch())
			mu.Lock()
			defer mu.Unlock()
			t.Logf("batch sizes: %v (step after the held ones: %d, released at row %d)", sizes, step, releaseAt)
			require.Equal(t, steps, sizes[:inFlight], "the held batches are the slow start's first steps")
			require.GreaterOrEqual(t, sizes[inFlight], releaseAt-heldRows,
				"the batch after the held ones stopped at its slow-start step instead of growing while they were in flight")
			var sum int64
			for _, n := range sizes {
				sum += n
			}
			require.EqualValues(t, n, sum)
			require.EqualValues(t, n, db.Int(t, `SELECT count(*) FROM t`))
			require.EqualValues(t, int64(n)*(n+1)/2, db.Int(t, `SELECT sum(id) FROM t`))
			cp, err := s.Checkpoint(ctx)
			require.NoError(t, err)
			require.Equal(t, strconv.Itoa(n), cp.Cursor)
		})
	}
}

// TestInFlightSmallPool: batches in flight on a pool of one connection take it in
// their order (see takeTurn). A batch that took it ahead of an earlier one would
// wait at the fence for that batch, which waits for the connection, until the
// fence gives up (5 s), and be replayed: counted as predecessor_pending.
func TestInFlightSmallPool(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	cfg, err := ParseConfig(bd.db.URL)
	require.NoError(t, err)
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	bd.pool = pool
	s := bd.session(t, "small-pool")
	const n = 3000
	require.NoError(t, loadJob(context.Background(), s, BatchConfig{Table: bd.table, Columns: itemCols,
		CommitRows: 100, InFlight: 4, CommitInterval: -1}, 1, n, nil))
	bd.requireExactly(t, n)
	require.Zero(t, s.Stat().Retries()["predecessor_pending"], "a batch overtook an earlier one: %v", s.Stat().Retries())
	require.Equal(t, int64(n/100), s.Stat().Batches())
}
