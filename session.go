package pgetl

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgetl/pgetl/internal/testhook"
)

// Defaults of [SessionConfig] and [Guards].
const (
	// CheckpointSchemaDefault is the schema of the checkpoint and reject tables.
	CheckpointSchemaDefault = "pgetl"
	// LeaseDefault is how long a session's claim on its job lasts without renewal.
	LeaseDefault = 30 * time.Second
	// IdleInTransactionTimeoutDefault is the idle_in_transaction_session_timeout set
	// (SET LOCAL) in every transaction: a client that vanishes mid-transaction frees
	// its locks after at most this long.
	IdleInTransactionTimeoutDefault = 60 * time.Second
	// StatementTimeoutDefault is the statement_timeout set in every transaction.
	StatementTimeoutDefault = 5 * time.Minute
	// LockTimeoutDefault is the lock_timeout set in every transaction.
	LockTimeoutDefault = 30 * time.Second
	// ClientCheckIntervalDefault is the client_connection_check_interval set in
	// every transaction (PostgreSQL 14 and later).
	ClientCheckIntervalDefault = time.Second
)

// SessionConfig configures a [Session]. The zero value of every field but Job is a
// documented default.
type SessionConfig struct {
	// Job names the job: the checkpoint key and the application_name its transactions
	// show in pg_stat_activity ("pgetl <job>#<batch>"). Required.
	Job string

	// CheckpointSchema is where the checkpoint and reject tables live; both are
	// created on first use. Defaults to CheckpointSchemaDefault.
	CheckpointSchema string

	// Restart starts the job over: its checkpoint cursor and counts are reset (and
	// its run counter to 1), also for a job marked finished. Without it (and without
	// Incremental) a finished job returns ErrJobFinished. It takes precedence over
	// Incremental.
	Restart bool

	// Incremental lets a finished job run again and continue where its last run
	// ended, for a source with a monotonic cursor (an updated_at, an id, an API's
	// "since" token): a session claiming a job that Finish marked done starts the
	// job's next run (Checkpoint.Run is incremented) instead of returning
	// ErrJobFinished, with the last run's cursor, sequence and counts kept, so the
	// job reads the source after Checkpoint().Cursor and loads only what is new.
	// An unfinished job (a run that crashed or stopped before Finish) resumes in its
	// run, as without the option. Batches stay exactly-once across runs: a run's
	// batches continue the job's sequence and pass the same fence. Defaults to false.
	Incremental bool

	// Takeover claims the job even if another session's lease has not expired (use
	// it when that session is known to be dead). The other session is fenced: its
	// next commit fails with ErrFenced.
	Takeover bool

	// Lease is how long the session's claim on the job lasts; a background renewal
	// extends it every Lease/3 until Close. A crashed owner's claim can be taken
	// over after it expires. Defaults to LeaseDefault.
	Lease time.Duration

	// Guards are the session limits set with SET LOCAL in every transaction.
	Guards Guards

	// AsyncCommit sets synchronous_commit = off in the job's transactions: COMMIT
	// returns before its WAL reaches disk, which saves a WAL flush per batch (most
	// of a small batch's fixed cost). The job stays exactly-once, because a batch's
	// rows and checkpoint are one transaction: a server crash can lose the last
	// batches reported committed, but loses their checkpoint with them, and the next
	// commit then fails (the checkpoint is behind the session) so the job stops and,
	// rerun, resumes from the checkpoint that survived. Use it when the source can be
	// re-read. Defaults to false.
	AsyncCommit bool

	// Retry bounds the retries of transient failures.
	Retry RetryPolicy

	// Logger receives the job's start and finish (Info), retries, unresolved
	// in-doubt commits, lease failures and each reject (Warn; rejects are
	// rate-limited, see RejectLogBurst), resolved in-doubt commits (Info) and each
	// committed batch (Debug). Nil is silent.
	Logger *slog.Logger

	// OnRetryFunc, if set, is called before each retry of a failed attempt.
	OnRetryFunc func(RetryEvent)

	// OnCommitFunc, if set, is called after every batch of the session commits (of
	// every BatchSession and BatchSet, after their own BatchConfig.OnCommitFunc),
	// from the goroutine that committed it: observability integrations (see
	// contrib/otel) hook in here. It must not block for long.
	OnCommitFunc func(BatchResult)

	// skipCheckpoint leaves the checkpoint out of batch transactions, for the
	// benchmark that measures its cost. Never set outside benchmarks: without the
	// checkpoint there is no fencing and no in-doubt resolution.
	skipCheckpoint bool

	// beforeCommit is a test hook called after an attempt's statements are sent and
	// before its COMMIT (Tx) or before its single message is written (batches).
	beforeCommit func(ctx context.Context, seq int64, attempt int, pgConn *pgconn.PgConn)
}

// withDefaults returns a copy of c with every zero field set to its documented
// default (River's habit: defaults and validation apart, the caller's value
// untouched).
func (c SessionConfig) withDefaults() SessionConfig {
	if c.CheckpointSchema == "" {
		c.CheckpointSchema = CheckpointSchemaDefault
	}
	if c.Lease == 0 {
		c.Lease = LeaseDefault
	}
	g := &c.Guards
	for _, f := range []struct {
		p   *time.Duration
		def time.Duration
	}{{&g.IdleInTransactionTimeout, IdleInTransactionTimeoutDefault}, {&g.StatementTimeout, StatementTimeoutDefault}, {&g.LockTimeout, LockTimeoutDefault},
		{&g.ClientCheckInterval, ClientCheckIntervalDefault}} {
		if *f.p == 0 {
			*f.p = f.def
		}
	}
	c.Retry = c.Retry.withDefaults()
	return c
}

// validate reports the first invalid field of c (after withDefaults).
func (c SessionConfig) validate() error {
	switch {
	case c.Job == "":
		return errors.New("pgetl: SessionConfig.Job is required")
	case strings.IndexByte(c.Job, 0) >= 0 || !utf8.ValidString(c.Job):
		return errors.New("pgetl: SessionConfig.Job must be valid UTF-8 without NUL bytes")
	case c.Lease < time.Second:
		return fmt.Errorf("pgetl: SessionConfig.Lease must be at least 1s, got %v", c.Lease)
	}
	return c.Retry.validate()
}

// withDefaults returns a copy of r with every zero field set to its default.
func (r RetryPolicy) withDefaults() RetryPolicy {
	if r.MaxAttempts == 0 {
		r.MaxAttempts = MaxAttemptsDefault
	}
	if r.MaxElapsed == 0 {
		r.MaxElapsed = MaxElapsedDefault
	}
	if r.InitialBackoff == 0 {
		r.InitialBackoff = InitialBackoffDefault
	}
	if r.MaxBackoff == 0 {
		r.MaxBackoff = MaxBackoffDefault
	}
	return r
}

func (r RetryPolicy) validate() error {
	if r.MaxAttempts < 1 {
		return fmt.Errorf("pgetl: RetryPolicy.MaxAttempts must be at least 1, got %d", r.MaxAttempts)
	}
	if r.MaxElapsed < 0 || r.InitialBackoff < 0 || r.MaxBackoff < 0 {
		return errors.New("pgetl: RetryPolicy durations must not be negative")
	}
	return nil
}

// Session runs one long job: it owns the job's checkpoint (claimed with a lease), and
// commits the job's work in short, guarded, retried transactions, each on a
// connection acquired for it and released after it. A Session is one writer: its
// batches and Tx calls commit one at a time, in order. Its methods are safe for
// concurrent use.
type Session struct {
	pool   *pgxpool.Pool
	cfg    SessionConfig
	owner  string // token proving the claim
	schema string // quoted checkpoint schema
	log    *slog.Logger
	clock  clock // retry timing; realClock but in tests

	commitMu sync.Mutex // serializes commits; held across one unit of work

	mu       sync.Mutex // guards the fields below
	cp       Checkpoint // as last committed by this session
	closed   bool
	closing  bool // Close has begun: no new batch sessions
	fenced   bool
	lost     *CheckpointLostError       // the database lost committed batches: every call fails with it
	units    map[int64]unitStat         // per unit of work being committed: attempts, in-doubt outcome
	reserved int64                      // the last sequence handed to a unit (batches in flight)
	flight   sync.WaitGroup             // units of work in flight (pipelined batches)
	resync   bool                       // cp.Seq may be behind the database after an abandoned in-doubt commit
	batches  map[*BatchSession]struct{} // open batch sessions, closed by Close
	sets     map[*BatchSet]struct{}     // open batch sets, closed by Close
	stat     statCounters

	nextRow atomic.Int64 // job-wide index of the next row passed to any BatchSession.Add

	closeOnce sync.Once
	closeErr  error

	lease *leaseRenewer

	rejLog rejectLog // the Warn per reject, rate-limited
}

// NewSession claims the job cfg.Job and returns its session, in one round trip when
// the checkpoint objects exist at the current version; it creates them on first use
// and migrates those of an older pgetl (then three). ctx bounds only this call; the
// lease renewal runs until Close. It fails with ErrJobClaimed if another live
// session holds the job and with ErrJobFinished if the job was finished (see
// SessionConfig.Restart and SessionConfig.Incremental).
func NewSession(ctx context.Context, pool *pgxpool.Pool, cfg SessionConfig) (*Session, error) {
	if pool == nil {
		return nil, errors.New("pgetl: NewSession needs a pool")
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Session{
		pool:   pool,
		cfg:    cfg,
		owner:  newToken(),
		schema: pgx.Identifier{cfg.CheckpointSchema}.Sanitize(),
		log:    cfg.Logger,
		clock:  realClock,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if fn := testhook.BeforeCommitOf(ctx); fn != nil && s.cfg.beforeCommit == nil {
		s.cfg.beforeCommit = fn
	}
	s.stat.retries = map[string]int64{}
	if err := s.claim(ctx); err != nil { // creates or migrates the checkpoint objects if need be
		return nil, err
	}
	s.lease = newLeaseRenewer(s)
	s.lease.Start()
	return s, nil
}

// Job returns the job's name.
func (s *Session) Job() string { return s.cfg.Job }

// Close closes the session's open batch sessions (committing what they buffered, as
// BatchSession.Close does), stops the lease renewal and releases the job's claim, so
// the next session for the job can start at once (one round trip). It does not close
// the pool. Close is idempotent; methods called after it return ErrClosed.
func (s *Session) Close(ctx context.Context) error {
	s.closeOnce.Do(func() { s.closeErr = s.close(ctx) })
	return s.closeErr
}

func (s *Session) close(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true // Batch refuses new batch sessions from now on
	open := make([]*BatchSession, 0, len(s.batches))
	for b := range s.batches {
		open = append(open, b)
	}
	sets := make([]*BatchSet, 0, len(s.sets))
	for set := range s.sets {
		sets = append(sets, set)
	}
	s.mu.Unlock()
	var errs []error
	for _, b := range open {
		errs = append(errs, b.Close(ctx))
	}
	for _, set := range sets {
		errs = append(errs, set.Close(ctx))
	}
	// Wait for a Tx or Finish in flight, then let nothing new start.
	s.commitMu.Lock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.commitMu.Unlock()
	s.lease.Stop()
	s.rejLog.flush(s.log, s.cfg.Job)
	// One round trip: QueryExecModeExec, no prepared statement.
	_, err := s.pool.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET owner = NULL, lease_until = NULL
		WHERE job = $1::text AND owner = $2::text`, pgx.QueryExecModeExec, s.cfg.Job, s.owner)
	if err != nil {
		errs = append(errs, fmt.Errorf("pgetl: release job %q: %w", s.cfg.Job, err))
	}
	return errors.Join(errs...)
}

func (s *Session) usable() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.fenced {
		return fmt.Errorf("%w: job %q", ErrFenced, s.cfg.Job)
	}
	if s.lost != nil {
		return s.lost
	}
	return nil
}

func (s *Session) fence() error {
	s.mu.Lock()
	s.fenced = true
	s.mu.Unlock()
	return fmt.Errorf("%w: job %q", ErrFenced, s.cfg.Job)
}
