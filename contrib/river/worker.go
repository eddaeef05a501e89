package pgetlriver

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// Defaults of [WorkerConfig].
const (
	// LeaseDefault is the partition sessions' lease: a crashed worker's partition
	// can be claimed this long after its last renewal. Shorter than pgetl's own
	// default because a re-delivered partition waits for it.
	LeaseDefault = 15 * time.Second
	// CloseTimeoutDefault bounds committing a slice's buffered rows and releasing
	// the lease once the partition's loader has returned.
	CloseTimeoutDefault = 10 * time.Second
	// YieldFraction is the share of an attempt's timeout after which
	// [Partition.Add] returns [ErrYield].
	YieldFraction = 0.8
)

// ErrYield is returned by [Partition.Add] when the attempt's time slice is over.
// The row passed to that Add was added. A [LoadFunc] must stop and return it (or an
// error wrapping it): the worker commits the buffered rows and snoozes the
// partition with JobSnooze(0), and the next attempt resumes from the checkpoint.
var ErrYield = errors.New("pgetlriver: time slice over, yield")

// LoadFunc loads one partition: it reads the partition's source from after
// p.Resume.Cursor (all of it when the cursor is empty) and adds the rows with
// p.Add, in source order, each with the cursor a restart should resume after. It
// returns nil once the partition's source is exhausted (the worker then finishes
// the partition), [ErrYield] when p.Add returned it, or another error.
type LoadFunc func(ctx context.Context, p *Partition) error

// Partition is one attempt at a partition, handed to a [LoadFunc].
type Partition struct {
	// Args are the partition's arguments.
	Args PartitionArgs
	// Resume is the partition's checkpoint when the attempt started: skip source
	// rows up to and including Resume.Cursor.
	Resume pgetl.Checkpoint
	// Job is River's job row (ID, Attempt, …).
	Job *rivertype.JobRow

	b        *pgetl.BatchSession
	deadline time.Time // zero: no yield
	added    int64
}

// Add adds one row to the partition's batch session (see [pgetl.BatchSession.Add]).
// It returns ErrYield, after adding the row, once the attempt's time slice is over.
func (p *Partition) Add(ctx context.Context, cursor string, values ...any) error {
	if err := p.b.Add(ctx, cursor, values...); err != nil {
		return err
	}
	p.added++
	if !p.deadline.IsZero() && p.added&127 == 0 && time.Now().After(p.deadline) {
		return ErrYield
	}
	return nil
}

// Batch returns the partition's batch session, for Flush or Stat. Add rows with
// [Partition.Add], which yields at the end of the time slice.
func (p *Partition) Batch() *pgetl.BatchSession { return p.b }

// RangeLoader returns a LoadFunc for key-range partitions: it adds rows
// max(From, cursor+1)..To, row i built by row (which appends row i's values, in
// the order of BatchConfig.Columns, to dst and returns it) with cursor i in
// decimal.
func RangeLoader(row func(i int64, dst []any) []any) LoadFunc {
	return func(ctx context.Context, p *Partition) error {
		if p.Args.Rows() == 0 {
			return fmt.Errorf("pgetlriver: partition %q is not a key range", p.Args.Name())
		}
		from := p.Args.From
		if c := p.Resume.Cursor; c != "" {
			n, err := strconv.ParseInt(c, 10, 64)
			if err != nil {
				return fmt.Errorf("pgetlriver: partition %q: checkpoint cursor %q is not a row number: %w", p.Args.Name(), c, err)
			}
			from = max(from, n+1)
		}
		vals := make([]any, 0, 16)
		for i := from; i <= p.Args.To; i++ {
			vals = row(i, vals[:0])
			if err := p.Add(ctx, strconv.FormatInt(i, 10), vals...); err != nil {
				return err
			}
		}
		return nil
	}
}

// WorkerConfig configures a [Worker].
type WorkerConfig struct {
	// Pool is where the partitions are loaded and their checkpoints kept (a pool
	// from pgetl.NewPool; with pgetl_pooler=pgbouncer behind PgBouncer). Required.
	Pool *pgxpool.Pool
	// Batch returns the batch configuration of a partition (target table,
	// columns, upsert Key, commit size), or an error for arguments it cannot
	// serve (returned to River, which retries). Required.
	Batch func(PartitionArgs) (pgetl.BatchConfig, error)
	// Load reads a partition's source. Required; see [RangeLoader].
	Load LoadFunc
	// Session is the template of every partition's session: its Job, Lease and
	// CheckpointSchema are set from the partition and the fields below, Takeover
	// is always false; Guards, Retry, Logger and OnRetryFunc are used as given.
	Session pgetl.SessionConfig
	// CheckpointSchema is the schema of pgetl's checkpoint table. Defaults to
	// pgetl.CheckpointSchemaDefault.
	CheckpointSchema string
	// Lease is the partition sessions' lease. Defaults to LeaseDefault.
	Lease time.Duration
	// Timeout, if non-zero, is the River timeout of a partition attempt (River's
	// Worker.Timeout), overriding the client's JobTimeout; River's rescuer also
	// uses it. -1 means no timeout, which also means a partition whose worker died
	// is never rescued. The attempt yields (ErrYield) at YieldFraction of it.
	Timeout time.Duration
	// CloseTimeout bounds the commit of the last buffered rows and the lease's
	// release after the loader returned. Defaults to CloseTimeoutDefault.
	CloseTimeout time.Duration
	// Logger receives a line per partition attempt's outcome. Nil is silent.
	Logger *slog.Logger
}

// Worker is the River worker of [PartitionArgs]: it runs each partition as a pgetl
// session named "<job>/<partition>". Register it with river.AddWorker.
type Worker struct {
	river.WorkerDefaults[PartitionArgs]
	cfg WorkerConfig
	log *slog.Logger
}

// NewWorker checks cfg and returns its worker.
func NewWorker(cfg WorkerConfig) (*Worker, error) {
	switch {
	case cfg.Pool == nil:
		return nil, errors.New("pgetlriver: WorkerConfig.Pool is required")
	case cfg.Batch == nil:
		return nil, errors.New("pgetlriver: WorkerConfig.Batch is required")
	case cfg.Load == nil:
		return nil, errors.New("pgetlriver: WorkerConfig.Load is required")
	case cfg.Timeout < -1:
		return nil, errors.New("pgetlriver: WorkerConfig.Timeout must be -1, 0 or positive")
	}
	if cfg.CheckpointSchema == "" {
		cfg.CheckpointSchema = pgetl.CheckpointSchemaDefault
	}
	if cfg.Lease == 0 {
		cfg.Lease = LeaseDefault
	}
	if cfg.Lease < time.Second {
		return nil, fmt.Errorf("pgetlriver: WorkerConfig.Lease must be at least 1s, got %v", cfg.Lease)
	}
	if cfg.CloseTimeout <= 0 {
		cfg.CloseTimeout = CloseTimeoutDefault
	}
	w := &Worker{cfg: cfg, log: cfg.Logger}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	return w, nil
}

// Timeout returns WorkerConfig.Timeout (0: the client's JobTimeout).
func (w *Worker) Timeout(*river.Job[PartitionArgs]) time.Duration { return w.cfg.Timeout }

// Work runs one attempt at a partition. It returns nil when the partition is
// finished (now or before), river.JobSnooze when the partition must wait (its lease
// is held by another run, it was fenced, or the attempt's time slice is over), and
// any other error for River to retry with backoff.
func (w *Worker) Work(ctx context.Context, job *river.Job[PartitionArgs]) error {
	a := job.Args
	if err := a.Validate(); err != nil {
		return river.JobCancel(err) // malformed arguments never become valid
	}
	name := a.Name()
	log := w.log.With("partition", name, "river_job", job.ID, "attempt", job.Attempt)
	start := time.Now()

	scfg := w.cfg.Session
	scfg.Job = name
	scfg.CheckpointSchema = w.cfg.CheckpointSchema
	scfg.Lease = w.cfg.Lease
	scfg.Takeover = false
	scfg.Restart = false
	s, err := pgetl.NewSession(ctx, w.cfg.Pool, scfg)
	switch {
	case errors.Is(err, pgetl.ErrJobFinished):
		log.Info("pgetlriver: partition already finished")
		return nil
	case errors.Is(err, pgetl.ErrJobClaimed):
		d := w.claimedBackoff(ctx, name)
		log.Info("pgetlriver: partition claimed by another run; snoozing", "snooze", d)
		return river.JobSnooze(d)
	case err != nil:
		return err
	}
	closeCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), w.cfg.CloseTimeout)
	}
	defer func() {
		cctx, cancel := closeCtx()
		defer cancel()
		_ = s.Close(cctx) // releases the lease; a failure leaves it to expire
	}()

	resume, err := s.Checkpoint(ctx)
	if err != nil {
		return err
	}
	bcfg, err := w.cfg.Batch(a)
	if err != nil {
		return err
	}
	b, err := s.Batch(ctx, bcfg)
	if err != nil {
		return w.outcome(log, err, resume, resume)
	}
	p := &Partition{Args: a, Resume: resume, Job: job.JobRow, b: b, deadline: w.yieldAt(ctx, start)}
	lerr := w.cfg.Load(ctx, p)
	// Commit what the loader buffered, also after an error of its source: those
	// rows are good, and committing them is progress a retry need not repeat.
	cctx, cancel := closeCtx()
	cerr := b.Close(cctx)
	cancel()
	now, _ := s.Checkpoint(context.WithoutCancel(ctx)) // in memory: no I/O
	if lerr == nil && cerr == nil {
		if err := s.Finish(ctx); err != nil {
			return w.outcome(log, err, resume, now)
		}
		log.Info("pgetlriver: partition finished", "rows", now.Rows, "rows_this_attempt", now.Rows-resume.Rows, "took", time.Since(start).Round(time.Millisecond))
		return nil
	}
	if errors.Is(lerr, ErrYield) && cerr == nil {
		log.Info("pgetlriver: time slice over; partition snoozed to resume", "rows", now.Rows, "rows_this_attempt", now.Rows-resume.Rows)
		return river.JobSnooze(0)
	}
	return w.outcome(log, errors.Join(lerr, cerr), resume, now)
}

// outcome maps a failed attempt's error to what River should do.
func (w *Worker) outcome(log *slog.Logger, err error, resume, now pgetl.Checkpoint) error {
	switch {
	case errors.Is(err, pgetl.ErrFenced):
		// Another session took the partition over: it runs it now. Come back
		// after its lease, to finish or resume what it leaves.
		log.Warn("pgetlriver: partition fenced by another session; snoozing", "snooze", w.cfg.Lease, "err", err)
		return river.JobSnooze(w.cfg.Lease)
	case (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) && now.Seq > resume.Seq:
		// Stopped (client shutdown, job timeout) after progress: resume at once,
		// without spending an attempt. Without progress, the error counts, so a
		// partition that cannot advance still runs out of attempts.
		log.Info("pgetlriver: attempt interrupted after progress; partition snoozed to resume", "rows_this_attempt", now.Rows-resume.Rows, "err", err)
		return river.JobSnooze(0)
	}
	log.Warn("pgetlriver: partition attempt failed", "err", err)
	return err
}

// yieldAt returns when the attempt's time slice ends: at YieldFraction of the
// time left before ctx's deadline (River's job timeout); zero without a deadline.
func (w *Worker) yieldAt(ctx context.Context, start time.Time) time.Time {
	d, ok := ctx.Deadline()
	if !ok {
		return time.Time{}
	}
	return start.Add(time.Duration(float64(d.Sub(start)) * YieldFraction))
}

// claimedBackoff returns how long to snooze a partition whose lease another run
// holds: the rest of that lease plus up to 25 % jitter (so duplicates do not wake
// together), at least 100ms. If the lease cannot be read, one Lease.
func (w *Worker) claimedBackoff(ctx context.Context, name string) time.Duration {
	var secs float64
	err := w.cfg.Pool.QueryRow(ctx, `SELECT coalesce(extract(epoch FROM greatest(lease_until - now(), '0'))::float8, 0) FROM `+
		pgx.Identifier{w.cfg.CheckpointSchema}.Sanitize()+`.checkpoint WHERE job = $1`, name).Scan(&secs)
	left := time.Duration(secs * float64(time.Second))
	if err != nil || left > w.cfg.Lease {
		left = w.cfg.Lease
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	jitter := time.Duration(binary.LittleEndian.Uint64(b[:]) % uint64(left/4+1))
	return max(left+jitter, 100*time.Millisecond)
}
