package faultsuite_test

// Exactly once with four batches in flight (issue 17, "Tests"): a job of 30,000
// items in batches of 500 rows (BatchConfig.InFlight 4, three rows refused by the
// server's CHECK and rejected to the reject table) under each fault of the suite,
// struck while four batches are in flight:
//
//   - terminate: the test holds a SHARE lock on the target table, so that the
//     batches in flight stop on the server (the first at its COPY, the others at
//     their fences behind it); once four backends of the job are active, all four
//     are terminated (pg_terminate_backend), then the lock is released.
//   - lost_reply: the same four stopped batches; the proxy then loses every reply
//     and the lock is released, so all four COMMIT on the server without the client
//     hearing; once the checkpoint shows the last of them committed, the toxic is
//     removed, which cuts every connection. The four are in doubt and must all be
//     found committed, none replayed.
//   - reset_copy: batch 12 is held before it sends (beforeCommit hook) until the
//     three after it wait at their fences on the server; then a one-shot toxic
//     resets (RST) the first connection to pass 20 kB upstream, which is batch 12's,
//     in the middle of its COPY data (a batch is about 35 kB).
//   - server_restart (on a throwaway cluster, as the core module's server fault
//     tests do): the four stopped batches, then pg_ctl restart -m fast.
//
// Each test checks the invariant (every source row exactly once, the rejects
// exact, the final checkpoint) and the order: a monitor samples the checkpoint and
// the committed rows in one snapshot from its own connection every 5 ms and checks
// that the cursor only moves forward and always matches the rows committed (see
// ordering_test.go), and OnCommitFunc sees the batches in order.

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/pgetl/pgetl/internal/testhook"
	"github.com/pgetl/pgetl/internal/testkit/faultproxy"
	"github.com/stretchr/testify/require"
)

// The job of the in-flight fault tests.
const (
	ifK          = 4      // BatchConfig.InFlight
	ifN          = 30_000 // source rows
	ifCommitRows = 500    // rows per batch: 60 batches
	ifTarget     = 12     // the batch whose attempt 1 triggers the fault
)

// ifBad are the source rows whose price violates the CHECK: found by the server,
// isolated by bisection, rejected to the table.
var ifBad = []int64{777, 9_999, 29_001}

// ifRowsSQL returns what the monitor compares the checkpoint with: the items'
// count, sum and max of ids in table.
func ifRowsSQL(table string) string {
	return "SELECT count(*), coalesce(sum(id), 0)::bigint, coalesce(max(id), 0) FROM " + table
}

// inflightJob is one run of the job under a fault.
type inflightJob struct {
	job      string
	schema   string // the checkpoint schema
	table    string // the target table, qualified
	pool     *pgxpool.Pool
	admin    *pgxpool.Pool // direct to the server: checks and faults
	s        *pgetl.Session
	tr       *trigger
	attempts [ifN/ifCommitRows + 1]atomic.Int64 // attempts per batch seq
	order    commitOrder
	mon      *cpMonitor
	sampler  *faults.Sampler
	res      <-chan error
}

// startInflight starts the job on pool (through which the faults strike) with the
// checkpoint in schema; admin and adminURL reach the same server directly.
func startInflight(t *testing.T, job, schema, table string, pool, admin *pgxpool.Pool, adminURL string) *inflightJob {
	t.Helper()
	ctx := context.Background()
	j := &inflightJob{job: job, schema: schema, table: table, pool: pool, admin: admin, tr: newTrigger(t),
		order: commitOrder{contiguous: true}}
	hooked := testhook.WithBeforeCommit(ctx, func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
		if seq > 0 && seq < int64(len(j.attempts)) {
			j.attempts[seq].Add(1)
		}
		if seq == ifTarget && attempt == 1 {
			j.tr.pull(seq)
		}
	})
	s, err := pgetl.NewSession(hooked, pool, pgetl.SessionConfig{Job: job, CheckpointSchema: schema,
		Retry: pgetl.RetryPolicy{MaxAttempts: 20, InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	j.s = s
	j.mon = startMonitor(t, adminURL, schema, job, ifRowsSQL(table), ifBad)
	j.sampler = faults.SampleActivity(t, adminURL, "pgetl "+job+"#", 10*time.Millisecond)
	bad := map[int64]bool{}
	for _, b := range ifBad {
		bad[b] = true
	}
	j.res = goJob(func() error {
		return loadJob(ctx, s, pgetl.BatchConfig{Table: table, Columns: itemCols, CommitRows: ifCommitRows, CommitInterval: -1,
			InFlight: ifK, Rejects: pgetl.RejectToTable, OnCommitFunc: j.order.onCommit}, 1, ifN, bad)
	})
	return j
}

// active returns the batch sequences of the job's backends running a statement on
// the server, sorted.
func (j *inflightJob) active(t *testing.T) []int64 {
	t.Helper()
	rows, err := j.admin.Query(context.Background(), `SELECT application_name FROM pg_stat_activity
		WHERE application_name LIKE $1 AND state = 'active'`, "pgetl "+j.job+"#%")
	require.NoError(t, err)
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	var seqs []int64
	for _, name := range names {
		// "pgetl <job>#<seq>.<owner token>"
		_, rest, _ := strings.Cut(name, "#")
		seqStr, _, _ := strings.Cut(rest, ".")
		seq, err := strconv.ParseInt(seqStr, 10, 64)
		require.NoError(t, err, "application_name %q", name)
		seqs = append(seqs, seq)
	}
	slices.Sort(seqs)
	return seqs
}

// waitActive waits until want backends of the job are active and returns their
// batch sequences.
func (j *inflightJob) waitActive(t *testing.T, want int, ok func([]int64) bool) []int64 {
	t.Helper()
	var seqs []int64
	require.True(t, poll(t, 30*time.Second, func() bool {
		seqs = j.active(t)
		return len(seqs) == want && (ok == nil || ok(seqs))
	}), "want %d batches of the job active on the server, have %v", want, seqs)
	return seqs
}

// stopFour waits for batch ifTarget's hook, takes a SHARE lock on the target table
// in a transaction of admin, lets the job go on and waits until four batches are
// active on the server: stopped by the lock (the first at its COPY, the others at
// their fences). It returns the lock's transaction and the four sequences.
func (j *inflightJob) stopFour(t *testing.T) (pgx.Tx, []int64) {
	t.Helper()
	ctx := context.Background()
	j.tr.wait(t, j.res, 30*time.Second)
	j.mon.waitSample(t)
	lock, err := j.admin.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = lock.Rollback(context.Background()) })
	_, err = lock.Exec(ctx, "LOCK TABLE "+j.table+" IN SHARE MODE")
	require.NoError(t, err)
	j.tr.release()
	seqs := j.waitActive(t, ifK, func(seqs []int64) bool { return seqs[len(seqs)-1]-seqs[0] == ifK-1 })
	t.Logf("batches %v in flight, stopped by the lock", seqs)
	return lock, seqs
}

// finish waits for the job and checks the invariant and the order; it returns the
// session's stats.
func (j *inflightJob) finish(t *testing.T) pgetl.Stat {
	t.Helper()
	start := time.Now()
	err := waitJob(t, j.res, 60*time.Second)
	st := j.s.Stat()
	t.Logf("job ended %v after the fault: err %v; retries %v, failed attempts %d", time.Since(start).Round(time.Millisecond), err, st.Retries(), failedAttempts(st))
	require.NoError(t, err)
	j.sampler.Stop()
	last := j.mon.require(t, 3)
	bd := &bundle{pool: j.admin, table: j.table}
	bd.requireExactly(t, ifN, ifBad...)
	cp := requireCheckpoint(t, j.admin, j.schema, j.job, strconv.Itoa(ifN), ifN-int64(len(ifBad)), int64(len(ifBad)))
	require.Equal(t, cp.Seq, last.seq, "the monitor's last sample is the final checkpoint")
	requireRejects(t, j.admin, j.schema, j.job, ifBad)
	j.order.require(t, cp.Seq)
	requireNoIdleInTx(t, j.sampler, 500*time.Millisecond)
	return st
}

// proxied sets up the items table on the shared server, a proxy in front of it and
// a pool of 8 connections through the proxy.
func proxied(t *testing.T) (*bundle, *faultproxy.Proxy, *pgxpool.Pool) {
	t.Helper()
	bd := setupItems(t)
	px := faultproxy.NewProxy(t, faults.TCPAddr(t, bd.db.URL))
	pool := faultPool(t, px.URL(bd.db.URL), func(c *pgxpool.Config) { c.MaxConns = 8 })
	return bd, px, pool
}

func TestFaultInFlightTerminate(t *testing.T) {
	t.Parallel()
	bd, _, pool := proxied(t)
	ctx := context.Background()
	j := startInflight(t, "inflight-terminate", bd.db.Schema, bd.table, pool, bd.db.Pool, bd.db.URL)
	lock, seqs := j.stopFour(t)
	var pids []int32
	require.NoError(t, bd.db.Pool.QueryRow(ctx, `SELECT coalesce(array_agg(pid) FILTER (WHERE ok), '{}') FROM (
		SELECT pid, pg_terminate_backend(pid) AS ok FROM pg_stat_activity
		WHERE application_name LIKE $1 AND state = 'active') s`, "pgetl "+j.job+"#%").Scan(&pids))
	killed := int64(len(pids))
	require.Equal(t, int64(ifK), killed, "the four batches in flight were terminated")
	// Their backends are gone before the lock goes: none of them can commit (their
	// replays wait for the lock like they did).
	require.True(t, poll(t, 30*time.Second, func() bool {
		return bd.db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY ($1)", pids) == 0
	}), "terminated backends %v still there", pids)
	require.NoError(t, lock.Rollback(ctx))
	st := j.finish(t)
	for _, seq := range seqs {
		require.GreaterOrEqual(t, j.attempts[seq].Load(), int64(2), "batch %d was replayed", seq)
	}
	require.Zero(t, st.Retries()["in_doubt_committed"], "no terminated batch committed: %v", st.Retries())
	require.GreaterOrEqual(t, failedAttempts(st), int64(1))
	require.LessOrEqual(t, failedAttempts(st), killed, "failed attempts ≤ backends terminated: %v", st.Retries())
}

func TestFaultInFlightLostReply(t *testing.T) {
	t.Parallel()
	bd, px, pool := proxied(t)
	ctx := context.Background()
	j := startInflight(t, "inflight-lost-reply", bd.db.Schema, bd.table, pool, bd.db.Pool, bd.db.URL)
	lock, seqs := j.stopFour(t)
	toxic := px.LoseReplies(t)
	require.NoError(t, lock.Rollback(ctx))
	// All four commit on the server; the client hears of none.
	last := seqs[len(seqs)-1]
	require.True(t, poll(t, 30*time.Second, func() bool {
		cp, err := pgetl.ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, j.job)
		return err == nil && cp.Seq >= last
	}), "batches %v did not commit on the server", seqs)
	cp, err := pgetl.ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, j.job)
	require.NoError(t, err)
	require.Equal(t, last, cp.Seq, "nothing beyond the four in flight committed while their replies were lost")
	px.Remove(t, toxic) // cuts every proxied connection
	st := j.finish(t)
	for _, seq := range seqs {
		require.Equal(t, int64(1), j.attempts[seq].Load(), "batch %d, found committed, was not replayed", seq)
	}
	require.Equal(t, int64(ifK), st.Retries()["in_doubt_committed"], "the four batches were found committed: %v", st.Retries())
	require.Equal(t, int64(ifK), failedAttempts(st), "no other attempt failed: %v", st.Retries())
}

func TestFaultInFlightResetCopy(t *testing.T) {
	t.Parallel()
	bd, px, pool := proxied(t)
	j := startInflight(t, "inflight-reset-copy", bd.db.Schema, bd.table, pool, bd.db.Pool, bd.db.URL)
	j.tr.wait(t, j.res, 30*time.Second)
	j.mon.waitSample(t)
	// Batch 12 holds its connection, not yet sent; the three after it are sent and
	// wait at their fences on the server.
	seqs := j.waitActive(t, ifK-1, func(seqs []int64) bool { return seqs[0] == ifTarget+1 })
	t.Logf("batches %v wait at their fences for batch %d", seqs, ifTarget)
	toxic := px.CutOnce(t, faultproxy.Upstream, 20_000, true)
	j.tr.release()
	st := j.finish(t)
	require.True(t, px.Fired(toxic), "the reset struck")
	require.GreaterOrEqual(t, j.attempts[ifTarget].Load(), int64(2), "batch %d, reset mid-COPY, was replayed", ifTarget)
	require.Zero(t, st.Retries()["in_doubt_committed"], "%v", st.Retries())
	require.GreaterOrEqual(t, failedAttempts(st), int64(1))
	// The reset batch, and at most the three waiting behind it.
	require.LessOrEqual(t, failedAttempts(st), int64(ifK), "%v", st.Retries())
}

func TestFaultInFlightServerRestart(t *testing.T) {
	t.Parallel()
	c := faults.NewCluster(t)
	ctx := context.Background()
	admin := faultPool(t, c.URL())
	_, err := admin.Exec(ctx, `CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL,
		price numeric(12,2) NOT NULL CHECK (price >= 0), qty int NOT NULL, at timestamptz NOT NULL)`)
	require.NoError(t, err)
	pool := faultPool(t, c.URL()+"&connect_timeout=2", func(cfg *pgxpool.Config) { cfg.MaxConns = 8 })
	j := startInflight(t, "inflight-restart", pgetl.CheckpointSchemaDefault, "public.items", pool, admin, c.URL())
	_, seqs := j.stopFour(t)
	t0 := time.Now()
	c.Restart(t) // terminates the four and the lock's holder
	t.Logf("pg_ctl restart -m fast with batches %v in flight took %v", seqs, time.Since(t0).Round(time.Millisecond))
	st := j.finish(t)
	for _, seq := range seqs {
		require.GreaterOrEqual(t, j.attempts[seq].Load(), int64(2), "batch %d was replayed", seq)
	}
	require.Zero(t, st.Retries()["in_doubt_committed"], "%v", st.Retries())
	require.GreaterOrEqual(t, failedAttempts(st), int64(1), "the restart was noticed")
}
