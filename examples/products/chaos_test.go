package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// TestChaosKill runs the job as a subprocess and SIGKILLs it at random points, up
// to three times per seed, then lets a final run (claiming the dead run's job)
// finish: the table must equal the generator's rows exactly, each once, whatever
// the kill points were (in a batch's COPY, around its COMMIT, between batches).
func TestChaosKill(t *testing.T) {
	base := pgtest.URL(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "products")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	e := &e2e{bin: bin, baseURL: base}
	for seed := uint64(1); seed <= 5; seed++ {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(seed, 42))
			db := pgtest.New(t)
			job := "chaos-" + db.Schema
			args := []string{"-job", job, "-rows", fmt.Sprint(e2eRows), "-page-size", "100", "-page-delay", "3ms",
				"-commit-rows", fmt.Sprint(500 + rng.IntN(1500)), "-api-faults", "0.05", "-lease", "2s"}
			kills := 0
			for range 3 {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				cmd, _, _ := e.command(ctx, db.Schema, append(args, "-takeover")...)
				require.NoError(t, cmd.Start())
				after := time.Duration(200+rng.IntN(1500)) * time.Millisecond
				done := make(chan error, 1)
				go func() { done <- cmd.Wait() }()
				finished := false
				select {
				case <-done: // finished before its kill point
					finished = true
				case <-time.After(after): // the fault's timing, not a wait for a condition
					_ = cmd.Process.Signal(syscall.SIGKILL)
					<-done
					kills++
				}
				cancel()
				if finished {
					break
				}
			}
			require.Positive(t, kills, "the job must have been killed at least once")
			r := e.run(t, db.Schema, append(args, "-takeover", "-page-delay", "0")...)
			require.Equal(t, 0, r.code, "%s", r)
			requireTable(t, db, e2eRows, 1)
			cp, err := pgetl.ReadCheckpoint(context.Background(), db.Pool, db.Schema, job)
			require.NoError(t, err)
			require.True(t, cp.Finished)
			require.Equal(t, int64(e2eRows), cp.Rows, "the checkpoint counts each row once")
			t.Logf("seed %d: %d kills, final checkpoint %+v", seed, kills, cp)
		})
	}
}
