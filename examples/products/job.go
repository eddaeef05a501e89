package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
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

// job is one run of the sync.
type job struct {
	cfg            config
	stdout, stderr io.Writer
	log            *slog.Logger

	pool  *pgxpool.Pool
	table string // quoted schema.products
	cache *pgetl.Cache[string, int64]
	src   source

	metrics *metrics // -metrics, else nil

	read       atomic.Int64 // rows read from the source by this run
	apiRetries atomic.Int64

	mu       sync.Mutex // guards the fields below
	pending  []pending  // upsert: rows added and not yet committed, by cursor
	inserted int64      // committed rows whose SKU was new
	updated  int64      // committed rows whose SKU existed
}

// pending is a row added to the batch session and not yet known to be committed.
type pending struct {
	pos   int64
	sku   string
	isNew bool
}

// outcome of a run, for the summary.
type outcome struct {
	status    string
	err       error
	cp        pgetl.Checkpoint
	stat      pgetl.Stat
	resumedAt int64
	elapsed   time.Duration
	lost      *pgetl.CheckpointLostError // the database lost committed batches
}

func (j *job) run(readCtx, jobCtx context.Context, signaled func() os.Signal) int {
	start := time.Now()
	level := slog.LevelInfo
	j.log = slog.New(slog.NewTextHandler(j.stderr, &slog.HandlerOptions{Level: level}))
	fail := func(err error) int {
		fmt.Fprintln(j.stderr, "products: "+jobkit.OneLine(err.Error()))
		return exitFailed
	}

	pool, err := jobkit.Connect(jobCtx, j.cfg.dsn)
	if err != nil {
		return fail(err)
	}
	defer pool.Close()
	j.pool = pool
	if err := j.ensureTable(jobCtx); err != nil {
		return fail(err)
	}
	sess, err := j.claim(readCtx)
	if err != nil {
		if sig := signaled(); sig != nil {
			fmt.Fprintf(j.stderr, "products: interrupted by %v before the job started\n", sig)
			return exitInterrupted + int(sig.(syscall.Signal))
		}
		return fail(err)
	}
	j.metrics.observe(sess)
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
			return fail(fmt.Errorf("job %q: checkpoint cursor %q is not a row number: is it another program's job? (use -job or -restart)", j.cfg.job, cp.Cursor))
		}
	}

	if j.cfg.mode == "upsert" {
		if j.cache, err = pgetl.NewCache[string, int64](pgetl.CacheConfig{}); err != nil {
			return fail(err)
		}
		t0 := time.Now()
		if err := j.cache.Preload(jobCtx, pool, pgetl.Lookup{Table: j.table, Key: "sku", Value: "id"}); err != nil {
			return fail(err)
		}
		st := j.cache.Stat()
		j.log.Info("SKU cache preloaded", "skus", st.Len(), "pages", st.PreloadedPages(), "took", time.Since(t0).Round(time.Millisecond))
		j.metrics.observeCache("sku", j.cache)
	}

	src, stopSrc, err := j.openSource(after)
	if err != nil {
		return fail(err)
	}
	j.src = src
	defer stopSrc()
	total, last := src.Total()
	if after > 0 {
		j.log.Info("resuming", "job", j.cfg.job, "after", src.Where(after), "rows_committed_before", cp.Rows, "rejects_before", cp.Rejects)
	}

	bcfg := pgetl.BatchConfig{
		// BatchConfig.Table quotes each dot-separated part itself.
		Table:          j.cfg.schema + "." + workload.Table,
		Columns:        workload.Columns,
		CommitRows:     j.cfg.commitRows,
		InFlight:       j.cfg.inFlight,
		CommitInterval: j.cfg.commitInterval,
		OnCommitFunc:   j.onCommit,
	}
	switch j.cfg.mode {
	case "upsert":
		bcfg.Key, bcfg.OnlyChanged = []string{"sku"}, true
	case "sync":
		// Only changed rows are sent: new ones are COPYed into the table, changed
		// ones updated (the sync's own key cache).
		bcfg.Key = []string{"sku"}
	}
	if j.cfg.mode == "sync" {
		ratio := j.cfg.maxDeleteRatio
		if ratio == 0 {
			ratio = math.SmallestNonzeroFloat64 // 0 means no deletes; the library's 0 is its default
		}
		bcfg.Sync = &pgetl.SyncConfig{MaxDeleteRatio: ratio, SweepRows: j.cfg.sweepRows}
	}
	if j.cfg.maxRejects > 0 {
		bcfg.Rejects, bcfg.MaxRejects = pgetl.RejectToTable, j.cfg.maxRejects
	}
	b, err := sess.Batch(jobCtx, bcfg)
	if err != nil {
		return fail(err)
	}
	if keys, size := b.SyncCache(); bcfg.Sync != nil {
		j.log.Info("sync: row hashes preloaded", "keys", keys, "bytes", size, "bytes_per_key", float64(size)/float64(max(keys, 1)))
	}

	prog := jobkit.StartProgress(jobkit.ProgressConfig{Mode: j.cfg.progress, TTY: j.cfg.tty, W: j.stderr, Log: j.log,
		Every: j.cfg.progressEvery, Remaining: total - min(after, total), Resuming: after > 0,
		Read: j.read.Load, Session: sess, OtherRetries: j.apiRetries.Load})
	var loopErr error
	eof := false
	for {
		if readCtx.Err() != nil {
			break
		}
		r, err := src.Next(readCtx)
		if errors.Is(err, io.EOF) {
			eof = true
			break
		}
		if err != nil {
			if readCtx.Err() == nil {
				loopErr = err
			}
			break
		}
		j.track(r)
		j.read.Add(1)
		if err := b.Add(jobCtx, strconv.FormatInt(r.pos, 10), r.values...); err != nil {
			loopErr = err
			break
		}
	}
	// A sync whose source was read in full deletes the products missing from it.
	var sweepErr error
	if bcfg.Sync != nil && eof && loopErr == nil && signaled() == nil {
		t0 := time.Now()
		j.log.Info("sweeping: deleting the products missing from the source")
		var res pgetl.SweepResult
		res, sweepErr = b.Sweep(jobCtx)
		j.log.Info("sweep", "deleted", res.Deleted, "deleted_before", res.DeletedAlready, "table_rows", res.Table,
			"transactions", res.Transactions, "took", time.Since(t0).Round(time.Millisecond), "err", sweepErr)
	}
	// Commit what is buffered: also after a signal or a refused row, whose
	// predecessors are committed.
	closeErr := b.Close(jobCtx)
	if sweepErr != nil {
		closeErr = sweepErr
	}
	prog.Stop()
	out := outcome{elapsed: time.Since(start), stat: sess.Stat(), resumedAt: after}
	out.cp, _ = sess.Checkpoint(context.WithoutCancel(jobCtx))
	out.err = loopErr
	if out.err == nil {
		out.err = closeErr
	}
	if errors.As(out.err, &out.lost) {
		out.cp = out.lost.Database // what the database still has, not what it acknowledged
	}
	sig := signaled()
	code := exitOK
	switch {
	case out.lost != nil:
		out.status, code = "FAILED: the database lost committed batches (failover or restore)", exitFailed
	case out.err != nil:
		out.status, code = "FAILED", exitFailed
	case sig != nil:
		out.status, code = "INTERRUPTED by "+jobkit.SigName(sig), exitInterrupted+int(sig.(syscall.Signal))
	case out.cp.Cursor != strconv.FormatInt(last, 10) && last > 0:
		out.err = fmt.Errorf("the checkpoint stands at %q, not at the source's last row %d", out.cp.Cursor, last)
		out.status, code = "INCOMPLETE", exitFailed
	default:
		if err := sess.Finish(jobCtx); err != nil {
			out.err = err
			out.status, code = "FAILED", exitFailed
		} else {
			out.status = "done: every source row accounted for"
		}
	}
	j.summary(out)
	if out.err != nil {
		fmt.Fprintln(j.stderr, "products: "+j.describe(out.err))
	}
	if code != exitOK && code != exitUsage {
		j.hint()
	}
	return code
}

// ensureTable creates the target schema and products table if missing.
func (j *job) ensureTable(ctx context.Context) error {
	j.table = pgx.Identifier{j.cfg.schema, workload.Table}.Sanitize()
	create := strings.Replace(workload.CreateSQL(j.table, true), "CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ", 1)
	_, err := j.pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{j.cfg.schema}.Sanitize()+"; "+create)
	if err != nil {
		return fmt.Errorf("create %s: %w", j.table, err)
	}
	return nil
}

// claim starts the job's session: a finished job starts over, and a claim held by a
// killed run is waited for up to -claim-wait (or taken over with -takeover).
func (j *job) claim(ctx context.Context) (*pgetl.Session, error) {
	return jobkit.Claim(ctx, j.pool, j.metrics.sessionConfig(pgetl.SessionConfig{
		Job:              j.cfg.job,
		CheckpointSchema: j.cfg.checkpointSchema,
		Restart:          j.cfg.restart,
		Takeover:         j.cfg.takeover,
		Lease:            j.cfg.lease,
		Logger:           j.log,
	}), j.cfg.claimWait, true, j.log)
}

// openSource opens the source after the resume position. stop ends what it started.
func (j *job) openSource(after int64) (source, func(), error) {
	switch j.cfg.source {
	case "synthetic":
		return &synthetic{i: min(after, j.cfg.rows), n: j.cfg.rows, v: j.cfg.version, gen: j.gen()}, func() {}, nil
	case "csv":
		s, err := openCSV(j.cfg.csvPath, after)
		if err != nil {
			return nil, nil, err
		}
		return s, func() { s.Close() }, nil
	}
	srv, err := startAPI(j.cfg.rows, j.cfg.version, j.gen(), j.cfg.pageDelay, j.cfg.apiFaults, j.cfg.apiMalformedPage)
	if err != nil {
		return nil, nil, err
	}
	j.log.Info("product API listening", "url", srv.URL()+"/products?page=1&size="+strconv.FormatInt(j.cfg.pageSize, 10))
	c := newAPIClient(srv.URL(), j.cfg.pageSize, func() { j.apiRetries.Add(1) })
	s := openAPI(c, j.cfg.rows, after, j.gen())
	return s, func() {
		s.Close()
		srv.Close()
	}, nil
}

// track records an added row for the inserted/updated counts (and, for a new SKU,
// to cache its id once committed).
func (j *job) track(r row) {
	if j.cache == nil {
		return
	}
	_, known := j.cache.Get(r.sku)
	j.mu.Lock()
	j.pending = append(j.pending, pending{pos: r.pos, sku: r.sku, isNew: !known && r.sku != ""})
	j.mu.Unlock()
}

// onCommit runs in the batch session's flusher goroutine after each COMMIT. It
// takes the batch's rows off the pending queue (those up to the commit's cursor),
// reads the ids of its new SKUs (one query) and caches them: they are committed.
func (j *job) onCommit(res pgetl.BatchResult) {
	if j.cfg.mode == "sync" {
		return // the session's Stat counts inserted, updated, unchanged and deleted rows
	}
	if j.cache == nil {
		j.mu.Lock()
		j.inserted += res.Rows
		j.mu.Unlock()
		return
	}
	c, _ := strconv.ParseInt(res.Cursor, 10, 64)
	var skus []string
	seen := map[string]bool{}
	j.mu.Lock()
	k := 0
	for k < len(j.pending) && j.pending[k].pos <= c {
		if p := j.pending[k]; p.isNew && !seen[p.sku] {
			seen[p.sku] = true
			skus = append(skus, p.sku)
		}
		k++
	}
	j.pending = append(j.pending[:0:0], j.pending[k:]...)
	j.mu.Unlock()

	var inserted int64
	if len(skus) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rows, err := j.pool.Query(ctx, "SELECT sku, id FROM "+j.table+" WHERE sku = ANY($1)", skus)
		if err == nil {
			var sku string
			var id int64
			_, err = pgx.ForEachRow(rows, []any{&sku, &id}, func() error {
				// Contains, not Get: this is bookkeeping, not a lookup (track's Get
				// counted the row's lookup in CacheStat already).
				if !j.cache.Contains(sku) {
					inserted++ // not an earlier batch's new SKU seen again
				}
				j.cache.Put(sku, id)
				return nil
			})
		}
		if err != nil {
			// The rows are committed; only the cache and the counts miss them.
			j.log.Warn("reading the ids of new SKUs failed; they will count as updates", "err", err)
		}
	}
	j.mu.Lock()
	j.inserted += inserted
	j.updated += res.Rows - inserted
	j.mu.Unlock()
}

// describe turns an error of the run into one line that says where in the source
// it happened.
func (j *job) describe(err error) string {
	var fe *fieldError
	var be *pgetl.BatchError
	if errors.As(err, &be) && be.Row >= 0 && j.src != nil {
		where := be.Cursor
		if pos, perr := strconv.ParseInt(be.Cursor, 10, 64); perr == nil {
			where = j.src.Where(pos)
		}
		if errors.Is(err, pgetl.ErrTooManyRejects) {
			return jobkit.OneLine(fmt.Sprintf("more than -max-rejects %d rows rejected (the last at %s); nothing of that batch was committed; the rejected rows are in %s: %v",
				j.cfg.maxRejects, where, j.rejectTable(), err))
		}
		var msg string
		switch {
		case errors.As(err, &fe):
			msg = fe.Error()
		default:
			msg = be.Err.Error()
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) {
				msg = pgErr.Message + " (SQLSTATE " + pgErr.Code + ")"
			}
			if be.Column != "" {
				msg = fmt.Sprintf("%s %q: %s", be.Column, be.Value, msg)
			}
		}
		return jobkit.OneLine(fmt.Sprintf("bad row at %s: %s; the rows before it are committed (-max-rejects N rejects up to N bad rows instead)", where, msg))
	}
	return jobkit.OneLine(err.Error())
}

func (j *job) rejectTable() string {
	return pgx.Identifier{j.cfg.checkpointSchema, "reject"}.Sanitize()
}

// summary prints the run's summary on stdout.
func (j *job) summary(o outcome) {
	w := j.stdout
	source := j.cfg.source
	switch source {
	case "csv":
		source = "csv " + j.cfg.csvPath
	default:
		source = fmt.Sprintf("%s, %d rows at version %d", source, j.cfg.rows, j.cfg.version)
	}
	mode := "upsert on sku"
	switch j.cfg.mode {
	case "insert":
		mode = "insert"
	case "sync":
		mode = "sync on sku"
	}
	j.mu.Lock()
	ins, upd := j.inserted, j.updated
	j.mu.Unlock()
	st := o.stat
	secs := o.elapsed.Seconds()
	fmt.Fprintf(w, "products sync %s\n", o.status)
	fmt.Fprintf(w, "  job         %s (%s, %s)\n", j.cfg.job, source, mode)
	fmt.Fprintf(w, "  target      %s (checkpoint %s, rejects %s)\n", j.table,
		pgx.Identifier{j.cfg.checkpointSchema, "checkpoint"}.Sanitize(), j.rejectTable())
	if o.resumedAt > 0 && j.src != nil {
		fmt.Fprintf(w, "  resumed     after %s\n", j.src.Where(o.resumedAt))
	}
	fmt.Fprintf(w, "  rows read   %d\n", j.read.Load())
	loaded := st.Rows()
	if o.lost != nil {
		// Rows this run committed that the database no longer has are not loaded.
		gone := o.lost.Committed.Rows - o.lost.Database.Rows
		loaded = max(0, loaded-gone)
		fmt.Fprintf(w, "  loaded      %d (%d more were committed but lost by the database; inserted/updated unknown after the loss)\n", loaded, gone)
	} else if j.cfg.mode == "sync" {
		fmt.Fprintf(w, "  loaded      %d (inserted %d, updated %d)\n", loaded, st.Inserted(), st.Updated())
		fmt.Fprintf(w, "  sync        %d new, %d updated, %d deleted, %d unchanged (this run)\n",
			st.Inserted(), st.Updated(), st.Deleted(), st.Unchanged())
	} else {
		fmt.Fprintf(w, "  loaded      %d (inserted %d, updated %d)\n", loaded, ins, upd)
	}
	fmt.Fprintf(w, "  rejects     %d\n", st.Rejects())
	fmt.Fprintf(w, "  batches     %d\n", st.Batches())
	fmt.Fprintf(w, "  retries     %d (database %d, api %d)\n", st.TotalRetries()+j.apiRetries.Load(), st.TotalRetries(), j.apiRetries.Load())
	fmt.Fprintf(w, "  elapsed     %s\n", o.elapsed.Round(time.Millisecond))
	rate := 0.0
	if secs > 0 {
		rate = float64(loaded) / secs
		if j.cfg.mode == "sync" {
			rate = float64(j.read.Load()) / secs // rows compared, most of them not written
		}
	}
	fmt.Fprintf(w, "  rate        %.0f rows/s\n", rate)
	where := "none"
	if o.cp.Cursor != "" && j.src != nil {
		if pos, err := strconv.ParseInt(o.cp.Cursor, 10, 64); err == nil {
			where = j.src.Where(pos)
		}
	}
	fmt.Fprintf(w, "  checkpoint  %s (job total: %d rows, %d rejects)\n", where, o.cp.Rows, o.cp.Rejects)
	if o.lost != nil {
		fmt.Fprintf(w, "  lost        %d rows (batches %d..%d); a rerun resumes after %s\n",
			o.lost.Committed.Rows-o.lost.Database.Rows, o.lost.Database.Seq+1, o.lost.Committed.Seq, where)
	}
	fmt.Fprintf(w, "  look        psql -c 'SELECT * FROM %s ORDER BY id DESC LIMIT 5'\n", j.table)
	if st.Rejects() > 0 || o.cp.Rejects > 0 {
		fmt.Fprintf(w, "  see rejects SELECT row_index, cursor, message FROM %s WHERE job = '%s'\n", j.rejectTable(), strings.ReplaceAll(j.cfg.job, "'", "''"))
	}
}

// hint prints how to resume a run that did not complete.
func (j *job) hint() {
	fmt.Fprintf(j.stderr, "products: committed rows are kept; resume with: %s\n", jobkit.ResumeCommand("products", j.cfg.dsn, j.cfg.args))
}

// gen returns the generator flags of the api and synthetic sources.
func (j *job) gen() generator {
	return generator{changedEvery: j.cfg.changedEvery, missingEvery: j.cfg.missingEvery}
}
