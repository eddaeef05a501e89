package pgetl

// PgBouncer in transaction mode (issue 9): a PgBouncer of the fault kit in front of
// the test database, with a server pool smaller than the clients' connections. Two
// jobs share it concurrently; a restart of PgBouncer mid-job (SIGTERM: immediate
// shutdown; SIGINT: safe shutdown, which lets the transaction in progress finish) is
// survived. Table names are qualified and CheckpointSchema set, since the test
// schema's search_path cannot travel in the startup packet through PgBouncer.

import (
	"context"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/stretchr/testify/require"
)

// bouncerFor starts a PgBouncer in front of bd's server and returns the connection
// string of bd's database through it, for pgetl (pgetl_pooler=pgbouncer).
func bouncerFor(t *testing.T, bd *bundle) (*faults.PgBouncer, string) {
	t.Helper()
	host, port, err := net.SplitHostPort(faults.TCPAddr(t, bd.db.URL))
	require.NoError(t, err)
	p, err := strconv.Atoi(port)
	require.NoError(t, err)
	pgb := faults.NewPgBouncer(t, host, p, faults.PgBouncerSetting("default_pool_size", "2"))
	var dbname string
	require.NoError(t, bd.pool.QueryRow(context.Background(), "SELECT current_database()").Scan(&dbname))
	return pgb, pgb.URL(dbname) + "&pgetl_pooler=pgbouncer&connect_timeout=2"
}

func TestFaultPgBouncer(t *testing.T) {
	t.Parallel()
	retry := RetryPolicy{MaxAttempts: 40, MaxElapsed: 30 * time.Second, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}

	t.Run("two_jobs", func(t *testing.T) {
		t.Parallel()
		const n = 30_000
		bd := setupItems(t)
		ctx := context.Background()
		bd.db.Exec(t, "CREATE TABLE items2 (LIKE items INCLUDING ALL)")
		bd2 := &bundle{db: bd.db, pool: bd.pool, table: bd.db.Schema + ".items2"}
		_, url := bouncerFor(t, bd)
		pool := faultPool(t, url)
		sampler := faults.SampleActivity(t, bd.db.URL, "pgetl pgb-", 10*time.Millisecond)
		var res []<-chan error
		var sessions []*Session
		for i, b := range []*bundle{bd, bd2} {
			s, err := NewSession(ctx, pool, SessionConfig{Job: "pgb-" + strconv.Itoa(i), CheckpointSchema: bd.db.Schema, Retry: retry})
			require.NoError(t, err)
			t.Cleanup(func() { _ = s.Close(context.Background()) })
			sessions = append(sessions, s)
			res = append(res, goJob(func() error {
				return loadJob(ctx, s, BatchConfig{Table: b.table, Columns: itemCols, CommitRows: 1000}, 1, n, nil)
			}))
		}
		for _, r := range res {
			require.NoError(t, waitJob(t, r, 90*time.Second))
		}
		sampler.Stop()
		for i, b := range []*bundle{bd, bd2} {
			b.requireExactly(t, n)
			requireCheckpoint(t, bd.pool, bd.db.Schema, "pgb-"+strconv.Itoa(i), strconv.Itoa(n), n, 0)
			require.Zero(t, sessions[i].Stat().TotalRetries(), "%v", sessions[i].Stat().Retries())
		}
		requireNoIdleInTx(t, sampler, 0)
	})

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run("restart_"+sig.String(), func(t *testing.T) {
			t.Parallel()
			const n, commitRows, target = 30_000, 1_000, 4
			bd := setupItems(t)
			ctx := context.Background()
			pgb, url := bouncerFor(t, bd)
			pool := faultPool(t, url)
			job := "pgb-restart"
			tr := newTrigger(t)
			s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema, Retry: retry,
				beforeCommit: func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
					if seq == target && attempt == 1 {
						tr.pull(seq)
					}
				}})
			require.NoError(t, err)
			t.Cleanup(func() { _ = s.Close(context.Background()) })
			sampler := faults.SampleActivity(t, bd.db.URL, "pgetl "+job+"#", 10*time.Millisecond)
			res := goJob(func() error {
				return loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: commitRows, CommitInterval: -1}, 1, n, nil)
			})
			tr.wait(t, res, 30*time.Second)
			tr.release()
			t0 := time.Now()
			pgb.Restart(t, sig)
			t.Logf("pgbouncer %v + start took %v", sig, time.Since(t0).Round(time.Millisecond))
			require.NoError(t, waitJob(t, res, 60*time.Second))
			t.Logf("job done %v after the restart began; retries %v", time.Since(t0).Round(time.Millisecond), s.Stat().Retries())
			sampler.Stop()
			bd.requireExactly(t, n)
			requireCheckpoint(t, bd.pool, bd.db.Schema, job, strconv.Itoa(n), n, 0)
			requireNoIdleInTx(t, sampler, 0)
		})
	}
}
