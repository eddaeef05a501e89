// Command orders is pgetl's star-schema example job (issue 15): it loads order
// lines into customers, orders and order_lines, resolving each line's customer
// (get-or-create by e-mail) and product (lookup of its SKU) inside the batch's own
// transaction, with the order header, the lines and the checkpoint committed
// together.
//
//	go -C examples run ./products -mode insert -rows 10000   # the products first
//	go -C examples run ./orders -rows 400000
//
// # Source
//
// Source line i = 1..N is the orders workload of internal/workload (Orders.Line):
// four lines per order, customers shared by orders, SKUs over -products products,
// every -bad-every-th line with qty 0 (refused by the table's check). -source
// synthetic generates it in memory; -source csv:PATH reads a file with the header
// order_id,line_no,email,customer_name,sku,qty,unit_price,ordered_at.
//
// # How it loads
//
// One [pgetl.BatchSet] over two tables, parents first: orders (upsert on order_id
// with IgnoreExisting, its customer_id a GetOrCreate lookup of customers by email,
// creating the customer with its name) and order_lines (its product_id a LookupOnly
// lookup of <products-schema>.products by sku, the cache preloaded from it). A
// line adds its order's header when it starts the order (or starts the run: a
// resumed run may begin in the middle of an order, whose header IgnoreExisting
// then leaves as it is). A line with qty 0, an unknown SKU or a field that does not
// parse is rejected into <schema>.reject; its order's header is still written.
//
// The tables are created in -schema if missing; the products table is the
// products job's (<products-schema>.products) and must exist.
//
// # Resume, restart, fencing
//
// The cursor committed with each batch is the source line number. A rerun with the
// same -job resumes after it; a finished job starts over; -restart starts an
// unfinished one over; -takeover claims a killed run's job at once.
//
// # Exit status
//
// 0 only when every source line is accounted for (loaded or rejected); 1 when the
// job failed (including more than -max-rejects rejects); 2 for bad flags; 130/143
// after SIGINT/SIGTERM (the buffered lines are committed first).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
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
	dsn            string
	source         string // "synthetic" or "csv"
	csvPath        string
	rows           int64
	products       int64
	productsSchema string
	badEvery       int64
	maxRejects     int64
	schema         string
	job            string
	commitRows     int
	restart        bool
	takeover       bool
	progress       string
	progressEvery  time.Duration
	lease          time.Duration
	claimWait      time.Duration
	args           []string // as given, for the resume hint
	tty            bool
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("orders", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.dsn, "dsn", "", "connection string (default: $DATABASE_URL, else libpq's PG* variables and defaults)")
	fs.StringVar(&c.source, "source", "synthetic", "lines to load: synthetic or csv:PATH")
	fs.Int64Var(&c.rows, "rows", 400_000, "synthetic: source lines N")
	fs.Int64Var(&c.products, "products", 10_000, "products P the SKUs range over (load them with: go -C examples run ./products -mode insert -rows P)")
	fs.StringVar(&c.productsSchema, "products-schema", "", "schema of the products table (default: -schema)")
	fs.Int64Var(&c.badEvery, "bad-every", 0, "synthetic: every K-th line has qty 0 and is rejected (0: none)")
	fs.Int64Var(&c.maxRejects, "max-rejects", -1, "rejected lines allowed before the job fails (-1: no limit; 0: the first bad line is fatal)")
	fs.StringVar(&c.schema, "schema", "pgetl_demo", "schema of customers, orders, order_lines and the checkpoint and reject tables, created if missing")
	fs.StringVar(&c.job, "job", "", "job name, the checkpoint key (default: orders-<source>)")
	fs.IntVar(&c.commitRows, "commit-rows", 0, fmt.Sprintf("table rows (headers and lines) per batch (0: pgetl's default, %d, reached after a slow start from 500)", pgetl.CommitRowsDefault))
	fs.BoolVar(&c.restart, "restart", false, "start the job over instead of resuming it")
	fs.BoolVar(&c.takeover, "takeover", false, "claim the job even if another run's lease has not expired (that run must be dead)")
	fs.StringVar(&c.progress, "progress", "auto", "progress display: auto (a bar on a terminal, else log lines), bar, log or off")
	fs.DurationVar(&c.progressEvery, "progress-every", 10*time.Second, "interval of the progress log lines")
	fs.DurationVar(&c.lease, "lease", 10*time.Second, "how long this run's claim on the job lasts without renewal")
	fs.DurationVar(&c.claimWait, "claim-wait", 15*time.Second, "how long to wait for a killed run's claim to expire")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go -C examples run ./orders [flags]\n\nLoads order lines into customers, orders and order_lines with pgetl. Flags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, err
		}
		return c, fmt.Errorf("%w: %w", errFlagParse, err)
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	c.args = args
	switch {
	case c.source == "synthetic":
	case strings.HasPrefix(c.source, "csv:") && len(c.source) > 4:
		c.csvPath, c.source = c.source[4:], "csv"
	default:
		return c, fmt.Errorf("-source %q: want synthetic or csv:PATH", c.source)
	}
	switch {
	case c.rows < 0:
		return c, fmt.Errorf("-rows %d: must not be negative", c.rows)
	case c.products < 1:
		return c, fmt.Errorf("-products %d: must be at least 1", c.products)
	case c.badEvery < 0:
		return c, fmt.Errorf("-bad-every %d: must not be negative", c.badEvery)
	case c.maxRejects < -1:
		return c, fmt.Errorf("-max-rejects %d: want -1 (no limit), 0 or more", c.maxRejects)
	case c.commitRows < 0:
		return c, fmt.Errorf("-commit-rows %d: must not be negative", c.commitRows)
	case c.lease < time.Second:
		return c, fmt.Errorf("-lease %v: must be at least 1s", c.lease)
	case c.schema == "" || strings.Contains(c.schema, "."):
		return c, fmt.Errorf("-schema %q: want a schema name without dots", c.schema)
	case strings.Contains(c.productsSchema, "."):
		return c, fmt.Errorf("-products-schema %q: want a schema name without dots", c.productsSchema)
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
	if c.productsSchema == "" {
		c.productsSchema = c.schema
	}
	if c.job == "" {
		c.job = "orders-" + c.source
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
			fmt.Fprintf(stderr, "orders: %v\n", err)
		}
		return exitUsage
	}
	sg := jobkit.WatchSignals(sigs)
	cfg.tty = jobkit.IsTerminal(stderr)
	stderr = &jobkit.LockedWriter{W: stderr}
	j := &job{cfg: cfg, stdout: stdout, stderr: stderr}
	code := j.run(sg.Read, sg.Job, sg.Signaled)
	sg.Stop()
	return code
}
