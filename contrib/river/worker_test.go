package pgetlriver_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	pgetlriver "github.com/pgetl/pgetl/contrib/river"
	"github.com/pgetl/pgetl/contrib/river/internal/products"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertype"
)

const lease = 2 * time.Second

func insertOnlyClient(t *testing.T, db *pgtest.DB) *river.Client[pgx.Tx] {
	t.Helper()
	c, err := river.NewClient(riverpgxv5.New(db.Pool), &river.Config{Schema: db.Schema})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func createTable(t *testing.T, db *pgtest.DB) {
	t.Helper()
	if _, err := db.Pool.Exec(context.Background(), workload.CreateSQL(db.Ident("products"), true)); err != nil {
		t.Fatal(err)
	}
}

func newPool(t *testing.T, db *pgtest.DB) *pgxpool.Pool {
	t.Helper()
	pool, err := pgetl.NewPool(context.Background(), db.BaseURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// newWorker returns a products worker (insert, 100 rows per batch) whose loader
// calls gate(p, i) before adding row i.
func newWorker(t *testing.T, db *pgtest.DB, pool *pgxpool.Pool, gate func(p *pgetlriver.Partition, i int64) error) *pgetlriver.Worker {
	t.Helper()
	load := func(ctx context.Context, p *pgetlriver.Partition) error {
		row := func(i int64, dst []any) []any { return workload.Row(i, 1).AppendValues(dst) }
		return pgetlriver.RangeLoader(func(i int64, dst []any) []any {
			if err := gate(p, i); err != nil {
				panic(err) // surfaces as a test failure through the recover below
			}
			return row(i, dst)
		})(ctx, p)
	}
	w, err := pgetlriver.NewWorker(pgetlriver.WorkerConfig{
		Pool:             pool,
		CheckpointSchema: db.Schema,
		Lease:            lease,
		Batch: func(pgetlriver.PartitionArgs) (pgetl.BatchConfig, error) {
			return pgetl.BatchConfig{Table: db.Qualified("products"), Columns: workload.Columns, CommitRows: 100}, nil
		},
		Load: func(ctx context.Context, p *pgetlriver.Partition) (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("loader: %v", r)
				}
			}()
			return load(ctx, p)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func jobOf(id int64, a pgetlriver.PartitionArgs) *river.Job[pgetlriver.PartitionArgs] {
	return &river.Job[pgetlriver.PartitionArgs]{JobRow: &rivertype.JobRow{ID: id, Attempt: 1, Kind: pgetlriver.Kind}, Args: a}
}

func snoozeOf(err error) (time.Duration, bool) {
	var s *rivertype.JobSnoozeError
	if errors.As(err, &s) {
		return s.Duration, true
	}
	return 0, false
}

func checkTable(ctx context.Context, t *testing.T, db *pgtest.DB, rows int64, job string) {
	t.Helper()
	wantN, wantSum := workload.Checksum(rows, 1)
	n, sum, err := workload.QueryChecksum(ctx, db.Pool, db.Ident("products"))
	if err != nil {
		t.Fatal(err)
	}
	cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
	if err != nil {
		t.Fatal(err)
	}
	if n != wantN || sum != wantSum || cp.Rows != rows || !cp.Finished {
		t.Fatalf("table %d rows (checksum %s), checkpoint %+v; want %d rows (checksum %s), finished", n, sum, cp, wantN, wantSum)
	}
}

// TestDuplicateDelivery: the same partition (same River job) is worked twice at
// once. One run claims the partition and loads it; the other finds it claimed and
// snoozes for the rest of the lease, without loading a row. The table is exact.
func TestDuplicateDelivery(t *testing.T) {
	db := pgtest.NewShort(t)
	createTable(t, db)
	pool := newPool(t, db)
	firstReturned := make(chan struct{})
	var loads atomic.Int32
	w := newWorker(t, db, pool, func(p *pgetlriver.Partition, i int64) error {
		if i == p.Args.From {
			loads.Add(1)
			// Hold the partition until the other delivery has returned, so both
			// runs overlap for sure.
			select {
			case <-firstReturned:
			case <-time.After(30 * time.Second):
				return errors.New("the other delivery did not return within 30s")
			}
		}
		return nil
	})
	args := pgetlriver.PartitionArgs{Job: "dup", Partition: "p0", From: 1, To: 2000}
	ctx := context.Background()
	var (
		wg   sync.WaitGroup
		once sync.Once
		errs [2]error
	)
	for k := range 2 {
		wg.Go(func() {
			errs[k] = w.Work(ctx, jobOf(42, args))
			once.Do(func() { close(firstReturned) })
		})
	}
	wg.Wait()
	var ok, snoozed int
	for _, err := range errs {
		if d, isSnooze := snoozeOf(err); isSnooze {
			snoozed++
			if d < 100*time.Millisecond || d > lease+lease/4+time.Millisecond {
				t.Errorf("snoozed for %v, want the rest of the %v lease", d, lease)
			}
		} else if err == nil {
			ok++
		} else {
			t.Errorf("Work: %v", err)
		}
	}
	if ok != 1 || snoozed != 1 || loads.Load() != 1 {
		t.Fatalf("results %v: %d finished, %d snoozed, %d loads; want 1, 1, 1", errs, ok, snoozed, loads.Load())
	}
	checkTable(ctx, t, db, 2000, args.Name())

	// The snoozed delivery comes back: the partition is finished, nothing is loaded.
	if err := w.Work(ctx, jobOf(42, args)); err != nil || loads.Load() != 1 {
		t.Fatalf("re-delivery of a finished partition: %v, %d loads; want nil, 1", err, loads.Load())
	}
	checkTable(ctx, t, db, 2000, args.Name())
}

// TestFencedMidPartition: while a worker loads a partition, another session takes
// it over (Takeover). The worker's next commit is fenced: it commits nothing more
// and snoozes for a lease. The next delivery resumes from the checkpoint.
func TestFencedMidPartition(t *testing.T) {
	db := pgtest.NewShort(t)
	createTable(t, db)
	pool := newPool(t, db)
	args := pgetlriver.PartitionArgs{Job: "fence", Partition: "p0", From: 1, To: 2000}
	ctx := context.Background()
	var fencedOnce atomic.Bool
	w := newWorker(t, db, pool, func(p *pgetlriver.Partition, i int64) error {
		if i != 350 || !fencedOnce.CompareAndSwap(false, true) {
			return nil
		}
		// Batches 1..3 (rows 1..300) are committed or in flight: wait for them,
		// then let another session take the partition over.
		if err := p.Batch().Flush(ctx); err != nil {
			return err
		}
		s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: args.Name(), CheckpointSchema: db.Schema, Lease: lease, Takeover: true})
		if err != nil {
			return err
		}
		return s.Close(ctx)
	})
	err := w.Work(ctx, jobOf(7, args))
	if d, ok := snoozeOf(err); !ok || d != lease {
		t.Fatalf("fenced Work: %v, want JobSnooze(%v)", err, lease)
	}
	cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, args.Name())
	if err != nil {
		t.Fatal(err)
	}
	if n := db.Int(t, `SELECT count(*) FROM `+db.Ident("products")); n != cp.Rows || cp.Cursor != fmt.Sprint(cp.Rows) || cp.Rows < 300 || cp.Finished {
		t.Fatalf("after the fence: table %d rows, checkpoint %+v; want the committed prefix (≥300 rows) only", n, cp)
	}
	if err := w.Work(ctx, jobOf(7, args)); err != nil {
		t.Fatalf("re-delivery: %v", err)
	}
	checkTable(ctx, t, db, 2000, args.Name())
}

// TestTimeSlices: with a 1s job timeout, a 3s partition runs as a chain of slices
// on a real River client: each ends with JobSnooze(0) and the next resumes from the
// checkpoint, without using up attempts.
func TestTimeSlices(t *testing.T) {
	db := pgtest.NewShort(t)
	cfg, job := setupJob(t, db, 3000, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- products.Work(ctx, cfg, products.WorkerOptions{
			ClientID: "slices", JobTimeout: time.Second, RescueAfter: 2 * time.Second, Lease: lease,
			CommitRows: 100, RowsPerSecond: 1000, TestOnly: true, FetchPollInterval: 50 * time.Millisecond,
		})
	}()
	p := waitFinished(context.Background(), t, db, job.Name, 60*time.Second)
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Work: %v", err)
	}
	checkExact(context.Background(), t, db, 3000, p)
	var snoozes, attempt int64
	var state string
	if err := db.Pool.QueryRow(context.Background(), `SELECT coalesce((metadata->>'snoozes')::bigint, 0), attempt, state::text FROM `+
		db.Ident("river_job")).Scan(&snoozes, &attempt, &state); err != nil {
		t.Fatal(err)
	}
	if snoozes < 2 || attempt != 1 || state != "completed" {
		t.Fatalf("River job: %d snoozes, attempt %d, state %s; want ≥2 slices ended by a snooze, attempt 1, completed", snoozes, attempt, state)
	}
	t.Logf("3s partition with a 1s job timeout: %d slices", snoozes+1)
}

// TestPgBouncer: workers through PgBouncer in transaction mode (River poll-only,
// pgetl_pooler=pgbouncer) load a job exactly.
func TestPgBouncer(t *testing.T) {
	bouncer := pgtest.PgBouncerURL(t)
	db := pgtest.NewShort(t)
	_, job := setupJob(t, db, 8000, 4) // migrates River through the direct URL
	cfg := products.Config{URL: bouncer, PgBouncer: true, RiverSchema: db.Schema, CheckpointSchema: db.Schema}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() {
			errs[i] = products.Work(ctx, cfg, products.WorkerOptions{
				ClientID: fmt.Sprintf("bouncer-%d", i), MaxWorkers: 2, Lease: lease, CommitRows: 500,
				TestOnly: true, FetchPollInterval: 100 * time.Millisecond,
			})
		})
	}
	p := waitFinished(context.Background(), t, db, job.Name, 60*time.Second)
	cancel()
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("Work through PgBouncer: %v", err)
		}
	}
	checkExact(context.Background(), t, db, 8000, p)
}
