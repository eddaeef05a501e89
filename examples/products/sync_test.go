package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

// requireSynced checks that the products table of db holds exactly the rows
// 1..n of a sync source at version v with changedEvery and missingEvery, each once.
func requireSynced(t *testing.T, db *pgtest.DB, n, v, changedEvery, missingEvery int64) {
	t.Helper()
	wantN, wantSum := workload.SyncChecksum(n, v, changedEvery, missingEvery)
	count, sum, err := workload.QueryChecksum(context.Background(), db.Pool, db.Ident("products"))
	require.NoError(t, err)
	require.Equal(t, wantN, count, "row count")
	require.Equal(t, wantSum, sum, "checksum of the table's content")
	require.Equal(t, count, db.Int(t, "SELECT count(DISTINCT sku) FROM "+db.Ident("products")), "duplicate SKUs")
}

func buildJob(t *testing.T) *e2e {
	t.Helper()
	base := pgtest.URL(t)
	bin := filepath.Join(t.TempDir(), "products")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return &e2e{bin: bin, baseURL: base}
}

// TestSyncJob is the example at a twenty-fifth of its size: 20,000 rows at
// version 1, then -mode sync of 20,200 rows at version 2 for every 100th row,
// without every 200th: the table holds exactly those rows and the summary counts
// 199 new (20,199 is missing), 200 updated, 100 deleted, 19,700 unchanged. A second
// sync of the same source writes and deletes nothing; the guard refuses a source
// that lost half its rows, through PgBouncer in transaction mode too.
func TestSyncJob(t *testing.T) {
	e := buildJob(t)
	for _, via := range []string{"direct", "pgbouncer"} {
		t.Run(via, func(t *testing.T) {
			t.Parallel()
			db := pgtest.New(t)
			dsn := e.baseURL
			if via == "pgbouncer" {
				dsn = pgtest.WithParam(pgtest.PgBouncerURL(t), pgetl.PoolerKey, "pgbouncer")
			}
			e := &e2e{bin: e.bin, baseURL: dsn}
			r := e.run(t, db.Schema, "-source", "synthetic", "-rows", "20000", "-version", "1")
			require.Equal(t, 0, r.code, "%s", r)
			sync := []string{"-mode", "sync", "-rows", "20200", "-version", "2", "-changed-every", "100", "-missing-every", "200", "-commit-rows", "3000"}
			for _, source := range []string{"api", "synthetic"} {
				r = e.run(t, db.Schema, append(sync, "-source", source, "-page-delay", "0", "-job", "sync-"+source)...)
				require.Equal(t, 0, r.code, "%s", r)
				requireSynced(t, db, 20200, 2, 100, 200)
				if source == "api" {
					require.Contains(t, r.stdout, "sync        199 new, 200 updated, 100 deleted, 19700 unchanged", "%s", r)
				} else { // the same source again: nothing to do
					require.Contains(t, r.stdout, "sync        0 new, 0 updated, 0 deleted, 20099 unchanged", "%s", r)
				}
			}
			// A source that lost half its rows: refused, nothing deleted.
			r = e.run(t, db.Schema, append(sync, "-source", "synthetic", "-rows", "10000")...)
			require.Equal(t, 1, r.code, "%s", r)
			require.Contains(t, r.stderr, "MaxDeleteRatio", "%s", r)
			requireSynced(t, db, 20200, 2, 100, 200)
		})
	}
}

// TestSyncChaosKill runs the sync (at a smaller size) as a subprocess and
// SIGKILLs it at a random point of its load, then at a random point of its sweep
// (the deletes, 10 rows per transaction), then lets a last run finish: the table
// holds exactly the source's rows, and the sweeps together deleted each missing
// row exactly once.
func TestSyncChaosKill(t *testing.T) {
	e := buildJob(t)
	const n, rows = 10_000, 10_100
	for seed := uint64(1); seed <= 5; seed++ {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(seed, 16))
			db := pgtest.New(t)
			r := e.run(t, db.Schema, "-source", "synthetic", "-rows", fmt.Sprint(n), "-version", "1", "-job", "sync")
			require.Equal(t, 0, r.code, "%s", r)
			// 500 rows missing (5%), 100 changed, 50 new.
			args := []string{"-job", "sync", "-mode", "sync", "-rows", fmt.Sprint(rows), "-version", "2", "-changed-every", "100",
				"-missing-every", "20", "-page-size", "100", "-page-delay", "2ms", "-commit-rows", fmt.Sprint(300 + rng.IntN(700)),
				"-sweep-rows", "10", "-api-faults", "0.05", "-lease", "2s", "-takeover"}
			// During the load: a random time.
			kills := 0
			if killAfter(t, e, db.Schema, args, time.Duration(50+rng.IntN(400))*time.Millisecond, "") {
				kills++
			}
			// During the sweep: a random time after it began.
			if killAfter(t, e, db.Schema, args, time.Duration(rng.IntN(60))*time.Millisecond, "sweeping") {
				kills++
			}
			require.Positive(t, kills)
			partial := db.Int(t, "SELECT coalesce(sum(deleted), 0) FROM "+db.Ident("sync_seen")+" WHERE job = 'sync'")
			r = e.run(t, db.Schema, args...)
			require.Equal(t, 0, r.code, "%s", r)
			requireSynced(t, db, rows, 2, 100, 20)
			missing := int64(0)
			for i := int64(1); i <= n; i++ {
				if workload.Missing(i, 20) {
					missing++
				}
			}
			require.Equal(t, missing, db.Int(t, "SELECT sum(deleted) FROM "+db.Ident("sync_seen")+" WHERE job = 'sync'"),
				"each missing row deleted exactly once over the runs")
			cp, err := pgetl.ReadCheckpoint(context.Background(), db.Pool, db.Schema, "sync")
			require.NoError(t, err)
			require.True(t, cp.Finished)
			t.Logf("seed %d: %d kills, %d rows deleted before the last run; last run: %s", seed, kills, partial, lineOf(r.stdout, "sync "))
		})
	}
}

// killAfter runs the job and SIGKILLs it after d, counted from the start or, with
// marker, from the moment its stderr says marker. It reports whether it killed the
// job (false: the job ended first).
func killAfter(t *testing.T, e *e2e, schema string, args []string, d time.Duration, marker string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd, _, _ := e.command(ctx, schema, args...)
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	require.NoError(t, cmd.Start())
	seen := make(chan struct{})
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		found := false
		for sc.Scan() {
			if !found && marker != "" && strings.Contains(sc.Text(), marker) {
				found = true
				close(seen)
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	if marker == "" {
		close(seen)
	}
	done := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		pw.Close()
		done <- err
	}()
	killed := false
	select {
	case <-done:
	case <-seen:
		select {
		case <-done:
		case <-time.After(d): // the fault's timing, not a wait for a condition
			_ = cmd.Process.Signal(syscall.SIGKILL)
			<-done
			killed = true
		}
	}
	<-scanned
	return killed
}

func lineOf(s, prefix string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, prefix) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
