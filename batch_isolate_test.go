package pgetl

import (
	"context"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// badPositions returns k distinct rows of 1..n, drawn with a fixed seed.
func badPositions(n, k int64, seed uint64) []int64 {
	r := rand.New(rand.NewPCG(seed, seed))
	set := map[int64]bool{}
	for int64(len(set)) < k {
		set[1+r.Int64N(n)] = true
	}
	var out []int64
	for i := range set {
		out = append(out, i)
	}
	slices.Sort(out)
	return out
}

// byteCountConn counts the bytes written to a connection.
type byteCountConn struct {
	net.Conn
	n *atomic.Int64
}

func (c byteCountConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// batchWork loads rows 1..n of the items table in one batch (rows in bad violate the
// CHECK on price) and returns the bytes written to the server for it (every attempt,
// counted on the wire) and the round trips of the batch.
func batchWork(t *testing.T, bd *bundle, job string, n int64, bad []int64) (int64, int64) {
	ctx := context.Background()
	var wire atomic.Int64
	pool := faultPool(t, bd.db.URL, func(c *pgxpool.Config) {
		dial := c.ConnConfig.DialFunc
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return byteCountConn{Conn: conn, n: &wire}, nil
		}
	})
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	set := map[int64]bool{}
	for _, i := range bad {
		set[i] = true
	}
	w0 := wire.Load()
	err = loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: int(n), CommitInterval: -1,
		Rejects: RejectToTable}, 1, n, set)
	require.NoError(t, err)
	// Round trips: the batch's first message, then isolation's (bisection's probes
	// are counted apart and must not happen here).
	require.Zero(t, s.Stat().Retries()["bisect_probe"])
	return wire.Load() - w0, 1 + s.Stat().Retries()["isolate_round_trip"]
}

// TestBatchRejectIsolationWork: 1% bad rows at random positions in a 10,000-row batch
// cost less than 3x the bytes of the clean batch, and about one round trip per bad
// row at most (issue 13 item 6: each bad row used to cost a re-send of the batch).
func TestBatchRejectIsolationWork(t *testing.T) {
	t.Parallel()
	const n = 10_000
	for _, k := range []int64{1, 7, 100, 300} {
		t.Run("bad="+strconv.FormatInt(k, 10), func(t *testing.T) {
			t.Parallel()
			bd := setupItems(t)
			clean, cleanTrips := batchWork(t, bd, "clean", n, nil)
			require.Equal(t, int64(1), cleanTrips)
			bd.db.Exec(t, "TRUNCATE items")
			bad := badPositions(n, k, 42)
			sent, trips := batchWork(t, bd, "bad", n, bad)
			bd.requireExactly(t, n, bad...)
			requireRejects(t, bd.pool, bd.db.Schema, "bad", bad)
			requireCheckpoint(t, bd.pool, bd.db.Schema, "bad", strconv.Itoa(n), n-k, k)
			ratio := float64(sent) / float64(clean)
			t.Logf("%d bad rows in %d: %d bytes sent (%.2fx the clean batch's %d), %d round trips", k, n, sent, ratio, clean, trips)
			if k <= n/100 {
				require.Less(t, ratio, 3.0, "bytes sent for 1% bad rows")
			}
			require.LessOrEqual(t, trips, k+4, "round trips")
		})
	}
}

// TestBatchRejectIsolation: bad rows placed by COPY are isolated in one transaction
// for every COPY target: a plain insert with duplicate keys in the batch, an upsert
// through the staging table (a rejected row uncovers the earlier row of its key), an
// upsert with a key cache (known rows staged, new rows COPYed into the table).
func TestBatchRejectIsolation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const n = 4000
	bad := badPositions(n, 40, 7)
	isBad := map[int64]bool{}
	for _, i := range bad {
		isBad[i] = true
	}

	t.Run("insert-duplicates", func(t *testing.T) {
		t.Parallel()
		bd := setupItems(t)
		s := bd.session(t, "dups")
		b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: n, Rejects: RejectToTable})
		require.NoError(t, err)
		// Rows 2001..2040 repeat ids 1001..1040: one of each pair is rejected (23505).
		for i := int64(1); i <= n; i++ {
			r := itemRow(i)
			if isBad[i] {
				r[2] = "-1.00"
			}
			if i > 2000 && i <= 2040 {
				r = itemRow(i - 1000)
			}
			require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), r...))
		}
		require.NoError(t, b.Close(ctx))
		var rejected int64
		for _, i := range bad {
			if i <= 2000 || i > 2040 {
				rejected++
			}
		}
		cnt := bd.db.Int(t, "SELECT count(*) FROM items")
		rej := bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'dups'")
		dupRej := bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'dups' AND sqlstate = '23505'")
		require.Equal(t, int64(n), cnt+rej, "every row loaded or rejected")
		require.Equal(t, int64(n)-1000*0-int64(len(bad))-dupRej, cnt)
		// Each duplicate pair whose first row is good loses exactly one row.
		require.LessOrEqual(t, dupRej, int64(40))
		require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'dups' AND sqlstate NOT IN ('23505', '23514')"))
		require.Equal(t, rej-dupRej, rejected)
		cp, err := s.Checkpoint(ctx)
		require.NoError(t, err)
		require.Equal(t, cnt, cp.Rows)
		require.Equal(t, rej, cp.Rejects)
	})

	t.Run("upsert-stage", func(t *testing.T) {
		t.Parallel()
		bd := setupItems(t)
		s := bd.session(t, "stage")
		b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, CommitRows: 2 * n, Rejects: RejectToTable})
		require.NoError(t, err)
		// Every id twice: a first version, then the real row; the bad rows' second
		// version holds a NUL (refused by the staging table's COPY), so their first
		// version, otherwise merged away, must be loaded instead.
		for i := int64(1); i <= n; i++ {
			r := itemRow(i)
			r[1] = "first"
			require.NoError(t, b.Add(ctx, "a"+strconv.FormatInt(i, 10), r...))
		}
		for i := int64(1); i <= n; i++ {
			r := itemRow(i)
			if isBad[i] {
				r[1] = "nul\x00"
			}
			require.NoError(t, b.Add(ctx, "b"+strconv.FormatInt(i, 10), r...))
		}
		require.NoError(t, b.Close(ctx))
		require.Equal(t, int64(n), bd.db.Int(t, "SELECT count(*) FROM items"))
		require.Equal(t, int64(len(bad)), bd.db.Int(t, "SELECT count(*) FROM items WHERE name = 'first'"))
		require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM items WHERE name <> 'first' AND name <> 'item ' || id"))
		require.Equal(t, int64(len(bad)), bd.db.Int(t, "SELECT count(*) FROM reject WHERE job = 'stage' AND sqlstate = '22021'"))
		cp, err := s.Checkpoint(ctx)
		require.NoError(t, err)
		require.Equal(t, "b"+strconv.Itoa(n), cp.Cursor)
		require.Equal(t, int64(2*n-len(bad)), cp.Rows, "rows include those merged into a later row")
		require.Equal(t, int64(len(bad)), cp.Rejects)
	})

	t.Run("upsert-keycache", func(t *testing.T) {
		t.Parallel()
		bd := setupItems(t)
		pre := mustBatch(t, bd, "pre", BatchConfig{Table: bd.table, Columns: itemCols})
		require.NoError(t, load(ctx, pre, 1, n/2))
		require.NoError(t, pre.Close(ctx))
		kc, err := NewCache[int64, struct{}](CacheConfig{})
		require.NoError(t, err)
		for i := int64(1); i <= n/2; i++ {
			kc.Put(i, struct{}{})
		}
		s := bd.session(t, "kc")
		b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, KeyCache: kc, CommitRows: n, Rejects: RejectToTable})
		require.NoError(t, err)
		// Known rows (staged) fail on a NUL, new rows (COPYed into the table) on the
		// CHECK on price.
		for i := int64(1); i <= n; i++ {
			r := itemRow(i)
			if isBad[i] && i <= n/2 {
				r[1] = "nul\x00"
			} else if isBad[i] {
				r[2] = "-1.00"
			}
			require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), r...))
		}
		require.NoError(t, b.Close(ctx))
		require.Zero(t, s.Stat().Retries()["stale_key"])
		// The known bad rows keep their preloaded version; the new bad rows are absent.
		var newBad []int64
		for _, i := range bad {
			if i > n/2 {
				newBad = append(newBad, i)
			}
		}
		bd.requireExactly(t, n, newBad...)
		requireRejects(t, bd.pool, bd.db.Schema, "kc", bad)
		for i := int64(n/2 + 1); i <= n; i++ {
			if !isBad[i] {
				require.True(t, kc.HasKey(i), "new key %d published", i)
			}
		}
	})
}

func mustBatch(t *testing.T, bd *bundle, job string, cfg BatchConfig) *BatchSession {
	s := bd.session(t, job)
	b, err := s.Batch(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	return b
}

// TestBatchRejectIsolationMaxRejects: MaxRejects is checked as isolation finds bad
// rows; the batch that goes over commits nothing.
func TestBatchRejectIsolationMaxRejects(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	s := bd.session(t, "isomax")
	bad := map[int64]bool{}
	for _, i := range badPositions(10_000, 50, 3) {
		bad[i] = true
	}
	err := loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 10_000, Rejects: RejectToTable, MaxRejects: 10}, 1, 10_000, bad)
	require.ErrorIs(t, err, ErrTooManyRejects)
	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM items"))
	require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM reject"))
	trips := s.Stat().Retries()["isolate_round_trip"]
	require.LessOrEqual(t, trips, int64(3), "stopped at the first round trip that went over")
}

// TestBatchRejectIsolationInDoubt: the isolation transaction is one unit of work: a
// reply lost after its COMMIT ran, with the server briefly unreachable, is settled
// (here by the replay's fence), and the batch is neither lost nor loaded twice.
func TestBatchRejectIsolationInDoubt(t *testing.T) {
	t.Parallel()
	const n = 5000
	bd := setupItems(t)
	ctx := context.Background()
	g := newGate()
	pool := g.pool(t, bd.db.URL)
	job := "isodoubt"
	tr := newTrigger(t)
	var calls atomic.Int64
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
		Retry: RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: 1000},
		beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
			// Call 1: the batch's single message (it fails on the first bad row);
			// call 2: the isolation's COMMIT message.
			if calls.Add(1) == 2 {
				g.arm(pgc)
				tr.pull(seq)
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	bad := badPositions(n, 50, 11)
	set := map[int64]bool{}
	for _, i := range bad {
		set[i] = true
	}
	res := goJob(func() error {
		return loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: n, CommitInterval: -1, Rejects: RejectToTable}, 1, n, set)
	})
	tr.wait(t, res, 30*time.Second)
	tr.release()
	g.committedThenUnreachable(t, bd.db.Pool, bd.db.Schema, job, 1)
	g.reachableAfter(t, 2)
	require.NoError(t, waitJob(t, res, 60*time.Second))
	bd.requireExactly(t, n, bad...)
	requireRejects(t, bd.db.Pool, bd.db.Schema, job, bad)
	requireCheckpoint(t, bd.db.Pool, bd.db.Schema, job, strconv.Itoa(n), n-int64(len(bad)), int64(len(bad)))
	require.Equal(t, int64(1), s.Stat().Retries()["in_doubt_committed"], "%v", s.Stat().Retries())
}

// TestFaultDuringBisectRetryPolicy: bisection retries a probe whose connection was
// lost under the session's RetryPolicy: OnRetryFunc hears of it, and MaxElapsed bounds
// it (issue 13 item 8: bisect had a retry loop of its own that ignored both).
func TestFaultDuringBisectRetryPolicy(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		maxElapsed time.Duration
	}{{"on-retry", 0}, {"max-elapsed", time.Nanosecond}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n, badRow = 20_000, 19_000
			bd := setupItems(t)
			ctx := context.Background()
			job := "bisect-policy-" + tc.name
			var events []RetryEvent
			var mu sync.Mutex
			s := bd.session(t, job, func(c *SessionConfig) {
				c.Retry.MaxElapsed = tc.maxElapsed
				c.OnRetryFunc = func(e RetryEvent) {
					mu.Lock()
					events = append(events, e)
					mu.Unlock()
				}
			})
			// The CHECK fails only at the merge (no COPY line): the batch is bisected.
			res := goJob(func() error {
				return loadJob(ctx, s, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, CommitRows: n,
					Rejects: RejectToTable, CommitInterval: -1}, 1, n, map[int64]bool{badRow: true})
			})
			var killed int64
			var jobErr error
			done := false
			for deadline := time.Now().Add(30 * time.Second); killed == 0 && !done && time.Now().Before(deadline); {
				select {
				case jobErr = <-res:
					done = true
				default:
					killed = bd.db.Int(t, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
						WHERE application_name LIKE $1 AND state = 'active' AND query LIKE '%SET CONSTRAINTS ALL IMMEDIATE%'`, "pgetl "+job+"#%")
				}
			}
			require.Positive(t, killed, "the test must have terminated a probe (job ended first: %v, err %v)", done, jobErr)
			jobErr = waitJob(t, res, 60*time.Second)
			mu.Lock()
			defer mu.Unlock()
			if tc.maxElapsed > 0 {
				require.ErrorIs(t, jobErr, ErrRetriesExhausted, "MaxElapsed spent: the probe is not retried")
				require.Empty(t, events)
				return
			}
			require.NoError(t, jobErr)
			bd.requireExactly(t, n, badRow)
			require.NotEmpty(t, events, "OnRetryFunc hears of the probe's retry")
			require.Equal(t, int64(1), events[0].Seq)
			require.Equal(t, 1, events[0].Attempt)
		})
	}
}
