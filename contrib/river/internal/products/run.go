// Package products is the products example job split into key-range partitions:
// the coordinator and the worker that the command cmd/products-partitioned and the
// tests run. Its rows are those of the core module's internal/workload (which this
// module imports: Go's internal rule is by import path), so a table loaded here has
// the same checksum as one loaded by examples/products.
package products

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	pgetlriver "github.com/pgetl/pgetl/contrib/river"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
)

// Config is what the coordinator and the workers share. The zero value of every
// field but URL is a documented default.
type Config struct {
	// URL is the database (DATABASE_URL), with pgetl's keys allowed.
	URL string
	// PgBouncer says URL goes through PgBouncer in transaction mode: River polls
	// (no LISTEN) and pgetl_pooler=pgbouncer is added to URL unless it sets it.
	PgBouncer bool
	// RiverSchema holds River's tables; empty uses the search_path.
	RiverSchema string
	// CheckpointSchema holds pgetl's checkpoint table; empty is pgetl's default.
	CheckpointSchema string
	// Logger receives the workers' partition outcomes. Nil is silent.
	Logger *slog.Logger `json:"-"`
}

// Job is what the coordinator enqueues.
type Job struct {
	Name       string // job name; defaults to "products"
	Table      string // target table, optionally schema-qualified; defaults to "products"
	Rows       int64  // rows 1..Rows
	Partitions int    // key-range partitions
	Version    int64  // row version; defaults to 1
	Upsert     bool   // upsert keyed on sku instead of insert
}

// WorkerOptions tune a worker process.
type WorkerOptions struct {
	// ClientID is the River client's ID; empty lets River choose.
	ClientID string
	// MaxWorkers is how many partitions the process runs at once. Defaults to 1.
	MaxWorkers int
	// Lease is the partition sessions' lease. Defaults to pgetlriver.LeaseDefault.
	Lease time.Duration
	// JobTimeout is River's JobTimeout: a partition runs in slices of 80 % of it.
	// Defaults to 2 minutes.
	JobTimeout time.Duration
	// RescueAfter is River's RescueStuckJobsAfter. Defaults to JobTimeout + 1m.
	RescueAfter time.Duration
	// FetchPollInterval is River's FetchPollInterval (the delay of a job's pickup
	// in poll-only mode). Defaults to River's (1s).
	FetchPollInterval time.Duration
	// CommitRows is BatchConfig.CommitRows. Defaults to pgetl's.
	CommitRows int
	// RowsPerSecond throttles each partition's source to simulate a slow one. 0:
	// no limit.
	RowsPerSecond int
	// OnRow, if set, is called after each row is added.
	OnRow func(partition string, i int64) `json:"-"`
	// TestOnly sets River's TestOnly (no staggered start of maintenance).
	TestOnly bool
}

// Open returns a pgetl pool on cfg.URL with room for maxWorkers partitions.
func Open(ctx context.Context, cfg Config, maxWorkers int) (*pgxpool.Pool, error) {
	u := cfg.URL
	if cfg.PgBouncer && !strings.Contains(u, pgetl.PoolerKey) {
		u = withParam(u, pgetl.PoolerKey, "pgbouncer")
	}
	pc, err := pgetl.ParseConfig(u)
	if err != nil {
		return nil, err
	}
	// Each running partition uses one connection to commit and one to renew its
	// lease at times; River needs a few (fetch, completer, elector, LISTEN).
	pc.MaxConns = max(pc.MaxConns, int32(2*maxWorkers+6))
	return pgetl.NewPoolWithConfig(ctx, pc)
}

func withParam(connString, key, value string) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		sep := "?"
		if strings.Contains(connString, "?") {
			sep = "&"
		}
		return connString + sep + key + "=" + value
	}
	if connString == "" {
		return key + "=" + value
	}
	return connString + " " + key + "=" + value
}

// source encodes the job's target into PartitionArgs.Source, so workers need no
// flags of their own for it.
func (j Job) source() string {
	v := url.Values{}
	v.Set("table", j.Table)
	v.Set("v", strconv.FormatInt(j.Version, 10))
	if j.Upsert {
		v.Set("upsert", "1")
	}
	return v.Encode()
}

type target struct {
	table   string
	version int64
	upsert  bool
}

func parseSource(s string) (target, error) {
	v, err := url.ParseQuery(s)
	if err != nil {
		return target{}, fmt.Errorf("products: bad partition source %q: %w", s, err)
	}
	t := target{table: v.Get("table"), upsert: v.Get("upsert") == "1"}
	if t.version, err = strconv.ParseInt(v.Get("v"), 10, 64); err != nil || t.table == "" {
		return target{}, fmt.Errorf("products: bad partition source %q", s)
	}
	return t, nil
}

func (j *Job) setDefaults() error {
	if j.Name == "" {
		j.Name = "products"
	}
	if j.Table == "" {
		j.Table = "products"
	}
	if j.Version == 0 {
		j.Version = 1
	}
	if j.Rows < 1 || j.Partitions < 1 {
		return errors.New("products: Rows and Partitions must be at least 1")
	}
	return nil
}

// Enqueue migrates River's tables, creates the target table and enqueues the
// job's partitions, the last two in one transaction. It reports how many
// partitions were new (the others were enqueued before).
func Enqueue(ctx context.Context, cfg Config, job Job) (inserted int, err error) {
	if err := job.setDefaults(); err != nil {
		return 0, err
	}
	pool, err := Open(ctx, cfg, 1)
	if err != nil {
		return 0, err
	}
	defer pool.Close()
	if cfg.PgBouncer {
		// River's migrator takes session-level locks: it needs a direct connection.
		// Behind PgBouncer, run it once from a direct DATABASE_URL, or let a
		// coordinator without -pgbouncer do it.
		var ok bool
		if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, riverTable(cfg.RiverSchema)).Scan(&ok); err != nil {
			return 0, err
		}
		if !ok {
			return 0, errors.New("products: River's tables are missing; run the coordinator once without -pgbouncer (direct connection) to migrate them")
		}
	} else if err := pgetlriver.Migrate(ctx, pool, cfg.RiverSchema); err != nil {
		return 0, err
	}
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{Schema: cfg.RiverSchema, Logger: quietLogger()})
	if err != nil {
		return 0, err
	}
	parts := pgetlriver.SplitRange(job.Name, job.Rows, job.Partitions)
	for i := range parts {
		parts[i].Source = job.source()
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, workload.CreateIfMissingSQL(tableIdent(job.Table))); err != nil {
			return fmt.Errorf("products: create table %s: %w", job.Table, err)
		}
		res, err := pgetlriver.EnqueuePartitions(ctx, tx, client, job.Name, parts)
		for _, r := range res {
			if !r.UniqueSkippedAsDuplicate {
				inserted++
			}
		}
		return err
	})
	return inserted, err
}

// waitForRiver waits until River's tables exist: workers may start before the
// coordinator migrated them.
func waitForRiver(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for said := false; ; {
		var ok bool
		err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL`,
			riverTable(schema), strings.Replace(riverTable(schema), "river_job", "river_queue", 1)).Scan(&ok)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if !said {
			fmt.Fprintln(os.Stderr, "worker: waiting for River's tables (run the coordinator to migrate them)")
			said = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func riverTable(schema string) string {
	if schema == "" {
		return "river_job"
	}
	return pgx.Identifier{schema, "river_job"}.Sanitize()
}

// tableIdent quotes a possibly schema-qualified table name.
func tableIdent(name string) string {
	return pgx.Identifier(strings.Split(name, ".")).Sanitize()
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// Watch prints the job's progress to out every interval until it is finished
// (returns nil), a partition failed (returns an error) or ctx is done. On a
// terminal the line is redrawn in place.
func Watch(ctx context.Context, cfg Config, job string, out io.Writer, interval time.Duration) (pgetlriver.Progress, error) {
	pool, err := Open(ctx, cfg, 1)
	if err != nil {
		return pgetlriver.Progress{}, err
	}
	defer pool.Close()
	tty := false
	if f, ok := out.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	pcfg := pgetlriver.ProgressConfig{RiverSchema: cfg.RiverSchema, CheckpointSchema: cfg.CheckpointSchema}
	start := time.Now()
	var (
		last    string
		printed time.Time
	)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		p, err := pgetlriver.ReadProgress(ctx, pool, pcfg, job)
		if err != nil {
			return p, err
		}
		line := progressLine(p, time.Since(start))
		if tty {
			fmt.Fprintf(out, "\r\033[K%s", line)
		} else if key := fmt.Sprint(p.Rows, p.Done, p.Running, p.Failed, p.Retrying); key != last || time.Since(printed) >= 30*time.Second {
			// Not a terminal (a log): a line when something changed, or every 30s.
			fmt.Fprintln(out, line)
			last, printed = key, time.Now()
		}
		if p.Finished() || p.Failed > 0 {
			if tty {
				fmt.Fprintln(out)
			}
			if p.Failed > 0 {
				return p, fmt.Errorf("products: %d partitions failed (River discarded them); see river_job.errors, fix, and run the coordinator again to re-enqueue them", p.Failed)
			}
			return p, nil
		}
		select {
		case <-ctx.Done():
			if tty {
				fmt.Fprintln(out)
			}
			return p, ctx.Err()
		case <-t.C:
		}
	}
}

func progressLine(p pgetlriver.Progress, elapsed time.Duration) string {
	const width = 30
	frac := 0.0
	if p.RowsTotal > 0 {
		frac = min(float64(p.Rows)/float64(p.RowsTotal), 1)
	}
	n := int(frac * width)
	rate := float64(p.Rows) / max(elapsed.Seconds(), 0.001)
	return fmt.Sprintf("[%s%s] %5.1f%% %d/%d rows | partitions %d/%d done, %d running, %d pending, %d retrying, %d failed | %.0f rows/s %s",
		strings.Repeat("#", n), strings.Repeat(".", width-n), 100*frac, p.Rows, p.RowsTotal,
		p.Done, p.Partitions, p.Running, p.Pending, p.Retrying, p.Failed, rate, elapsed.Round(time.Second))
}

// NewWorker returns the products partition worker.
func NewWorker(cfg Config, pool *pgxpool.Pool, o WorkerOptions) (*pgetlriver.Worker, error) {
	row := func(v int64) func(int64, []any) []any {
		return func(i int64, dst []any) []any { return workload.Row(i, v).AppendValues(dst) }
	}
	return pgetlriver.NewWorker(pgetlriver.WorkerConfig{
		Pool:             pool,
		CheckpointSchema: cfg.CheckpointSchema,
		Lease:            o.Lease,
		Logger:           cfg.Logger,
		Batch: func(a pgetlriver.PartitionArgs) (pgetl.BatchConfig, error) {
			t, err := parseSource(a.Source)
			bc := pgetl.BatchConfig{Table: t.table, Columns: workload.Columns, CommitRows: o.CommitRows}
			if t.upsert {
				bc.Key = []string{"sku"}
			}
			return bc, err
		},
		Load: func(ctx context.Context, p *pgetlriver.Partition) error {
			t, err := parseSource(p.Args.Source)
			if err != nil {
				return err
			}
			load := pgetlriver.RangeLoader(row(t.version))
			if o.RowsPerSecond <= 0 && o.OnRow == nil {
				return load(ctx, p)
			}
			return throttled(ctx, p, row(t.version), o)
		},
	})
}

// throttled is RangeLoader with a rate limit and a per-row hook.
func throttled(ctx context.Context, p *pgetlriver.Partition, row func(int64, []any) []any, o WorkerOptions) error {
	from := p.Args.From
	if c := p.Resume.Cursor; c != "" {
		n, err := strconv.ParseInt(c, 10, 64)
		if err != nil {
			return err
		}
		from = max(from, n+1)
	}
	start := time.Now()
	vals := make([]any, 0, len(workload.Columns))
	for i := from; i <= p.Args.To; i++ {
		if o.RowsPerSecond > 0 && (i-from)%50 == 0 {
			// Pace the simulated source: row k of this attempt is due at start + k/rate.
			due := start.Add(time.Duration(float64(i-from) / float64(o.RowsPerSecond) * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-ctx.Done():
					t.Stop()
					return ctx.Err()
				case <-t.C:
				}
			}
		}
		vals = row(i, vals[:0])
		err := p.Add(ctx, strconv.FormatInt(i, 10), vals...)
		if err == nil || errors.Is(err, pgetlriver.ErrYield) {
			if o.OnRow != nil {
				o.OnRow(p.Args.Partition, i)
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Work runs a River client working partitions until ctx is done, then stops it:
// running partitions get SoftStop to finish their slice, then are cancelled (they
// snooze and resume elsewhere). It returns once the client has stopped.
func Work(ctx context.Context, cfg Config, o WorkerOptions) error {
	if o.MaxWorkers < 1 {
		o.MaxWorkers = 1
	}
	if o.JobTimeout == 0 {
		o.JobTimeout = 2 * time.Minute
	}
	if o.RescueAfter == 0 {
		o.RescueAfter = o.JobTimeout + time.Minute
	}
	pool, err := Open(context.WithoutCancel(ctx), cfg, o.MaxWorkers)
	if err != nil {
		return err
	}
	defer pool.Close()
	w, err := NewWorker(cfg, pool, o)
	if err != nil {
		return err
	}
	if err := waitForRiver(ctx, pool, cfg.RiverSchema); err != nil {
		return err
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	logger := cfg.Logger
	if logger == nil {
		logger = quietLogger()
	}
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
		ID:                   o.ClientID,
		Schema:               cfg.RiverSchema,
		PollOnly:             cfg.PgBouncer,
		Queues:               map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: o.MaxWorkers}},
		Workers:              workers,
		JobTimeout:           o.JobTimeout,
		RescueStuckJobsAfter: o.RescueAfter,
		FetchPollInterval:    o.FetchPollInterval,
		FetchCooldown:        min(o.FetchPollInterval, river.FetchCooldownDefault),
		SoftStopTimeout:      10 * time.Second,
		Logger:               logger,
		TestOnly:             o.TestOnly,
	})
	if err != nil {
		return err
	}
	if err := client.Start(context.WithoutCancel(ctx)); err != nil {
		return err
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := client.Stop(sctx); err != nil {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return errors.Join(err, client.StopAndCancel(cctx))
	}
	return nil
}
