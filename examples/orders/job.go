package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/examples/internal/jobkit"
	"github.com/pgetl/pgetl/internal/workload"
)

// job is one run of the orders load.
type job struct {
	cfg            config
	stdout, stderr io.Writer
	log            *slog.Logger

	pool      *pgxpool.Pool
	schema    string // quoted -schema
	products  string // quoted <products-schema>.products
	customers *pgetl.Cache[string, int64]
	skus      *pgetl.Cache[string, int64]
	src       source

	read    atomic.Int64 // source lines read by this run
	headers atomic.Int64 // order headers added by this run
}

// outcome of a run, for the summary.
type outcome struct {
	status    string
	err       error
	cp        pgetl.Checkpoint
	stat      pgetl.Stat
	resumedAt int64
	elapsed   time.Duration
}

func (j *job) run(readCtx, jobCtx context.Context, signaled func() os.Signal) int {
	start := time.Now()
	j.log = slog.New(slog.NewTextHandler(j.stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	fail := func(err error) int {
		fmt.Fprintln(j.stderr, "orders: "+jobkit.OneLine(err.Error()))
		return exitFailed
	}
	pool, err := jobkit.Connect(jobCtx, j.cfg.dsn)
	if err != nil {
		return fail(err)
	}
	defer pool.Close()
	j.pool = pool
	if err := j.ensureTables(jobCtx); err != nil {
		return fail(err)
	}
	sess, err := jobkit.Claim(readCtx, pool, pgetl.SessionConfig{
		Job:              j.cfg.job,
		CheckpointSchema: j.cfg.schema,
		Restart:          j.cfg.restart,
		Takeover:         j.cfg.takeover,
		Lease:            j.cfg.lease,
		Logger:           j.log,
	}, j.cfg.claimWait, false, j.log)
	if errors.Is(err, pgetl.ErrJobFinished) {
		// Loading the same lines again would only collide with them: a finished
		// job is done; -restart loads it again (into emptied tables).
		fmt.Fprintf(j.stdout, "orders load done: job %s finished in an earlier run, every source line accounted for (-restart loads it again)\n", j.cfg.job)
		return exitOK
	}
	if err != nil {
		if sig := signaled(); sig != nil {
			fmt.Fprintf(j.stderr, "orders: interrupted by %v before the job started\n", sig)
			return exitInterrupted + int(sig.(syscall.Signal))
		}
		return fail(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(jobCtx), 10*time.Second)
		defer cancel()
		if err := sess.Close(ctx); err != nil {
			j.log.Warn("close session", "err", err)
		}
	}()
	cp, err := sess.Checkpoint(jobCtx)
	if err != nil {
		return fail(err)
	}
	var after int64
	if cp.Cursor != "" {
		if after, err = strconv.ParseInt(cp.Cursor, 10, 64); err != nil {
			return fail(fmt.Errorf("job %q: checkpoint cursor %q is not a line number: is it another program's job? (use -job or -restart)", j.cfg.job, cp.Cursor))
		}
	}
	if err := j.preload(jobCtx); err != nil {
		return fail(err)
	}

	src, err := j.openSource(after)
	if err != nil {
		return fail(err)
	}
	j.src = src
	defer src.Close()
	total := src.Total()
	if after > 0 {
		j.log.Info("resuming", "job", j.cfg.job, "after", src.Where(after), "rows_committed_before", cp.Rows, "rejects_before", cp.Rejects)
	}

	set, err := sess.Batches(jobCtx, j.batchConfigs()...)
	if err != nil {
		return fail(err)
	}
	prog := jobkit.StartProgress(jobkit.ProgressConfig{Mode: j.cfg.progress, TTY: j.cfg.tty, W: j.stderr, Log: j.log,
		Every: j.cfg.progressEvery, Remaining: total - min(after, total), Resuming: after > 0, Unit: "lines",
		Read: j.read.Load, Session: sess})
	loopErr := j.load(readCtx, jobCtx, set)
	// Commit what is buffered: also after a signal or a refused line, whose
	// predecessors are committed.
	closeErr := set.Close(jobCtx)
	prog.Stop()
	out := outcome{elapsed: time.Since(start), stat: sess.Stat(), resumedAt: after}
	out.cp, _ = sess.Checkpoint(context.WithoutCancel(jobCtx))
	out.err = loopErr
	if out.err == nil {
		out.err = closeErr
	}
	sig := signaled()
	code := exitOK
	switch {
	case out.err != nil:
		out.status, code = "FAILED", exitFailed
	case sig != nil:
		out.status, code = "INTERRUPTED by "+jobkit.SigName(sig), exitInterrupted+int(sig.(syscall.Signal))
	case total > 0 && out.cp.Cursor != strconv.FormatInt(total, 10):
		out.err = fmt.Errorf("the checkpoint stands at %q, not at the source's last line %d", out.cp.Cursor, total)
		out.status, code = "INCOMPLETE", exitFailed
	default:
		if err := sess.Finish(jobCtx); err != nil {
			out.err = err
			out.status, code = "FAILED", exitFailed
		} else {
			out.status = "done: every source line accounted for"
		}
	}
	j.summary(out)
	if out.err != nil {
		fmt.Fprintln(j.stderr, "orders: "+j.describe(out.err))
	}
	if code != exitOK {
		fmt.Fprintf(j.stderr, "orders: committed rows are kept; resume with: %s\n", jobkit.ResumeCommand("orders", j.cfg.dsn, j.cfg.args))
	}
	return code
}

// ensureTables creates the schema and the three tables if missing; the products
// table must exist.
func (j *job) ensureTables(ctx context.Context) error {
	j.schema = pgx.Identifier{j.cfg.schema}.Sanitize()
	j.products = pgx.Identifier{j.cfg.productsSchema, workload.Table}.Sanitize()
	var exists bool
	if err := j.pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", j.products).Scan(&exists); err != nil {
		return fmt.Errorf("look for %s: %w", j.products, err)
	}
	if !exists {
		return fmt.Errorf("no products table %s: load the products first: go -C examples run ./products -mode insert -rows %d -schema %s",
			j.products, j.cfg.products, jobkit.ShellQuote(j.cfg.productsSchema))
	}
	// Jobs starting together (with other -job names) would race on the catalog:
	// one transaction, under a lock, creates what is missing.
	err := pgx.BeginFunc(ctx, j.pool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('pgetl examples/orders tables'));"+
			"CREATE SCHEMA IF NOT EXISTS "+j.schema+";"+fmt.Sprintf(workload.OrdersCreateSQL, j.schema, j.products))
		return err
	})
	if err != nil {
		return fmt.Errorf("create the tables in %s: %w", j.schema, err)
	}
	return nil
}

// preload fills the SKU cache from the products table and the customer cache from
// the customers table (empty on a first run).
func (j *job) preload(ctx context.Context) error {
	var err error
	if j.skus, err = pgetl.NewCache[string, int64](pgetl.CacheConfig{}); err != nil {
		return err
	}
	if j.customers, err = pgetl.NewCache[string, int64](pgetl.CacheConfig{}); err != nil {
		return err
	}
	t0 := time.Now()
	if err := j.skus.Preload(ctx, j.pool, j.productsLookup()); err != nil {
		return err
	}
	if err := j.customers.Preload(ctx, j.pool, j.customersLookup()); err != nil {
		return err
	}
	n := j.skus.Stat().Len()
	j.log.Info("caches preloaded", "skus", n, "customers", j.customers.Stat().Len(), "took", time.Since(t0).Round(time.Millisecond))
	if n < j.cfg.products {
		j.log.Warn("fewer products than -products: lines with the missing SKUs will be rejected", "table", j.products, "products", n, "want", j.cfg.products)
	}
	return nil
}

func (j *job) productsLookup() pgetl.Lookup {
	return pgetl.Lookup{Table: j.cfg.productsSchema + "." + workload.Table, Key: "sku", Value: "id"}
}

func (j *job) customersLookup() pgetl.Lookup {
	return pgetl.Lookup{Table: j.cfg.schema + ".customers", Key: "email", Value: "id", InsertColumns: []string{"name"}}
}

// batchConfigs returns the set's tables, parents first: orders (values order_id,
// email, ordered_at, customer name) and order_lines (order_id, line_no, sku, qty,
// unit_price).
func (j *job) batchConfigs() []pgetl.BatchConfig {
	orders := pgetl.BatchConfig{
		Table:   j.cfg.schema + ".orders",
		Columns: []string{"order_id", "customer_id", "ordered_at"},
		// A header may come again: with the first line of a resumed run, or in a
		// batch after its order's first lines. The first one written stays.
		Key: []string{"order_id"}, IgnoreExisting: true,
		CommitRows: j.cfg.commitRows,
		Lookups: []pgetl.LookupColumn{{Column: "customer_id", Mode: pgetl.GetOrCreate, Cache: j.customers,
			Source: j.customersLookup()}},
	}
	switch {
	case j.cfg.maxRejects == 0:
		orders.Rejects = pgetl.RejectFail
	case j.cfg.maxRejects > 0:
		orders.Rejects, orders.MaxRejects = pgetl.RejectToTable, j.cfg.maxRejects
	default:
		orders.Rejects = pgetl.RejectToTable
	}
	lines := pgetl.BatchConfig{
		Table:   j.cfg.schema + ".order_lines",
		Columns: []string{"order_id", "line_no", "product_id", "qty", "unit_price"},
		Lookups: []pgetl.LookupColumn{{Column: "product_id", Mode: pgetl.LookupOnly, Cache: j.skus, Source: j.productsLookup()}},
	}
	return []pgetl.BatchConfig{orders, lines}
}

// openSource opens the source after the resume position.
func (j *job) openSource(after int64) (source, error) {
	if j.cfg.source == "csv" {
		return openCSV(j.cfg.csvPath, after)
	}
	o := workload.Orders{N: j.cfg.rows, Products: j.cfg.products, BadEvery: j.cfg.badEvery}
	return &synthetic{o: o, i: min(after, o.N)}, nil
}

// load adds the source's lines to set until the source ends, readCtx ends or Add
// fails.
func (j *job) load(readCtx, jobCtx context.Context, set *pgetl.BatchSet) error {
	var order int64 = -1 // the order whose header was added last
	for readCtx.Err() == nil {
		r, err := j.src.Next(readCtx)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if readCtx.Err() != nil {
				return nil
			}
			return err
		}
		j.read.Add(1)
		header, line := j.values(r, &order)
		if err := set.Add(jobCtx, strconv.FormatInt(r.pos, 10), header, line); err != nil {
			return err
		}
	}
	return nil
}

// values returns the rows of one source line: its order's header (when the line
// starts the order, or the run, or follows a header that was refused) and the line.
// A qty the table's check refuses (qty > 0) is refused at Add, as a field that does
// not parse is, so the line is rejected without a round trip; the header stays.
func (j *job) values(r record, order *int64) (header, line []any) {
	l := r.line
	if r.bad != nil {
		switch r.bad.Column {
		case "email", "customer_name", "ordered_at":
			// The header is refused (and the line then lacks its order: the
			// server refuses it with 23503, and the order's next line tries its
			// header again).
			h := []any{l.OrderID, l.Email, l.OrderedAt, l.CustomerName}
			h[map[string]int{"email": 1, "ordered_at": 2, "customer_name": 3}[r.bad.Column]] = badValue{r.bad}
			*order = -1
			return h, []any{l.OrderID, l.LineNo, l.SKU, l.Qty, price(l)}
		case "line_no", "sku", "qty", "unit_price":
			line = []any{l.OrderID, l.LineNo, l.SKU, l.Qty, price(l)}
			line[map[string]int{"line_no": 1, "sku": 2, "qty": 3, "unit_price": 4}[r.bad.Column]] = badValue{r.bad}
		default: // order_id, or the whole record
			return nil, []any{badValue{r.bad}, nil, nil, nil, nil}
		}
	} else {
		line = []any{l.OrderID, l.LineNo, l.SKU, l.Qty, price(l)}
		if l.Qty <= 0 {
			line[3] = badValue{&workload.FieldError{Column: "qty", Raw: strconv.Itoa(int(l.Qty)), Reason: "violates the check qty > 0 of order_lines"}}
		}
	}
	if l.OrderID != *order {
		*order = l.OrderID
		j.headers.Add(1)
		header = []any{l.OrderID, l.Email, l.OrderedAt, l.CustomerName}
	}
	return header, line
}

func price(l workload.OrderLine) any { return l.Price() }

// describe turns an error of the run into one line that says where in the source
// it happened.
func (j *job) describe(err error) string {
	var be *pgetl.BatchError
	if errors.As(err, &be) && be.Row >= 0 && j.src != nil {
		where := be.Cursor
		if pos, perr := strconv.ParseInt(be.Cursor, 10, 64); perr == nil {
			where = j.src.Where(pos)
		}
		if errors.Is(err, pgetl.ErrTooManyRejects) {
			return jobkit.OneLine(fmt.Sprintf("more than -max-rejects %d lines rejected (the last at %s); nothing of that batch was committed; the rejected lines are in %s: %v",
				j.cfg.maxRejects, where, j.rejectTable(), err))
		}
		var fe *workload.FieldError
		msg := be.Err.Error()
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &fe):
			msg = fe.Error()
		case errors.As(err, &pgErr):
			msg = pgErr.Message + " (SQLSTATE " + pgErr.Code + ")"
		}
		return jobkit.OneLine(fmt.Sprintf("bad line at %s: %s; the lines before it are committed (-max-rejects N rejects up to N bad lines instead)", where, msg))
	}
	return jobkit.OneLine(err.Error())
}

func (j *job) rejectTable() string { return pgx.Identifier{j.cfg.schema, "reject"}.Sanitize() }

// summary prints the run's summary on stdout.
func (j *job) summary(o outcome) {
	w := j.stdout
	source := "csv " + j.cfg.csvPath
	if j.cfg.source == "synthetic" {
		source = fmt.Sprintf("synthetic, %d lines, %d products, bad every %d", j.cfg.rows, j.cfg.products, j.cfg.badEvery)
	}
	st := o.stat
	fmt.Fprintf(w, "orders load %s\n", o.status)
	fmt.Fprintf(w, "  job         %s (%s)\n", j.cfg.job, source)
	fmt.Fprintf(w, "  target      %s.customers, %s.orders, %s.order_lines (products %s; checkpoint %s, rejects %s)\n",
		j.schema, j.schema, j.schema, j.products, pgx.Identifier{j.cfg.schema, "checkpoint"}.Sanitize(), j.rejectTable())
	if o.resumedAt > 0 && j.src != nil {
		fmt.Fprintf(w, "  resumed     after %s\n", j.src.Where(o.resumedAt))
	}
	fmt.Fprintf(w, "  lines read  %d (order headers added %d)\n", j.read.Load(), j.headers.Load())
	fmt.Fprintf(w, "  loaded      %d rows (headers and lines: %d inserted, %d headers already there)\n", st.Rows(), st.Inserted(), st.Unchanged())
	fmt.Fprintf(w, "  rejects     %d\n", st.Rejects())
	fmt.Fprintf(w, "  batches     %d\n", st.Batches())
	fmt.Fprintf(w, "  retries     %d\n", st.TotalRetries())
	if j.customers != nil && j.skus != nil {
		c, p := j.customers.Stat(), j.skus.Stat()
		fmt.Fprintf(w, "  caches      customers %d keys (%.0f B/key, %d hits, %d misses), skus %d keys (%.0f B/key, %d hits, %d misses)\n",
			c.Len(), c.BytesPerKey(), c.Hits(), c.Misses(), p.Len(), p.BytesPerKey(), p.Hits(), p.Misses())
	}
	fmt.Fprintf(w, "  elapsed     %s\n", o.elapsed.Round(time.Millisecond))
	rate := 0.0
	if secs := o.elapsed.Seconds(); secs > 0 {
		rate = float64(j.read.Load()) / secs
	}
	fmt.Fprintf(w, "  rate        %.0f lines/s\n", rate)
	where := "none"
	if o.cp.Cursor != "" && j.src != nil {
		if pos, err := strconv.ParseInt(o.cp.Cursor, 10, 64); err == nil {
			where = j.src.Where(pos)
		}
	}
	fmt.Fprintf(w, "  checkpoint  %s (job total: %d rows, %d rejects)\n", where, o.cp.Rows, o.cp.Rejects)
	if st.Rejects() > 0 || o.cp.Rejects > 0 {
		fmt.Fprintf(w, "  see rejects SELECT cursor, table_name, column_name, message FROM %s WHERE job = '%s'\n", j.rejectTable(), strings.ReplaceAll(j.cfg.job, "'", "''"))
	}
}
