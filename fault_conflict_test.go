package pgetl

// Conflicts between two jobs (issue 9): a deadlock (40P01) between two upsert jobs
// that update overlapping keys in opposite orders, and serialization failures
// (40001) between two Session.Tx read-modify-write units at REPEATABLE READ and
// SERIALIZABLE. The interleavings are forced (a row lock held by the test; channels
// between the units), so the conflict happens on every run: the loser is retried
// and both complete with an exact result. How often a deadlock recurs on the
// loser's rerun is up to the scheduler, so the deadlock test counts at least one.

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

func TestFaultDeadlock(t *testing.T) {
	t.Parallel()
	const k, m = 2_000, 1_000 // keys 1..k exist; the test holds key m
	bd := setupItems(t)
	ctx := context.Background()
	bd.db.Exec(t, `INSERT INTO items SELECT i, 'old', 0, 0, now() FROM generate_series(1, $1::int) i`, k)
	blocker, err := bd.pool.Begin(ctx)
	require.NoError(t, err)
	defer blocker.Rollback(ctx)
	_, err = blocker.Exec(ctx, "SELECT FROM items WHERE id = $1 FOR UPDATE", m)
	require.NoError(t, err)

	retry := RetryPolicy{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	jobs := map[string][2]int64{"dl-up": {1, k}, "dl-down": {k, 1}}
	sessions := map[string]*Session{}
	res := map[string]<-chan error{}
	for job, r := range jobs {
		s := bd.session(t, job, func(c *SessionConfig) { c.Retry = retry })
		sessions[job] = s
		res[job] = goJob(func() error {
			b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Key: []string{"id"}, CommitRows: k + 1})
			if err != nil {
				return err
			}
			step := int64(1)
			if r[0] > r[1] {
				step = -1
			}
			for i := r[0]; ; i += step {
				if err := b.Add(ctx, strconv.FormatInt(i, 10), itemRow(i)...); err != nil {
					return err
				}
				if i == r[1] {
					break
				}
			}
			return b.Close(ctx)
		})
	}
	// Both merges wait for key m: one holds 1..m-1, the other m+1..k.
	require.True(t, poll(t, 20*time.Second, func() bool {
		return bd.db.Int(t, `SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE 'pgetl dl-%'`) == 2
	}), "both jobs wait for the held key")
	require.NoError(t, blocker.Commit(ctx))
	for job := range jobs {
		require.NoError(t, waitJob(t, res[job], 60*time.Second), job)
	}
	bd.requireExactly(t, k)
	// The forced interleaving guarantees one deadlock, not how many: the loser's
	// rerun starts again from its own end and can meet the winner, still on its way
	// there, in the middle, and either may lose that second one. So: at least one
	// deadlock, every retry a deadlock's, and an exact result.
	var deadlocks, retries int64
	for job, s := range sessions {
		st := s.Stat()
		t.Logf("%s: retries %v", job, st.Retries())
		deadlocks += st.Retries()["deadlock"]
		retries += st.TotalRetries()
		last := strconv.FormatInt(jobs[job][1], 10)
		requireCheckpoint(t, bd.pool, bd.db.Schema, job, last, k, 0)
	}
	require.Positive(t, deadlocks, "the deadlock was retried")
	require.Equal(t, deadlocks, retries, "every retry was a deadlock's")
}

func TestFaultSerialization(t *testing.T) {
	t.Parallel()
	for _, level := range []string{"REPEATABLE READ", "SERIALIZABLE"} {
		t.Run(level, func(t *testing.T) {
			t.Parallel()
			bd := setupItems(t)
			ctx := context.Background()
			bd.db.Exec(t, "CREATE TABLE counters (k int PRIMARY KEY, v bigint NOT NULL); INSERT INTO counters VALUES (1, 0), (2, 0)")
			retry := RetryPolicy{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
			s1 := bd.session(t, "ser-1", func(c *SessionConfig) { c.Retry = retry })
			s2 := bd.session(t, "ser-2", func(c *SessionConfig) { c.Retry = retry })
			// REPEATABLE READ: both read row 1 and write it (lost update → 40001).
			// SERIALIZABLE: both read rows 1 and 2, each writes its own row with the
			// sum read + 1 (write skew → 40001).
			own := map[*Session]int{s1: 1, s2: 1}
			if level == "SERIALIZABLE" {
				own[s2] = 2
			}
			read1, read2, done1 := make(chan struct{}), make(chan struct{}), make(chan struct{})
			var calls1, calls2 int // each written by its unit's goroutine only
			txOpts := pgx.TxOptions{IsoLevel: pgx.TxIsoLevel(strings.ToLower(level))}
			unit := func(s *Session, calls *int, readDone chan struct{}, wait chan struct{}) func(pgx.Tx) error {
				return func(tx pgx.Tx) error {
					*calls++
					var sum int64
					if err := tx.QueryRow(ctx, "SELECT sum(v)::bigint FROM counters").Scan(&sum); err != nil {
						return err
					}
					if *calls == 1 {
						close(readDone)
						select {
						case <-wait:
						case <-time.After(20 * time.Second):
						}
					}
					_, err := tx.Exec(ctx, "UPDATE counters SET v = $1 WHERE k = $2", sum+1, own[s])
					return err
				}
			}
			r1 := goJob(func() error {
				defer close(done1)
				return s1.TxWithOptions(ctx, txOpts, unit(s1, &calls1, read1, read2))
			})
			r2 := goJob(func() error { return s2.TxWithOptions(ctx, txOpts, unit(s2, &calls2, read2, done1)) })
			require.NoError(t, waitJob(t, r1, 30*time.Second))
			require.NoError(t, waitJob(t, r2, 30*time.Second))
			t.Logf("retries: s1 %v, s2 %v", s1.Stat().Retries(), s2.Stat().Retries())
			require.Equal(t, 1, calls1)
			require.Equal(t, 2, calls2, "the loser ran again, once")
			require.Equal(t, int64(1), s2.Stat().Retries()["serialization"], "%v", s2.Stat().Retries())
			require.Zero(t, s1.Stat().TotalRetries())
			if level == "REPEATABLE READ" {
				require.Equal(t, int64(2), bd.db.Int(t, "SELECT v FROM counters WHERE k = 1"), "no lost update")
			} else {
				// Serial orders give (1, 2) or (2, 1); the anomaly would give (1, 1).
				require.Equal(t, int64(1), bd.db.Int(t, "SELECT v FROM counters WHERE k = 1"))
				require.Equal(t, int64(2), bd.db.Int(t, "SELECT v FROM counters WHERE k = 2"))
			}
		})
	}
}
