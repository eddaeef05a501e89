package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

// TestOrdersChaosKill runs the job as a subprocess and SIGKILLs it at random points,
// up to three times per seed, then lets a final run (taking over the dead run's
// job) finish: customers, orders and order_lines must equal the generator's lines
// exactly, each once, and the reject table must hold exactly the bad lines,
// whatever the kill points were (in a batch, around its COMMIT, between batches,
// in the middle of an order whose header a resumed run then adds again).
func TestOrdersChaosKill(t *testing.T) {
	e := newE2E(t)
	for seed := uint64(1); seed <= 5; seed++ {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(seed, 15))
			db := pgtest.New(t)
			loadProducts(t, db, e2eProducts)
			const n = 40_000
			o := workload.Orders{N: n, Products: e2eProducts, BadEvery: int64(50 + rng.IntN(100))}
			job := "chaos"
			args := []string{"-job", job, "-rows", strconv.Itoa(n), "-products", strconv.Itoa(e2eProducts),
				"-bad-every", strconv.FormatInt(o.BadEvery, 10), "-commit-rows", fmt.Sprint(500 + rng.IntN(2500)), "-lease", "2s", "-takeover"}
			kills := 0
			window := 650
			for attempt := 0; kills == 0; attempt++ {
				if attempt > 0 {
					// Every run finished before its kill point (a quiet machine): start
					// the seed over in a fresh schema with kill points twice as early.
					require.Less(t, attempt, 5, "the job must have been killed at least once")
					db = pgtest.New(t)
					loadProducts(t, db, e2eProducts)
					window /= 2
				}
				kills = e.killRuns(t, db, rng, window, args)
			}
			r := e.run(t, db.Schema, args...)
			require.Equal(t, 0, r.code, "%s", r)
			requireTables(t, db, o.Checksums(nil))
			bad := badLines(o)
			requireRejects(t, db, job, bad)
			requireFinished(t, db, job, n, len(bad))
			require.Zero(t, db.Int(t, `SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND application_name LIKE $1`, "pgetl "+job+"%"))
			cp, err := pgetl.ReadCheckpoint(context.Background(), db.Pool, db.Schema, job)
			require.NoError(t, err)
			t.Logf("seed %d: %d kills, bad every %d, final checkpoint seq %d rows %d rejects %d", seed, kills, o.BadEvery, cp.Seq, cp.Rows, cp.Rejects)
		})
	}
}

// killRuns starts the job (args) in db up to three times, each killed (SIGKILL) at
// a random point within its first window+50 ms unless it finished before, and
// returns how many runs were killed. A run of 40,000 lines can finish in under a
// second on a quiet machine.
func (e *e2e) killRuns(t *testing.T, db *pgtest.DB, rng *rand.Rand, window int, args []string) int {
	t.Helper()
	kills := 0
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		cmd, _, _ := e.command(ctx, db.Schema, args...)
		require.NoError(t, cmd.Start())
		after := time.Duration(50+rng.IntN(window)) * time.Millisecond
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done: // finished before its kill point
			cancel()
			require.NoError(t, err, "a run that was not killed must succeed")
			return kills
		case <-time.After(after): // the fault's timing, not a wait for a condition
			_ = cmd.Process.Signal(syscall.SIGKILL)
			<-done
			kills++
		}
		cancel()
	}
	return kills
}
