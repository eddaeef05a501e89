package pgetl

// Replays of committed work (issue 13, defects 1 and 3): a unit of work whose COMMIT
// went through but whose reply was lost, while the server is briefly unreachable so
// that in-doubt resolution cannot ask it. The replay must be recognised as committed
// at the checkpoint's fence, before its data (a unique key would otherwise blame a
// good row) and before a Tx function runs again; and while the outcome is unknown,
// Checkpoint must say so instead of returning a stale cursor.
//
// The fault is a net.Conn wrapper installed with the pool's DialFunc: once armed
// (from the beforeCommit hook, right before the unit's last message is written),
// the connection's reads block until the test cuts it, so the server runs the
// COMMIT while the client hears nothing; a refusing dialer stands for the
// unreachable server.

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// gate is the fault: it refuses new connections while closed, and blocks the reads
// of an armed connection until cut.
type gate struct {
	refuse  atomic.Bool
	refused atomic.Int64 // dials refused
	cut     chan struct{}
	cutOnce sync.Once
}

// cutConns ends the blocked reads of the armed connection. Also a cleanup: a test
// that fails before cutting must not leave Close waiting on them.
func (g *gate) cutConns() { g.cutOnce.Do(func() { close(g.cut) }) }

type gatedConn struct {
	net.Conn
	g     *gate
	armed atomic.Bool
}

func (c *gatedConn) Read(p []byte) (int, error) {
	if c.armed.Load() {
		<-c.g.cut
		_ = c.Conn.Close()
		return 0, syscall.ECONNRESET
	}
	return c.Conn.Read(p)
}

func newGate() *gate { return &gate{cut: make(chan struct{})} }

// pool returns a pool of at most one connection (so resolution needs a new one)
// whose connections go through g.
func (g *gate) pool(t *testing.T, connString string) *pgxpool.Pool {
	return faultPool(t, connString, func(c *pgxpool.Config) {
		c.MaxConns = 1
		dial := c.ConnConfig.DialFunc
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if g.refuse.Load() {
				g.refused.Add(1)
				return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
			}
			conn, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &gatedConn{Conn: conn, g: g}, nil
		}
	})
}

// arm makes pgc's reads block until cut.
func (g *gate) arm(pgc *pgconn.PgConn) {
	c := pgc.Conn().(*gatedConn)
	c.armed.Store(true)
}

// committedThenUnreachable waits until the unit of work seq of job committed on the
// server (read on a direct pool), then makes the server unreachable and cuts the
// armed connection: the client learns nothing of its COMMIT.
func (g *gate) committedThenUnreachable(t *testing.T, direct *pgxpool.Pool, schema, job string, seq int64) {
	t.Helper()
	require.True(t, poll(t, 20*time.Second, func() bool {
		cp, err := ReadCheckpoint(context.Background(), direct, schema, job)
		return err == nil && cp.Seq >= seq
	}), "unit %d did not commit on the server", seq)
	g.refuse.Store(true)
	g.cutConns()
}

// reachableAfter lets connections through again once n dials were refused.
func (g *gate) reachableAfter(t *testing.T, n int64) {
	t.Helper()
	require.True(t, poll(t, 20*time.Second, func() bool { return g.refused.Load() >= n }), "refused dials: %d", g.refused.Load())
	g.refuse.Store(false)
}

func TestReplayOfCommittedBatchStopsAtTheFence(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  BatchConfig
	}{
		{"copy-reject-fail", BatchConfig{}},
		{"copy-reject-to-table", BatchConfig{Rejects: RejectToTable}},
		{"statement", BatchConfig{SQL: "INSERT INTO %s (id, name, price, qty, at) VALUES ($1, $2, $3, $4, $5)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n, commitRows, target = 10_000, 2_000, 3
			bd := setupItems(t)
			ctx := context.Background()
			g := newGate()
			pool := g.pool(t, bd.db.URL)
			job := "replay-" + tc.name
			tr := newTrigger(t)
			var attempts atomic.Int64
			s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
				Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: 1000},
				beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
					attempts.Add(1)
					if seq == target && attempt == 1 {
						g.arm(pgc)
						tr.pull(seq)
					}
				}})
			require.NoError(t, err)
			t.Cleanup(func() { _ = s.Close(context.Background()) })
			t.Cleanup(g.cutConns) // first
			cfg := tc.cfg
			cfg.Table, cfg.Columns, cfg.CommitRows, cfg.CommitInterval = bd.table, itemCols, commitRows, -1
			if cfg.SQL != "" {
				cfg.SQL = "INSERT INTO " + bd.table + " (id, name, price, qty, at) VALUES ($1, $2, $3, $4, $5)"
				cfg.Table = ""
			}
			res := goJob(func() error { return loadJob(ctx, s, cfg, 1, n, nil) })
			tr.wait(t, res, 30*time.Second)
			tr.release()
			g.committedThenUnreachable(t, bd.db.Pool, bd.db.Schema, job, target)
			// Resolution and a few replays find the server unreachable.
			g.reachableAfter(t, 3)
			require.NoError(t, waitJob(t, res, 60*time.Second))

			bd.requireExactly(t, n)
			requireCheckpoint(t, bd.db.Pool, bd.db.Schema, job, strconv.Itoa(n), n, 0)
			requireRejects(t, bd.db.Pool, bd.db.Schema, job, nil)
			st := s.Stat()
			t.Logf("attempts %d, retries %v", attempts.Load(), st.Retries())
			require.Equal(t, int64(1), st.Retries()["in_doubt_committed"], "the replay found the batch committed: %v", st.Retries())
			require.Zero(t, st.Retries()["bisect_probe"], "no row was blamed: %v", st.Retries())
			require.Equal(t, int64(n/commitRows+1), attempts.Load(), "one replay reached the server, and stopped at the fence")
		})
	}
}

func TestReplayOfCommittedTxDoesNotRunFnAgain(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	g := newGate()
	pool := g.pool(t, bd.db.URL)
	const job = "replay-tx"
	var armed atomic.Bool
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
		Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: 1000},
		beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
			if seq == 2 && attempt == 1 && armed.CompareAndSwap(false, true) {
				g.arm(pgc)
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	t.Cleanup(g.cutConns) // first
	var calls [3]atomic.Int64
	unit := func(id int64) func(pgx.Tx) error {
		return func(tx pgx.Tx) error {
			calls[id].Add(1)
			_, err := tx.Exec(ctx, "INSERT INTO "+bd.table+" (id, name, price, qty, at) VALUES ($1, $2, $3, $4, $5)", itemRow(id)...)
			return err
		}
	}
	require.NoError(t, s.Tx(ctx, unit(1)))
	res := goJob(func() error { return s.Tx(ctx, unit(2)) })
	require.True(t, poll(t, 20*time.Second, armed.Load))
	g.committedThenUnreachable(t, bd.db.Pool, bd.db.Schema, job, 2)
	g.reachableAfter(t, 3)
	require.NoError(t, waitJob(t, res, 60*time.Second))
	bd.requireExactly(t, 2)
	require.Equal(t, int64(1), calls[1].Load())
	require.Equal(t, int64(1), calls[2].Load(), "fn ran once: the replay stopped at the fence")
	require.Equal(t, int64(1), s.Stat().Retries()["in_doubt_committed"], "%v", s.Stat().Retries())
}

// TestCheckpointWhileOutcomeUnknown: the caller gives up on a Flush whose COMMIT went
// through unseen while the server is unreachable. Flush reports ErrInDoubt; so does
// Checkpoint until the server answers, and then it reports the committed position,
// never the stale one.
func TestCheckpointWhileOutcomeUnknown(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	g := newGate()
	pool := g.pool(t, bd.db.URL)
	const job = "unknown-outcome"
	var armed atomic.Bool
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
		Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond},
		beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
			if seq == 2 && armed.CompareAndSwap(false, true) {
				g.arm(pgc)
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	t.Cleanup(g.cutConns) // first
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 1000, CommitInterval: -1})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 1000)) // batch 1 commits in the background
	require.NoError(t, b.Flush(ctx))
	require.NoError(t, load(ctx, b, 1001, 1500))
	fctx, cancel := context.WithCancel(ctx)
	flushed := goJob(func() error { return b.Flush(fctx) })
	require.True(t, poll(t, 20*time.Second, armed.Load))
	g.committedThenUnreachable(t, bd.db.Pool, bd.db.Schema, job, 2)
	cancel() // the caller gives up while the outcome is unknown
	err = waitJob(t, flushed, 60*time.Second)
	require.ErrorIs(t, err, ErrInDoubt, "%v", err)
	require.ErrorIs(t, err, context.Canceled)

	_, err = s.Checkpoint(ctx)
	require.ErrorIs(t, err, ErrInDoubt, "the server cannot be asked: the position is unknown, not stale")
	g.refuse.Store(false)
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(2), cp.Seq)
	require.Equal(t, "1500", cp.Cursor, "the committed position, not the stale one (1000)")
	require.Equal(t, int64(1500), cp.Rows)
	_ = b.Close(ctx)
	bd.requireExactly(t, 1500)
	require.False(t, errors.Is(s.Close(ctx), ErrInDoubt))
}

// TestLeaseRenewalSeesTakeover: the renewal service of a session whose job was taken
// over fences it and says so on its Lost channel; the session's next commit fails
// with ErrFenced and commits nothing.
func TestLeaseRenewalSeesTakeover(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	old := bd.session(t, "lease", func(c *SessionConfig) { c.Lease = time.Second })
	b, err := old.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 100, CommitInterval: -1})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 100))
	require.NoError(t, b.Flush(ctx))
	bd.session(t, "lease", func(c *SessionConfig) { c.Takeover = true })
	select {
	case <-old.lease.Lost():
	case <-time.After(30 * time.Second):
		t.Fatal("the renewal did not notice the takeover")
	}
	require.NoError(t, load(ctx, b, 101, 150))
	require.ErrorIs(t, b.Flush(ctx), ErrFenced)
	bd.requireExactly(t, 100)
}
