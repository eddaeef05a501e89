// Command products-partitioned loads the products job split into key-range
// partitions, run by River workers on any number of processes and machines.
//
//	products-partitioned coordinator -job products -rows 200000 -partitions 12
//	products-partitioned worker -workers 4
//
// The coordinator migrates River's tables, creates the target table, enqueues the
// partitions in one transaction and shows the job's progress until every
// partition is done. A worker is one process running a River client that works up
// to -workers partitions at once; start one on each machine (or several on one)
// with the same DATABASE_URL. Both read DATABASE_URL (libpq defaults when unset).
// Behind PgBouncer in transaction mode, pass -pgbouncer: River then polls instead
// of using LISTEN/NOTIFY (River's tables must have been migrated once through a
// direct connection).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/pgetl/pgetl/contrib/river/internal/products"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "coordinator":
		err = coordinator(ctx, os.Args[2:])
	case "worker":
		err = worker(ctx, os.Args[2:])
	default:
		usage()
		os.Exit(2)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "products-partitioned:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: products-partitioned coordinator|worker [flags]   (-h for flags)
  coordinator  migrate River's tables, create the table, enqueue the partitions, show progress
  worker       work partitions (start one per machine, all with the same DATABASE_URL)`)
}

func common(fs *flag.FlagSet) *products.Config {
	cfg := &products.Config{URL: os.Getenv("DATABASE_URL")}
	fs.BoolVar(&cfg.PgBouncer, "pgbouncer", false, "DATABASE_URL goes through PgBouncer in transaction mode: poll, no LISTEN/NOTIFY")
	fs.StringVar(&cfg.RiverSchema, "river-schema", "", "schema of River's tables (default: the search_path)")
	fs.StringVar(&cfg.CheckpointSchema, "checkpoint-schema", "", "schema of pgetl's checkpoint table (default pgetl)")
	return cfg
}

func coordinator(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("coordinator", flag.ExitOnError)
	cfg := common(fs)
	var job products.Job
	fs.StringVar(&job.Name, "job", "products", "job name")
	fs.StringVar(&job.Table, "table", "products", "target table (schema-qualified if needed)")
	fs.Int64Var(&job.Rows, "rows", 200000, "rows to load (1..rows)")
	fs.IntVar(&job.Partitions, "partitions", 12, "key-range partitions")
	fs.Int64Var(&job.Version, "version", 1, "row version of the generator")
	fs.BoolVar(&job.Upsert, "upsert", false, "upsert keyed on sku (to reload a newer version) instead of insert")
	wait := fs.Bool("wait", true, "show progress until the job is done")
	interval := fs.Duration("interval", time.Second, "progress refresh interval")
	_ = fs.Parse(args)
	n, err := products.Enqueue(ctx, *cfg, job)
	if err != nil {
		return err
	}
	fmt.Printf("job %q: %d partitions enqueued (%d already were); start workers: products-partitioned worker -workers K\n",
		job.Name, n, job.Partitions-n)
	if !*wait {
		return nil
	}
	p, err := products.Watch(ctx, *cfg, job.Name, os.Stdout, *interval)
	if err == nil {
		fmt.Printf("job %q done: %d rows in %d partitions\n", job.Name, p.Rows, p.Partitions)
	}
	return err
}

func worker(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("worker", flag.ExitOnError)
	cfg := common(fs)
	var o products.WorkerOptions
	fs.IntVar(&o.MaxWorkers, "workers", 2, "partitions this process runs at once (River MaxWorkers)")
	fs.StringVar(&o.ClientID, "id", "", "River client ID (default: generated; must be unique)")
	fs.DurationVar(&o.Lease, "lease", 0, "lease of a partition session (default 15s): a crashed worker's partition waits at most this after its rescue")
	fs.DurationVar(&o.JobTimeout, "job-timeout", 2*time.Minute, "River JobTimeout: partitions run in slices of 80% of it")
	fs.DurationVar(&o.RescueAfter, "rescue-after", 0, "River RescueStuckJobsAfter (default job-timeout + 1m): a crashed worker's partition is re-delivered after it")
	fs.IntVar(&o.CommitRows, "commit-rows", 0, "rows per committed batch (default pgetl's 10000)")
	fs.IntVar(&o.RowsPerSecond, "source-rate", 0, "simulate a slow source: rows per second per partition (0: unlimited)")
	_ = fs.Parse(args)
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	fmt.Fprintf(os.Stderr, "worker: running up to %d partitions at once; Ctrl-C stops after the running slices\n", o.MaxWorkers)
	return products.Work(ctx, *cfg, o)
}
