package pgetl

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// poll calls f every few milliseconds until it returns true or the deadline passes.
func poll(t *testing.T, within time.Duration, f func() bool) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if f() {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// idleSampler records every sample in which a backend whose application_name starts
// with prefix is idle in transaction.
type idleSampler struct {
	samples, idle atomic.Int64
	seen          sync.Map
	stop          chan struct{}
	done          chan struct{}
}

func sampleIdle(t *testing.T, pool *pgxpool.Pool, prefix string, every time.Duration) *idleSampler {
	s := &idleSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tk := time.NewTicker(every)
		defer tk.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tk.C:
			}
			var n int64
			var names []string
			err := pool.QueryRow(context.Background(), `SELECT count(*), coalesce(array_agg(application_name), '{}') FROM pg_stat_activity
				WHERE state LIKE 'idle in transaction%' AND application_name LIKE $1`, prefix+"%").Scan(&n, &names)
			if err == nil {
				s.samples.Add(1)
				if n > 0 {
					s.idle.Add(1)
					s.seen.Store(strings.Join(names, ","), true)
				}
			}
		}
	}()
	t.Cleanup(s.Stop)
	return s
}

func (s *idleSampler) Stop() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

func TestBatchSurvivesTerminate(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "terminate")
	prefix := "pgetl terminate#"
	const n = 60_000
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 5000})
	require.NoError(t, err)

	// Kill the job's backend while its COPY is running, three times.
	var killed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for killed.Load() < 3 {
			select {
			case <-stop:
				return
			default:
			}
			var k int64
			_ = bd.pool.QueryRow(ctx, `SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_progress_copy c
				JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE $1 AND c.tuples_processed > 0`, prefix+"%").Scan(&k)
			killed.Add(k)
		}
	}()
	require.NoError(t, load(ctx, b, 1, n/2))
	require.NoError(t, b.Flush(ctx))
	// And between batches: no backend of the job exists, so kill the pool's idle
	// connections instead; the next flush must not mind.
	var idle []int64
	for _, c := range bd.pool.AcquireAllIdle(ctx) {
		idle = append(idle, int64(c.Conn().PgConn().PID()))
		c.Release()
	}
	require.NotEmpty(t, idle)
	_, err = bd.db.Pool.Exec(ctx, `SELECT pg_terminate_backend(pid::int) FROM unnest($1::int8[]) pid WHERE pid <> pg_backend_pid()`, idle)
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, n/2+1, n))
	require.NoError(t, b.Close(ctx))
	close(stop)
	wg.Wait()
	bd.requireExactly(t, n)
	t.Logf("terminated during COPY: %d; retries: %v", killed.Load(), s.Stat().Retries())
	require.Positive(t, killed.Load(), "the test must have hit a COPY")
	require.Positive(t, s.Stat().TotalRetries())
	require.Positive(t, s.Stat().Reconnects())
}

// TestBatchNoIdleInTransaction runs a job whose source pauses 2 s between rows under a
// role with idle_in_transaction_session_timeout = 500ms: no transaction ever waits on
// the source, so the timeout never fires, and no sample shows the job idle in
// transaction.
func TestBatchNoIdleInTransaction(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	role := bd.db.Schema + "_role"
	// The checkpoint tables exist already (made by a privileged role); the job's
	// role only uses them.
	setup := bd.session(t, "setup")
	require.NoError(t, setup.Close(ctx))
	bd.db.Exec(t, fmt.Sprintf(`CREATE ROLE %s LOGIN; GRANT ALL ON SCHEMA %s TO %[1]s; GRANT ALL ON ALL TABLES IN SCHEMA %[2]s TO %[1]s;
		ALTER ROLE %[1]s SET idle_in_transaction_session_timeout = '500ms'`, pgx.Identifier{role}.Sanitize(), pgx.Identifier{bd.db.Schema}.Sanitize()))
	t.Cleanup(func() {
		_, _ = bd.db.Pool.Exec(context.Background(), fmt.Sprintf("DROP OWNED BY %[1]s CASCADE; DROP ROLE %[1]s", pgx.Identifier{role}.Sanitize()))
	})
	var dbname string
	require.NoError(t, bd.pool.QueryRow(ctx, "SELECT current_database()").Scan(&dbname))
	cfg, err := ParseConfig(pgtest.WithParam(pgtest.WithParam(bd.db.URL, "user", role), "dbname", dbname))
	require.NoError(t, err)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	defer pool.Close()
	var timeout string
	require.NoError(t, pool.QueryRow(ctx, "SHOW idle_in_transaction_session_timeout").Scan(&timeout))
	require.Equal(t, "500ms", timeout)

	s, err := NewSession(ctx, pool, SessionConfig{Job: "idle", CheckpointSchema: bd.db.Schema,
		Guards: Guards{IdleInTransactionTimeout: -1}}) // keep the role's 500 ms
	require.NoError(t, err)
	defer s.Close(ctx)
	sampler := sampleIdle(t, bd.pool, "pgetl idle", 20*time.Millisecond)
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitInterval: time.Second})
	require.NoError(t, err)
	for i := int64(1); i <= 4; i++ {
		require.NoError(t, b.Add(ctx, fmt.Sprint(i), itemRow(i)...))
		seen := sampler.samples.Load()
		time.Sleep(2 * time.Second) // the slow source (this is the test's workload, not a wait)
		// The sampler looked during the pause: a sample begun after Add returned
		// (the first one counted may have begun before) ended before the next Add.
		require.True(t, poll(t, 30*time.Second, func() bool { return sampler.samples.Load() >= seen+2 }),
			"no sample during pause %d", i)
	}
	require.NoError(t, b.Close(ctx))
	sampler.Stop()
	bd.requireExactly(t, 4)
	require.Zero(t, s.Stat().TotalRetries(), "no 25P03 or other retry: %v", s.Stat().Retries())
	require.Zero(t, sampler.idle.Load(), "samples with the job idle in transaction")
	require.GreaterOrEqual(t, s.Stat().Batches(), int64(3), "CommitInterval commits while the source is slow")
}

// TestBatchConnectionLifetime: with MaxConnLifetime 1 s, a job's batches move to new
// backends between batches, never within one. Each round commits a few batches, then
// waits until the pool has retired (by lifetime) every backend they ran on, so the
// next round must run on new ones: a session that kept its connection across
// batches would never let that happen.
func TestBatchConnectionLifetime(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(bd.db.URL)
	require.NoError(t, err)
	cfg.MaxConnLifetime, cfg.MaxConnLifetimeJitter, cfg.MaxConns = time.Second, 0, 2
	cfg.HealthCheckPeriod = 50 * time.Millisecond // retires expired idle connections
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	defer pool.Close()
	var mu sync.Mutex
	conns := map[int64][]*pgconn.PgConn{} // per batch, guarded by mu
	s, err := NewSession(ctx, pool, SessionConfig{Job: "lifetime", CheckpointSchema: bd.db.Schema,
		beforeCommit: func(_ context.Context, seq int64, _ int, c *pgconn.PgConn) {
			mu.Lock()
			conns[seq] = append(conns[seq], c)
			mu.Unlock()
		}})
	require.NoError(t, err)
	defer s.Close(ctx)
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 100})
	require.NoError(t, err)
	const rounds, perRound = 4, 3
	next := int64(1)
	retired := map[*pgconn.PgConn]bool{}
	for r := range rounds {
		mu.Lock()
		before := len(conns)
		mu.Unlock()
		require.NoError(t, load(ctx, b, next, next+perRound*100-1))
		next += perRound * 100
		require.NoError(t, b.Flush(ctx))
		mu.Lock()
		used := map[*pgconn.PgConn]uint32{}
		for seq, cs := range conns {
			require.Len(t, cs, 1, "batch %d ran on one connection", seq)
			if seq > int64(before) {
				require.False(t, retired[cs[0]], "round %d: batch %d ran on a retired connection", r, seq)
				used[cs[0]] = cs[0].PID()
			}
		}
		mu.Unlock()
		require.NotEmpty(t, used)
		require.True(t, poll(t, 30*time.Second, func() bool {
			for _, pid := range used {
				if bd.db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid) > 0 {
					return false
				}
			}
			return true
		}), "round %d: the pool did not retire the backends %v", r, used)
		for c := range used {
			retired[c] = true
		}
	}
	require.NoError(t, b.Close(ctx))
	bd.requireExactly(t, next-1)
	require.GreaterOrEqual(t, len(retired), rounds, "a new backend each round")
	t.Logf("%d batches on %d backends; pool retired %d by lifetime", len(conns), len(retired), pool.Stat().MaxLifetimeDestroyCount())
}

// TestBatchLockTimeoutGuard: a batch that waits on a lock held elsewhere trips the
// lock_timeout guard, is retried a bounded number of times, and fails classified;
// committed batches stay.
func TestBatchLockTimeoutGuard(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	var retries atomic.Int64
	s := bd.session(t, "locked", func(c *SessionConfig) {
		c.Guards.LockTimeout = 200 * time.Millisecond
		c.Retry.MaxAttempts = 3
		c.OnRetryFunc = func(e RetryEvent) { retries.Add(1) }
	})
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 10})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 10))
	require.NoError(t, b.Flush(ctx))

	tx, err := bd.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, "LOCK TABLE "+bd.table+" IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)

	require.NoError(t, load(ctx, b, 11, 15))
	err = b.Flush(ctx)
	require.ErrorIs(t, err, ErrRetriesExhausted)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "55P03", pgErr.Code)
	require.Equal(t, int64(2), retries.Load())
	require.Equal(t, int64(2), s.Stat().Retries()["lock_timeout"])
	require.NoError(t, tx.Rollback(ctx))
	bd.requireExactly(t, 10)
	require.ErrorIs(t, b.Add(ctx, "16", itemRow(16)...), ErrRetriesExhausted, "the failure is sticky")
	require.ErrorIs(t, b.Close(ctx), ErrRetriesExhausted)
}

// TestBatchStatementTimeoutGuard: the statement_timeout guard bounds a batch stuck
// behind a lock without a lock_timeout.
func TestBatchStatementTimeoutGuard(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "stmt", func(c *SessionConfig) {
		c.Guards.LockTimeout, c.Guards.StatementTimeout = -1, 300*time.Millisecond
		c.Retry.MaxAttempts = 2
	})
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	tx, err := bd.pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, "LOCK TABLE "+bd.table+" IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 5))
	err = b.Flush(ctx)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "57014", pgErr.Code, "query_canceled by statement_timeout is not retried")
	var berr *BatchError
	require.ErrorAs(t, err, &berr)
	require.Equal(t, int64(1), berr.Seq)
	require.NoError(t, tx.Rollback(ctx))
	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
}

// TestBatchCancelMidFlush: canceling the caller's context during a flush returns the
// context's error, rolls back, and leaves no connection busy.
func TestBatchCancelMidFlush(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "cancel")
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
	require.NoError(t, err)
	tx, err := bd.pool.Begin(ctx)
	require.NoError(t, err)
	_, err = tx.Exec(ctx, "LOCK TABLE "+bd.table+" IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, 1, 5))
	cctx, cancel := context.WithCancel(ctx)
	go func() {
		poll(t, 10*time.Second, func() bool {
			return bd.db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE 'pgetl cancel%'") > 0
		})
		cancel()
	}()
	err = b.Flush(cctx)
	require.ErrorIs(t, err, context.Canceled)
	require.NoError(t, tx.Rollback(ctx))
	require.True(t, poll(t, 10*time.Second, func() bool {
		return bd.db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgetl cancel%'") == 0
	}), "no backend of the job remains")
	require.True(t, poll(t, 5*time.Second, func() bool { return bd.pool.Stat().AcquiredConns() == 0 }), "acquired: %d", bd.pool.Stat().AcquiredConns())
	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
	require.ErrorIs(t, b.Close(ctx), context.Canceled)
}
