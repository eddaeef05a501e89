// Command products is pgetl's example job: it syncs a product catalogue into
// PostgreSQL the way a multi-hour ETL job should, and is the README's first command:
//
//	go -C examples run ./products              # 200,000 products from the embedded API
//	go -C examples run ./products -version 2   # the same catalogue, every product changed
//
// # Sources
//
//   - -source api (the default): an in-process HTTP server on 127.0.0.1 (ephemeral
//     port) serves the deterministic rows of internal/workload as JSON pages
//     (GET /products?page=P&size=S) with a per-page delay (-page-delay); a fraction
//     of pages (-api-faults) answers 503 once or is five times slower. A real HTTP
//     client fetches pages ahead of the loader and retries 5xx, timeouts and
//     malformed bodies with backoff.
//   - -source synthetic: the generator in memory, for speed runs.
//   - -source csv:PATH: a file with the header sku,name,price,inventory,updated_at,
//     one record per line (price a decimal, updated_at RFC 3339).
//
// # How it loads
//
// Rows go through a [pgetl.Session] and a [pgetl.BatchSession]: binary COPY in
// batches of -commit-rows (or every -commit-interval), each batch with its
// checkpoint in one short transaction; no connection and no transaction is held
// while the source is read. -mode upsert (the default) merges on sku (INSERT … ON
// CONFLICT (sku) DO UPDATE, only rows that changed are rewritten); -mode insert is a
// plain COPY for an empty table. -mode sync is a full sync of rows 1..-rows
// (pgetl.SyncConfig): the hash of every product's row is preloaded, rows equal to
// theirs are not sent, changed and new ones are merged on sku, and once the whole
// source is read the products missing from it are deleted (at most
// -max-delete-ratio of the table); a sync killed during the load or the deletes and
// rerun deletes exactly the missing products. -changed-every and -missing-every make
// the generated catalogue of a later version differ from the first in a few rows.
//
// The SKU cache ([pgetl.Cache], sku → id) is preloaded from the table by keyset pages
// at start. A row whose SKU is cached is an update, any other an insert. The ids of
// a batch's new SKUs are read with one query after that batch commits (from
// BatchConfig.OnCommitFunc, in the flusher goroutine) and published with Cache.Put:
// only committed ids are ever cached. The rows added but not yet committed wait in
// a mutex-guarded queue ordered by cursor; a commit's cursor says which of them it
// committed.
//
// # Resume, restart, fencing
//
// The cursor committed with each batch is the row number (api, synthetic) or the
// file's line number (csv). A rerun with the same -job resumes after the
// checkpoint's cursor (the api source starts at the page holding the next row).
// A job that finished is started over by a rerun; -restart starts an unfinished one
// over. Each run claims the job with a lease (-lease, 10 s); if a previous run was
// killed, its claim blocks a rerun until the lease expires: the rerun waits for up to
// -claim-wait (15 s) for it, or claims at once with -takeover (the killed run's
// late commits would be fenced off).
//
// # Signals and exit status
//
// SIGINT or SIGTERM stops reading, commits what is buffered, prints the summary and
// the command that resumes, and exits 130 (SIGINT) or 143 (SIGTERM); a second signal
// abandons the buffer. The exit status is 0 only when every source row is accounted
// for: loaded, or rejected into the reject table within -max-rejects. It is 1 when the
// job failed (database unreachable, a bad row with -max-rejects 0, more rejects than
// -max-rejects, an API page still failing after retries), 2 for bad flags.
//
// With -max-rejects 0 (the default) the first bad row stops the job: the rows before
// it are committed and the error names its line or row and column. With
// -max-rejects N > 0, bad rows go to <checkpoint-schema>.reject with their reason and
// the job goes on, until more than N were rejected.
//
// # Output
//
// On a terminal, stderr shows a progress bar (rows, rows/s, ETA, committed rows,
// retries, rejects); otherwise a slog line every -progress-every. The summary goes to
// stdout.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/examples/internal/jobkit"
)

// Exit statuses.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitInterrupted = 128 // + the signal number
)

// errFlagParse marks an error the flag package has already printed.
var errFlagParse = errors.New("bad flags")

type config struct {
	dsn              string
	source           string // "api", "synthetic" or "csv"
	csvPath          string
	rows             int64
	version          int64
	mode             string
	changedEvery     int64   // -changed-every: rows at -version (the others at 1)
	missingEvery     int64   // -missing-every: rows absent from the source
	maxDeleteRatio   float64 // -max-delete-ratio: sync's delete guard
	sweepRows        int     // -sweep-rows: rows per delete transaction of a sync
	commitRows       int
	inFlight         int
	commitInterval   time.Duration
	schema           string
	checkpointSchema string
	job              string
	restart          bool
	takeover         bool
	lease            time.Duration
	claimWait        time.Duration
	maxRejects       int64
	pageSize         int64
	pageDelay        time.Duration
	apiFaults        float64
	apiMalformedPage int64
	progress         string
	progressEvery    time.Duration
	metrics          string   // -metrics: address of the /metrics server, "" for none
	args             []string // as given, for the resume hint
	tty              bool     // stderr is a terminal
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("products", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.dsn, "dsn", "", "connection string (default: $DATABASE_URL, else libpq's PG* variables and defaults)")
	fs.StringVar(&c.source, "source", "api", "rows to load: api, synthetic or csv:PATH")
	fs.Int64Var(&c.rows, "rows", 200_000, "rows of the api and synthetic sources")
	fs.Int64Var(&c.version, "version", 1, "generator version of the api and synthetic rows (a run with V+1 updates every row)")
	fs.StringVar(&c.mode, "mode", "upsert", "upsert (keyed on sku, with the SKU cache), insert (plain COPY, for an empty table) or sync (upsert writing only changed rows, then deleting the products missing from the source)")
	fs.Int64Var(&c.changedEvery, "changed-every", 0, "api, synthetic: row i is at -version if C == 0 or i%C == 0, else at version 1")
	fs.Int64Var(&c.missingEvery, "missing-every", 0, "api, synthetic: rows with i%M == M-1 are absent from the source (0: none)")
	fs.Float64Var(&c.maxDeleteRatio, "max-delete-ratio", pgetl.MaxDeleteRatioDefault, "sync: refuse to delete more than this share of the table's rows (1: no limit)")
	fs.IntVar(&c.sweepRows, "sweep-rows", 0, fmt.Sprintf("sync: rows deleted per transaction (0: pgetl's default, %d)", pgetl.SweepRowsDefault))
	fs.IntVar(&c.commitRows, "commit-rows", 0, fmt.Sprintf("rows per batch (0: pgetl's default, %d, reached after a slow start from 500)", pgetl.CommitRowsDefault))
	fs.IntVar(&c.inFlight, "in-flight", 0, fmt.Sprintf("batches committing at once, each on its own connection (0: pgetl's default, %d)", pgetl.InFlightDefault))
	fs.DurationVar(&c.commitInterval, "commit-interval", 0, "commit buffered rows at least this often (0: pgetl's default, 5s)")
	fs.StringVar(&c.schema, "schema", "pgetl_demo", "target schema, created with its products table if missing")
	fs.StringVar(&c.checkpointSchema, "checkpoint-schema", "", "schema of the checkpoint and reject tables (default: -schema)")
	fs.StringVar(&c.job, "job", "", "job name, the checkpoint key (default: products-<source>)")
	fs.BoolVar(&c.restart, "restart", false, "start the job over instead of resuming it")
	fs.BoolVar(&c.takeover, "takeover", false, "claim the job even if another run's lease has not expired (that run must be dead)")
	fs.DurationVar(&c.lease, "lease", 10*time.Second, "how long this run's claim on the job lasts without renewal")
	fs.DurationVar(&c.claimWait, "claim-wait", 15*time.Second, "how long to wait for a killed run's claim to expire")
	fs.Int64Var(&c.maxRejects, "max-rejects", 0, "bad rows to reject into the reject table before failing (0: the first bad row is fatal)")
	fs.Int64Var(&c.pageSize, "page-size", 500, "api: rows per page")
	fs.DurationVar(&c.pageDelay, "page-delay", 5*time.Millisecond, "api: the server's delay per page")
	fs.Float64Var(&c.apiFaults, "api-faults", 0.02, "api: fraction of pages answering 503 once, and of pages served 5x slower")
	fs.Int64Var(&c.apiMalformedPage, "api-malformed-page", 0, "api: serve this page as malformed JSON (to see the error path)")
	fs.StringVar(&c.progress, "progress", "auto", "progress display: auto (a bar on a terminal, else log lines), bar, log or off")
	fs.DurationVar(&c.progressEvery, "progress-every", 10*time.Second, "interval of the progress log lines")
	fs.StringVar(&c.metrics, "metrics", "", "serve Prometheus metrics on http://ADDR/metrics while the job runs (ADDR e.g. 127.0.0.1:9464)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go -C examples run ./products [flags]\n\nSyncs products into PostgreSQL with pgetl. Flags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, err
		}
		return c, fmt.Errorf("%w: %w", errFlagParse, err) // already printed with the usage
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	c.args = args
	switch {
	case c.source == "api", c.source == "synthetic":
	case strings.HasPrefix(c.source, "csv:") && len(c.source) > 4:
		c.csvPath, c.source = c.source[4:], "csv"
	default:
		return c, fmt.Errorf("-source %q: want api, synthetic or csv:PATH", c.source)
	}
	switch {
	case c.mode != "upsert" && c.mode != "insert" && c.mode != "sync":
		return c, fmt.Errorf("-mode %q: want upsert, insert or sync", c.mode)
	case c.changedEvery < 0:
		return c, fmt.Errorf("-changed-every %d: must not be negative", c.changedEvery)
	case c.missingEvery < 0:
		return c, fmt.Errorf("-missing-every %d: must not be negative", c.missingEvery)
	case c.sweepRows < 0:
		return c, fmt.Errorf("-sweep-rows %d: must not be negative", c.sweepRows)
	case c.maxDeleteRatio < 0 || c.maxDeleteRatio > 1:
		return c, fmt.Errorf("-max-delete-ratio %g: want 0 to 1", c.maxDeleteRatio)
	case c.rows < 0:
		return c, fmt.Errorf("-rows %d: must not be negative", c.rows)
	case c.version < 0:
		return c, fmt.Errorf("-version %d: must not be negative", c.version)
	case c.commitRows < 0:
		return c, fmt.Errorf("-commit-rows %d: must not be negative", c.commitRows)
	case c.inFlight < 0:
		return c, fmt.Errorf("-in-flight %d: must not be negative", c.inFlight)
	case c.maxRejects < 0:
		return c, fmt.Errorf("-max-rejects %d: must not be negative", c.maxRejects)
	case c.pageSize < 1 || c.pageSize > 10_000:
		return c, fmt.Errorf("-page-size %d: want 1 to 10000", c.pageSize)
	case c.lease < time.Second:
		return c, fmt.Errorf("-lease %v: must be at least 1s", c.lease)
	case c.apiFaults < 0 || c.apiFaults > 0.5:
		return c, fmt.Errorf("-api-faults %g: want 0 to 0.5", c.apiFaults)
	case c.schema == "" || strings.Contains(c.schema, "."):
		return c, fmt.Errorf("-schema %q: want a schema name without dots", c.schema)
	case c.progressEvery <= 0:
		return c, fmt.Errorf("-progress-every %v: must be positive", c.progressEvery)
	}
	switch c.progress {
	case "auto", "bar", "log", "off":
	default:
		return c, fmt.Errorf("-progress %q: want auto, bar, log or off", c.progress)
	}
	if c.dsn == "" {
		c.dsn = os.Getenv("DATABASE_URL")
	}
	if c.checkpointSchema == "" {
		c.checkpointSchema = c.schema
	}
	if c.job == "" {
		c.job = "products-" + c.source
	}
	return c, nil
}

func main() {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	code := run(os.Args[1:], os.Stdout, os.Stderr, sigs)
	signal.Stop(sigs)
	os.Exit(code)
}

// run runs the job with args and returns the exit status. The first signal from
// sigs stops reading and commits what is buffered; a second abandons the buffer.
func run(args []string, stdout, stderr io.Writer, sigs <-chan os.Signal) int {
	cfg, err := parseFlags(args, stderr)
	if err == flag.ErrHelp {
		return exitOK
	}
	if err != nil {
		if !errors.Is(err, errFlagParse) {
			fmt.Fprintf(stderr, "products: %v\n", err)
		}
		return exitUsage
	}

	// Read ends the source at the first signal; Job, which bounds the database
	// work, only at the second, so the buffered rows are committed.
	sg := jobkit.WatchSignals(sigs)
	cfg.tty = jobkit.IsTerminal(stderr)
	// The job's goroutines (flusher, lease renewal, progress) log to stderr too.
	stderr = &jobkit.LockedWriter{W: stderr}
	j := &job{cfg: cfg, stdout: stdout, stderr: stderr}
	if cfg.metrics != "" {
		if j.metrics, err = startMetrics(cfg.metrics, slog.New(slog.NewTextHandler(stderr, nil))); err != nil {
			fmt.Fprintf(stderr, "products: %v\n", err)
			sg.Stop()
			return exitFailed
		}
		defer j.metrics.stop()
	}
	code := j.run(sg.Read, sg.Job, sg.Signaled)
	sg.Stop()
	return code
}
