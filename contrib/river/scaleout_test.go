package pgetlriver_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	pgetlriver "github.com/pgetl/pgetl/contrib/river"
	"github.com/pgetl/pgetl/contrib/river/internal/products"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

// setupJob migrates River into the test's schema, creates the products table there
// and enqueues rows 1..rows in parts partitions. pgetl's checkpoint table lives in
// the test's schema too.
func setupJob(t *testing.T, db *pgtest.DB, rows int64, parts int) (products.Config, products.Job) {
	t.Helper()
	cfg := products.Config{URL: db.BaseURL, RiverSchema: db.Schema, CheckpointSchema: db.Schema}
	job := products.Job{Name: "products", Table: db.Qualified("products"), Rows: rows, Partitions: parts}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	n, err := products.Enqueue(ctx, cfg, job)
	if err != nil {
		t.Fatal(err)
	}
	if n != parts {
		t.Fatalf("enqueued %d partitions, want %d", n, parts)
	}
	return cfg, job
}

func progressOf(ctx context.Context, t *testing.T, db *pgtest.DB, job string) pgetlriver.Progress {
	t.Helper()
	p, err := pgetlriver.ReadProgress(ctx, db.Pool, pgetlriver.ProgressConfig{RiverSchema: db.Schema, CheckpointSchema: db.Schema}, job)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// waitFinished polls the job's progress until every partition is done.
func waitFinished(ctx context.Context, t *testing.T, db *pgtest.DB, job string, timeout time.Duration) pgetlriver.Progress {
	t.Helper()
	var p pgetlriver.Progress
	err := eventually(ctx, timeout, 50*time.Millisecond, "job "+job+" to finish", func() (bool, error) {
		var err error
		p, err = pgetlriver.ReadProgress(ctx, db.Pool, pgetlriver.ProgressConfig{RiverSchema: db.Schema, CheckpointSchema: db.Schema}, job)
		if err == nil && p.Failed > 0 {
			err = fmt.Errorf("partitions failed: %v", p)
		}
		return p.Finished(), err
	})
	if err != nil {
		t.Fatalf("%v; last progress: %v", err, p)
	}
	return p
}

// checkExact checks the table holds rows 1..rows at version 1, each once, and the
// checkpoints count each row once.
func checkExact(ctx context.Context, t *testing.T, db *pgtest.DB, rows int64, p pgetlriver.Progress) {
	t.Helper()
	wantN, wantSum := workload.Checksum(rows, 1)
	n, sum, err := workload.QueryChecksum(ctx, db.Pool, db.Ident("products"))
	if err != nil {
		t.Fatal(err)
	}
	if n != wantN || sum != wantSum {
		t.Fatalf("table: %d rows, checksum %s; generator: %d rows, checksum %s", n, sum, wantN, wantSum)
	}
	if p.Rows != rows {
		t.Fatalf("checkpoints count %d rows, want %d (a row committed twice or lost)", p.Rows, rows)
	}
}

// TestCrashRedelivery: 3 worker processes load 12 partitions; one is SIGKILLed
// mid-partition; River's rescuer re-delivers its partition to another worker, which
// resumes from the checkpoint; the table ends exactly as the generator's rows.
func TestCrashRedelivery(t *testing.T) {
	db := pgtest.NewShort(t)
	const rows, parts = 24000, 12
	cfg, job := setupJob(t, db, rows, parts)
	opts := products.WorkerOptions{
		MaxWorkers:    2,
		Lease:         3 * time.Second,
		JobTimeout:    2 * time.Second, // partitions run in slices of 1.6s
		RescueAfter:   3 * time.Second,
		CommitRows:    200,
		RowsPerSecond: 2000, // a partition takes ~1s: long enough to be caught mid-way
		TestOnly:      true,
	}
	ws := map[string]*proc{}
	for i := 1; i <= 3; i++ {
		o := opts
		o.ClientID = fmt.Sprintf("worker-%d", i)
		ws[o.ClientID] = startWorker(t, helperSpec{Config: cfg, Options: o, Trace: true})
	}
	ctx := context.Background()

	// Find a partition in progress (committed rows, not finished, lease live)
	// on a worker that is not River's leader if there is one (killing the leader
	// also delays the rescue by a leader election, ~15s more).
	var victim pgetlriver.PartitionProgress
	err := eventually(ctx, 60*time.Second, 10*time.Millisecond, "a partition in progress", func() (bool, error) {
		p := progressOf(ctx, t, db, job.Name)
		var leader string
		_ = db.Pool.QueryRow(ctx, `SELECT leader_id FROM `+db.Ident("river_leader")).Scan(&leader)
		var cands []pgetlriver.PartitionProgress
		for _, pp := range p.Parts {
			if pp.State == pgetlriver.StateRunning && pp.Rows > 0 && pp.Rows < pp.RowsTotal-400 && ws[pp.AttemptedBy] != nil {
				cands = append(cands, pp)
			}
		}
		if len(cands) == 0 {
			return false, nil
		}
		victim = cands[0]
		for _, c := range cands {
			if c.AttemptedBy != leader {
				victim = c
				break
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	dead := ws[victim.AttemptedBy]
	// Kill it mid-batch: once it has read half a batch (100 of 200 rows) past a
	// commit, so uncommitted rows are lost with it.
	err = eventually(ctx, 10*time.Second, time.Millisecond, "the victim to be mid-batch", func() (bool, error) {
		idx, err := strconv.ParseInt(strings.TrimPrefix(victim.Partition, "p"), 10, 64)
		from := victim.RowsTotal*idx + 1 // equal partitions
		r := dead.lastRow(victim.Partition) - from + 1
		return r > victim.Rows && r%200 >= 100, err
	})
	if err != nil {
		t.Fatal(err)
	}
	dead.kill()
	killed := time.Now()
	var leader string
	_ = db.Pool.QueryRow(ctx, `SELECT leader_id FROM `+db.Ident("river_leader")).Scan(&leader)

	// The dead worker's backends go with its sockets; once no transaction of the
	// partition is in flight, its checkpoint is what the dead worker committed.
	name := job.Name + "/" + victim.Partition
	err = eventually(ctx, 20*time.Second, 10*time.Millisecond, "the dead worker's transactions to end", func() (bool, error) {
		var n int64
		err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, $1)`, "pgetl "+name+"#").Scan(&n)
		return n == 0, err
	})
	if err != nil {
		t.Fatal(err)
	}
	var cursor string
	var committed int64
	if err := db.Pool.QueryRow(ctx, `SELECT coalesce(cursor, ''), rows FROM `+db.Ident("checkpoint")+` WHERE job = $1`, name).Scan(&cursor, &committed); err != nil {
		t.Fatal(err)
	}
	lastRead := dead.lastRow(victim.Partition)
	t.Logf("killed %s (leader: %s) in partition %s: %d of %d rows committed (cursor %s), read up to row ~%d",
		dead.id, leader, victim.Partition, committed, victim.RowsTotal, cursor, lastRead)

	// River's rescuer re-delivers the partition to another worker.
	var again pgetlriver.PartitionProgress
	err = eventually(ctx, 90*time.Second, 20*time.Millisecond, "the partition's re-delivery", func() (bool, error) {
		for _, pp := range progressOf(ctx, t, db, job.Name).Parts {
			if pp.Partition == victim.Partition && pp.AttemptedBy != dead.id && pp.AttemptedBy != "" {
				again = pp
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	redelivered := time.Since(killed)

	p := waitFinished(ctx, t, db, job.Name, 90*time.Second)
	checkExact(ctx, t, db, rows, p)

	var rescued bool
	var attemptedBy []string
	if err := db.Pool.QueryRow(ctx, `SELECT coalesce(bool_or(e->>'error' LIKE '%JobRescuer%'), false), attempted_by FROM `+db.Ident("river_job")+
		` LEFT JOIN LATERAL unnest(errors) e ON true WHERE id = $1 GROUP BY attempted_by`, victim.RiverJobID).Scan(&rescued, &attemptedBy); err != nil {
		t.Fatal(err)
	}
	if !rescued || !slices.Contains(attemptedBy, dead.id) {
		t.Fatalf("partition %s: rescued by River's JobRescuer: %v; attempted by %v (dead worker %s)", victim.Partition, rescued, attemptedBy, dead.id)
	}
	replayed := max(lastRead-mustInt(t, cursor), 0)
	t.Logf("re-delivered to %s %v after the kill; rows replayed (read by the dead worker after its last checkpoint): ~%d; rows left to the new worker: %d; attempted by %v",
		again.AttemptedBy, redelivered.Round(100*time.Millisecond), replayed, victim.RowsTotal-committed, attemptedBy)
}

// machineCPU returns the busy and total CPU time of the machine from /proc/stat,
// in clock ticks (0, 0 where there is none).
func machineCPU() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal …
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

func mustInt(t *testing.T, s string) int64 {
	t.Helper()
	if s == "" {
		return 0
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("cursor %q: %v", s, err)
	}
	return n
}

// TestThroughput loads the same rows with 1, 2 and 3 worker processes (one
// partition at a time each) and logs the rows per second, from the first
// partition's start to the last one's finish, both on the server's clock.
func TestThroughput(t *testing.T) {
	if testing.Short() {
		t.Skip("measures throughput; not with -short")
	}
	rows, parts := int64(200000), 12
	if raceEnabled {
		// The workers are this race-instrumented binary: they, not the server,
		// are the bottleneck; check correctness on fewer rows, measure without -race.
		rows = 60000
	}
	var rates []string
	for k := 1; k <= 3; k++ {
		t.Run(fmt.Sprintf("workers=%d", k), func(t *testing.T) {
			db := pgtest.NewShort(t)
			cfg, job := setupJob(t, db, rows, parts)
			ps := make([]*proc, 0, k)
			for i := 1; i <= k; i++ {
				ps = append(ps, startWorker(t, helperSpec{Config: cfg, Options: products.WorkerOptions{
					ClientID: fmt.Sprintf("tp-%d", i), MaxWorkers: 1, TestOnly: true,
				}}))
			}
			ctx := context.Background()
			busy0, total0 := machineCPU()
			p := waitFinished(ctx, t, db, job.Name, 120*time.Second)
			busy1, total1 := machineCPU()
			checkExact(ctx, t, db, rows, p)
			var secs float64
			if err := db.Pool.QueryRow(ctx, `SELECT extract(epoch FROM (SELECT max(finished_at) FROM `+db.Ident("checkpoint")+`)
				- (SELECT min(attempted_at) FROM `+db.Ident("river_job")+`))::float8`).Scan(&secs); err != nil {
				t.Fatal(err)
			}
			var workerCPU time.Duration
			for _, w := range ps {
				if err := w.stop(30 * time.Second); err != nil {
					t.Errorf("worker %s: %v", w.id, err)
				}
				workerCPU += w.cmd.ProcessState.UserTime() + w.cmd.ProcessState.SystemTime()
			}
			rate := float64(rows) / secs
			cpu := ""
			if total1 > total0 {
				// Machine-wide CPU while the job ran (all cores), and the workers'
				// share of it (their whole life: an upper bound); the rest is
				// mostly the server.
				cpu = fmt.Sprintf("; machine CPU busy %.0f%% of %d cores, workers used %.2f CPU-s in all",
					100*float64(busy1-busy0)/float64(total1-total0), runtime.NumCPU(), workerCPU.Seconds())
			}
			t.Logf("%d worker processes: %d rows in %.2fs = %.0f rows/s%s", k, rows, secs, rate, cpu)
			rates = append(rates, fmt.Sprintf("%d: %.0f rows/s", k, rate))
		})
	}
	t.Logf("throughput by worker processes: %s", strings.Join(rates, ", "))
}

// TestEnqueueAndProgress: enqueueing twice inserts each partition once; progress
// sums what River and the checkpoints say; bad partitions are refused.
func TestEnqueueAndProgress(t *testing.T) {
	db := pgtest.NewShort(t)
	cfg, job := setupJob(t, db, 1000, 4)
	ctx := context.Background()
	n, err := products.Enqueue(ctx, cfg, job)
	if err != nil || n != 0 {
		t.Fatalf("second enqueue: %d new partitions, err %v; want 0, nil", n, err)
	}
	if got := db.Int(t, `SELECT count(*) FROM `+db.Ident("river_job")); got != 4 {
		t.Fatalf("river_job has %d rows, want 4", got)
	}
	p := progressOf(ctx, t, db, job.Name)
	if p.Partitions != 4 || p.Pending != 4 || p.RowsTotal != 1000 || p.Rows != 0 || p.Finished() {
		t.Fatalf("progress before any worker: %v", p)
	}
	if other := progressOf(ctx, t, db, "products2"); other.Partitions != 0 {
		t.Fatalf("progress of another job: %v", other)
	}
	client := insertOnlyClient(t, db)
	for _, c := range []struct {
		parts []pgetlriver.PartitionArgs
		want  string
	}{
		{[]pgetlriver.PartitionArgs{{Partition: "a"}, {Partition: "a"}}, "given twice"},
		{[]pgetlriver.PartitionArgs{{Partition: "a/b"}}, "must not contain '/'"},
		{[]pgetlriver.PartitionArgs{{Job: "other", Partition: "a"}}, "belongs to job"},
		{[]pgetlriver.PartitionArgs{{Partition: "a", From: 5, To: 4}}, "bad range"},
		{nil, "no partitions"},
	} {
		err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
			_, err := pgetlriver.EnqueuePartitions(ctx, tx, client, "j", c.parts)
			return err
		})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("EnqueuePartitions(%v): %v, want an error containing %q", c.parts, err, c.want)
		}
	}
	if got := pgetlriver.SplitRange("j", 10, 3); len(got) != 3 || got[0].From != 1 || got[0].To != 4 || got[2].To != 10 || got[1].Partition != "p001" {
		t.Errorf("SplitRange(10, 3) = %+v", got)
	}
}
