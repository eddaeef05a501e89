package pgetl

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
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
)

// Defaults of [RetryPolicy].
const (
	// MaxAttemptsDefault is the number of attempts of one unit of work.
	MaxAttemptsDefault = 10
	// MaxElapsedDefault bounds the time spent retrying one unit of work.
	MaxElapsedDefault = 5 * time.Minute
	// InitialBackoffDefault is the first backoff's upper bound.
	InitialBackoffDefault = 100 * time.Millisecond
	// MaxBackoffDefault caps the backoff.
	MaxBackoffDefault = 10 * time.Second
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

	// Restart starts the job over: its checkpoint cursor and counts are reset, also
	// for a job marked finished. Without it a finished job returns ErrJobFinished.
	Restart bool

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

	// Logger receives retries, in-doubt resolutions and fencing. Nil is silent.
	Logger *slog.Logger

	// OnRetryFunc, if set, is called before each retry of a failed attempt.
	OnRetryFunc func(RetryEvent)

	// skipCheckpoint leaves the checkpoint out of batch transactions, for the
	// benchmark that measures its cost. Never set outside benchmarks: without the
	// checkpoint there is no fencing and no in-doubt resolution.
	skipCheckpoint bool

	// beforeCommit is a test hook called after an attempt's statements are sent and
	// before its COMMIT (Tx) or before its single message is written (batches).
	beforeCommit func(ctx context.Context, seq int64, attempt int, pgConn *pgconn.PgConn)
}

// Guards are limits set with SET LOCAL at the start of every transaction pgetl runs,
// so they hold for the job's own work only and pass through transaction poolers
// (nothing is sent in the startup packet). A zero field means its default; a negative
// one means "do not set".
type Guards struct {
	// IdleInTransactionTimeout is idle_in_transaction_session_timeout. Defaults to
	// IdleInTransactionTimeoutDefault.
	IdleInTransactionTimeout time.Duration
	// StatementTimeout is statement_timeout. Defaults to StatementTimeoutDefault.
	StatementTimeout time.Duration
	// LockTimeout is lock_timeout. Defaults to LockTimeoutDefault.
	LockTimeout time.Duration
	// ServerKeepalive, if set, also sets the server side TCP keepalive and user
	// timeout of the backend for each transaction (tcp_keepalives_idle, …), so the
	// server drops the backend of a client that vanished mid-transaction instead of
	// holding its locks. Nil sets nothing.
	ServerKeepalive *Keepalive
}

// RetryPolicy bounds the retries of transient failures (see [IsTransient]). Backoff
// is exponential with full jitter.
type RetryPolicy struct {
	// MaxAttempts is the number of attempts, the first included. Defaults to
	// MaxAttemptsDefault; 1 disables retries.
	MaxAttempts int
	// MaxElapsed bounds the total time spent retrying one unit of work. Defaults to
	// MaxElapsedDefault.
	MaxElapsed time.Duration
	// InitialBackoff is the first backoff's upper bound. Defaults to
	// InitialBackoffDefault.
	InitialBackoff time.Duration
	// MaxBackoff caps the backoff. Defaults to MaxBackoffDefault.
	MaxBackoff time.Duration
}

// RetryEvent describes a failed attempt that is about to be retried.
type RetryEvent struct {
	Job     string        // the job's name
	Seq     int64         // batch sequence being committed
	Attempt int           // the attempt that failed, from 1
	Class   string        // the failure's class, as counted in Stat.Retries
	Backoff time.Duration // the wait before the next attempt
	Err     error         // the failure
}

func (c *SessionConfig) setDefaults() error {
	if c.Job == "" {
		return errors.New("pgetl: SessionConfig.Job is required")
	}
	if strings.IndexByte(c.Job, 0) >= 0 || !utf8.ValidString(c.Job) {
		return errors.New("pgetl: SessionConfig.Job must be valid UTF-8 without NUL bytes")
	}
	if c.CheckpointSchema == "" {
		c.CheckpointSchema = CheckpointSchemaDefault
	}
	if c.Lease == 0 {
		c.Lease = LeaseDefault
	}
	if c.Lease < time.Second {
		return fmt.Errorf("pgetl: SessionConfig.Lease must be at least 1s, got %v", c.Lease)
	}
	g := &c.Guards
	for _, f := range []struct {
		p   *time.Duration
		def time.Duration
	}{{&g.IdleInTransactionTimeout, IdleInTransactionTimeoutDefault}, {&g.StatementTimeout, StatementTimeoutDefault}, {&g.LockTimeout, LockTimeoutDefault}} {
		if *f.p == 0 {
			*f.p = f.def
		}
	}
	r := &c.Retry
	if r.MaxAttempts == 0 {
		r.MaxAttempts = MaxAttemptsDefault
	}
	if r.MaxAttempts < 1 {
		return fmt.Errorf("pgetl: RetryPolicy.MaxAttempts must be at least 1, got %d", r.MaxAttempts)
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
	if r.MaxElapsed < 0 || r.InitialBackoff < 0 || r.MaxBackoff < 0 {
		return errors.New("pgetl: RetryPolicy durations must not be negative")
	}
	return nil
}

// Checkpoint is where a job stands: the last committed batch and the cursor of its
// last row.
type Checkpoint struct {
	Job       string    // the job's name
	Seq       int64     // sequence of the last committed batch (0: none yet)
	Cursor    string    // the cursor of the last committed row ("" when none)
	Rows      int64     // rows committed by the job since its start (or Restart)
	Rejects   int64     // rows rejected since its start
	UpdatedAt time.Time // when the checkpoint last advanced
	Finished  bool      // whether Finish marked the job done
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

	commitMu sync.Mutex // serializes commits; held across one unit of work

	mu      sync.Mutex // guards the fields below
	cp      Checkpoint // as last committed by this session
	closed  bool
	closing bool // Close has begun: no new batch sessions
	fenced  bool
	resync  bool                       // cp.Seq may be behind the database after an abandoned in-doubt commit
	batches map[*BatchSession]struct{} // open batch sessions, closed by Close
	stat    statCounters

	nextRow atomic.Int64 // job-wide index of the next row passed to any BatchSession.Add

	closeOnce sync.Once
	closeErr  error

	stop chan struct{}
	wg   sync.WaitGroup
}

// NewSession claims the job cfg.Job and returns its session. It creates the
// checkpoint table on first use. ctx bounds only this call; the lease renewal runs
// until Close. It fails with ErrJobClaimed if another live session holds the job and
// with ErrJobFinished if the job was finished (see SessionConfig.Restart).
func NewSession(ctx context.Context, pool *pgxpool.Pool, cfg SessionConfig) (*Session, error) {
	if pool == nil {
		return nil, errors.New("pgetl: NewSession needs a pool")
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &Session{
		pool:   pool,
		cfg:    cfg,
		owner:  newToken(),
		schema: pgx.Identifier{cfg.CheckpointSchema}.Sanitize(),
		log:    cfg.Logger,
		stop:   make(chan struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if fn := testhook.BeforeCommitOf(ctx); fn != nil && s.cfg.beforeCommit == nil {
		s.cfg.beforeCommit = fn
	}
	s.stat.retries = map[string]int64{}
	if err := s.setup(ctx); err != nil {
		return nil, err
	}
	if err := s.claim(ctx); err != nil {
		return nil, err
	}
	s.wg.Add(1)
	go s.renew()
	return s, nil
}

func newToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// setup creates the checkpoint schema, tables and function if missing.
func (s *Session) setup(ctx context.Context) error {
	sch := s.schema
	ddl := `SELECT pg_advisory_xact_lock(hashtext('pgetl.setup'));
CREATE SCHEMA IF NOT EXISTS ` + sch + `;
CREATE TABLE IF NOT EXISTS ` + sch + `.checkpoint (
	job         text PRIMARY KEY,
	seq         bigint NOT NULL DEFAULT 0,
	cursor      text,
	rows        bigint NOT NULL DEFAULT 0,
	rejects     bigint NOT NULL DEFAULT 0,
	owner       text,
	lease_until timestamptz,
	finished_at timestamptz,
	updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ` + sch + `.reject (
	job             text NOT NULL,
	seq             bigint NOT NULL,
	row_index       bigint NOT NULL,
	cursor          text,
	sqlstate        text,
	message         text,
	column_name     text,
	constraint_name text,
	row             jsonb,
	created_at      timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (job, seq, row_index)
);
CREATE OR REPLACE FUNCTION ` + sch + `.advance(p_job text, p_owner text, p_seq bigint, p_cursor text,
	p_rows bigint, p_rejects bigint, p_lease interval) RETURNS void LANGUAGE plpgsql AS $pgetl$
DECLARE
	cur_owner text;
	cur_seq bigint;
BEGIN
	UPDATE ` + sch + `.checkpoint SET seq = p_seq, cursor = COALESCE(p_cursor, cursor),
		rows = rows + p_rows, rejects = rejects + p_rejects,
		lease_until = now() + p_lease, updated_at = now()
	WHERE job = p_job AND owner = p_owner AND seq = p_seq - 1;
	IF FOUND THEN
		RETURN;
	END IF;
	SELECT owner, seq INTO cur_owner, cur_seq FROM ` + sch + `.checkpoint WHERE job = p_job;
	IF cur_owner IS DISTINCT FROM p_owner THEN
		RAISE EXCEPTION 'pgetl: job % was taken over by another session', p_job USING ERRCODE = 'PGF01';
	ELSIF cur_seq >= p_seq THEN
		RAISE EXCEPTION 'pgetl: job % batch % is already committed', p_job, p_seq USING ERRCODE = 'PGF02';
	END IF;
	RAISE EXCEPTION 'pgetl: job % checkpoint at batch %, cannot advance to %', p_job, cur_seq, p_seq USING ERRCODE = 'PGF03';
END
$pgetl$;
CREATE OR REPLACE FUNCTION ` + sch + `.expect_rows(p_got bigint, p_want bigint) RETURNS void LANGUAGE plpgsql AS $pgetl$
BEGIN
	IF p_got <> p_want THEN
		RAISE EXCEPTION 'pgetl: % rows matched, % expected', p_got, p_want USING ERRCODE = 'PGK01';
	END IF;
END
$pgetl$;`
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("pgetl: set up checkpoint table: %w", err)
	}
	defer conn.Release()
	// Skip the DDL when everything exists, so a role without CREATE can run jobs
	// once the tables were made.
	var ready bool
	err = conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL
		AND to_regprocedure($3) IS NOT NULL AND to_regprocedure($4) IS NOT NULL`, sch+".checkpoint", sch+".reject",
		sch+".advance(text,text,bigint,text,bigint,bigint,interval)", sch+".expect_rows(bigint,bigint)").Scan(&ready)
	if err != nil {
		return fmt.Errorf("pgetl: set up checkpoint table in schema %s: %w", sch, err)
	}
	if ready {
		return nil
	}
	if _, err := conn.Exec(ctx, "BEGIN;"+ddl+"COMMIT"); err != nil {
		return fmt.Errorf("pgetl: set up checkpoint table in schema %s: %w", sch, err)
	}
	return nil
}

// SQLSTATEs raised by the checkpoint's advance function.
const (
	codeFenced           = "PGF01"
	codeAlreadyCommitted = "PGF02"
	codeCheckpointGap    = "PGF03"
	codeRowsMismatch     = "PGK01" // expect_rows: an upsert's key cache was stale
)

func (s *Session) claim(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO `+s.schema+`.checkpoint (job) VALUES ($1) ON CONFLICT (job) DO NOTHING`, s.cfg.Job); err != nil {
			return fmt.Errorf("pgetl: claim job %q: %w", s.cfg.Job, err)
		}
		var (
			owner    *string
			live     bool
			finished bool
			cp       = Checkpoint{Job: s.cfg.Job}
			cursor   *string
		)
		err := tx.QueryRow(ctx, `SELECT owner, coalesce(lease_until > now(), false), finished_at IS NOT NULL,
			seq, cursor, rows, rejects, updated_at FROM `+s.schema+`.checkpoint WHERE job = $1 FOR UPDATE`, s.cfg.Job).
			Scan(&owner, &live, &finished, &cp.Seq, &cursor, &cp.Rows, &cp.Rejects, &cp.UpdatedAt)
		if err != nil {
			return fmt.Errorf("pgetl: claim job %q: %w", s.cfg.Job, err)
		}
		if owner != nil && live && !s.cfg.Takeover {
			return fmt.Errorf("%w: job %q (lease held by owner %s; wait for it to expire or set Takeover)", ErrJobClaimed, s.cfg.Job, *owner)
		}
		if finished && !s.cfg.Restart {
			return fmt.Errorf("%w: job %q (set Restart to run it again)", ErrJobFinished, s.cfg.Job)
		}
		reset := ""
		if s.cfg.Restart {
			reset = ", cursor = NULL, rows = 0, rejects = 0, finished_at = NULL"
			cursor, cp.Rows, cp.Rejects, finished = nil, 0, 0, false
		}
		if _, err := tx.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET owner = $2, lease_until = now() + $3::interval`+reset+`
			WHERE job = $1`, s.cfg.Job, s.owner, s.cfg.Lease); err != nil {
			return fmt.Errorf("pgetl: claim job %q: %w", s.cfg.Job, err)
		}
		if cursor != nil {
			cp.Cursor = *cursor
		}
		cp.Finished = finished
		s.cp = cp
		s.nextRow.Store(cp.Rows + cp.Rejects)
		return nil
	})
}

// renew extends the lease every Lease/3 until Close.
func (s *Session) renew() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.Lease / 3)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Lease/3)
		tag, err := s.pool.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET lease_until = now() + $3::interval
			WHERE job = $1 AND owner = $2`, s.cfg.Job, s.owner, s.cfg.Lease)
		cancel()
		switch {
		case err != nil:
			s.log.Warn("pgetl: lease renewal failed", "job", s.cfg.Job, "err", err)
		case tag.RowsAffected() == 0:
			s.mu.Lock()
			s.fenced = true
			s.mu.Unlock()
			s.log.Error("pgetl: job taken over by another session", "job", s.cfg.Job)
			return
		}
	}
}

// Job returns the job's name.
func (s *Session) Job() string { return s.cfg.Job }

// Checkpoint returns where the job stands: the checkpoint as of the claim, advanced
// by every batch this session committed since. A job resumes by skipping source rows
// up to and including Checkpoint().Cursor.
func (s *Session) Checkpoint(ctx context.Context) (Checkpoint, error) {
	if err := ctx.Err(); err != nil {
		return Checkpoint{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return Checkpoint{}, ErrClosed
	}
	return s.cp, nil
}

// ReadCheckpoint reads the checkpoint of job from the database without claiming it.
// It returns a zero Checkpoint (Seq 0) for a job that never ran.
func ReadCheckpoint(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, schema, job string) (Checkpoint, error) {
	if schema == "" {
		schema = CheckpointSchemaDefault
	}
	cp := Checkpoint{Job: job}
	var cursor *string
	err := db.QueryRow(ctx, `SELECT seq, cursor, rows, rejects, updated_at, finished_at IS NOT NULL FROM `+
		pgx.Identifier{schema}.Sanitize()+`.checkpoint WHERE job = $1`, job).
		Scan(&cp.Seq, &cursor, &cp.Rows, &cp.Rejects, &cp.UpdatedAt, &cp.Finished)
	if errors.Is(err, pgx.ErrNoRows) {
		return cp, nil
	}
	if err != nil {
		return cp, fmt.Errorf("pgetl: read checkpoint of job %q: %w", job, err)
	}
	if cursor != nil {
		cp.Cursor = *cursor
	}
	return cp, nil
}

// Finish marks the job finished: a later NewSession for it returns ErrJobFinished
// unless SessionConfig.Restart is set. Call it after the last batch is committed
// (BatchSession.Close) and before Close.
func (s *Session) Finish(ctx context.Context) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	tag, err := s.pool.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET finished_at = now(), updated_at = now()
		WHERE job = $1 AND owner = $2`, s.cfg.Job, s.owner)
	if err != nil {
		return fmt.Errorf("pgetl: finish job %q: %w", s.cfg.Job, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fence()
	}
	s.mu.Lock()
	s.cp.Finished = true
	s.mu.Unlock()
	return nil
}

// Close closes the session's open batch sessions (committing what they buffered, as
// BatchSession.Close does), stops the lease renewal and releases the job's claim, so
// the next session for the job can start at once. It does not close the pool. Close
// is idempotent; methods called after it return ErrClosed.
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
	s.mu.Unlock()
	var errs []error
	for _, b := range open {
		errs = append(errs, b.Close(ctx))
	}
	// Wait for a Tx or Finish in flight, then let nothing new start.
	s.commitMu.Lock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.commitMu.Unlock()
	close(s.stop)
	s.wg.Wait()
	_, err := s.pool.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET owner = NULL, lease_until = NULL
		WHERE job = $1 AND owner = $2`, s.cfg.Job, s.owner)
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
	return nil
}

func (s *Session) fence() error {
	s.mu.Lock()
	s.fenced = true
	s.mu.Unlock()
	return fmt.Errorf("%w: job %q", ErrFenced, s.cfg.Job)
}

// appName is the application_name of the transaction committing batch seq:
// "pgetl <job>#<seq>.<owner token>", unique per session and batch, and at most 63
// bytes (NAMEDATALEN-1) so the server keeps it whole. It lets pg_stat_activity show
// the job and batch, and lets in-doubt resolution find exactly that transaction's
// backend, also behind a pooler whose backend pids the client cannot know.
//
// Bytes outside printable ASCII become '?': the server would rewrite them anyway,
// and the name must read back exactly as sent.
func (s *Session) appName(seq int64) string {
	suffix := "#" + strconv.FormatInt(seq, 10) + "." + s.owner[:6]
	name := "pgetl " + strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, s.cfg.Job)
	if len(name)+len(suffix) > 63 {
		name = name[:63-len(suffix)]
	}
	return name + suffix
}

// guardStmts returns the SET LOCAL statements of a transaction committing batch seq.
// They are SET LOCAL, not SELECT set_config(…): a SELECT takes the transaction's
// snapshot, after which fn in Session.Tx could no longer SET TRANSACTION ISOLATION
// LEVEL (25001); SET takes none. (One SELECT instead of several SETs measured no
// faster.)
func (s *Session) guardStmts(seq int64) []string {
	var stmts []string
	g := s.cfg.Guards
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"idle_in_transaction_session_timeout", g.IdleInTransactionTimeout}, {"statement_timeout", g.StatementTimeout}, {"lock_timeout", g.LockTimeout}} {
		if f.d > 0 {
			stmts = append(stmts, fmt.Sprintf("SET LOCAL %s = %d", f.name, f.d.Milliseconds()))
		}
	}
	if s.cfg.AsyncCommit {
		stmts = append(stmts, "SET LOCAL synchronous_commit = off")
	}
	if g.ServerKeepalive != nil {
		for _, kv := range g.ServerKeepalive.ServerSettings() {
			stmts = append(stmts, "SET LOCAL "+kv)
		}
	}
	return append(stmts, "SET LOCAL application_name = "+quoteLiteral(s.appName(seq)))
}

// guardSQL returns guardStmts as one string of statements.
func (s *Session) guardSQL(seq int64) string {
	return strings.Join(s.guardStmts(seq), ";") + ";"
}

// advanceSQL returns the statement that advances the checkpoint to seq inside the
// batch's transaction. It fails (PGF01/02/03) unless this session owns the job and
// the checkpoint stands at seq-1, which fences out a second writer and makes a replay
// of an already committed batch fail instead of duplicating it.
func (s *Session) advanceSQL(seq int64, cursor *string, rows, rejects int64) string {
	c := "NULL"
	if cursor != nil {
		c = quoteLiteral(*cursor)
	}
	return fmt.Sprintf("SELECT %s.advance(%s, %s, %d, %s, %d, %d, '%d milliseconds');",
		s.schema, quoteLiteral(s.cfg.Job), quoteLiteral(s.owner), seq, c, rows, rejects, s.cfg.Lease.Milliseconds())
}

// quoteLiteral quotes s as an SQL string literal in the escape-string form (E'…',
// backslashes and quotes doubled), which reads the same whatever
// standard_conforming_strings is. s must not contain NUL and must be valid UTF-8.
func quoteLiteral(s string) string {
	return "E'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", "''") + "'"
}

// commitOutcome is what one attempt to commit a unit of work reports.
type commitOutcome int

const (
	outcomeFailed    commitOutcome = iota // the attempt failed; the error says how
	outcomeCommitted                      // COMMIT succeeded
	outcomeInDoubt                        // the connection failed after COMMIT may have been sent
)

// run commits one unit of work (batch seq) with attempt, retrying transient failures
// with backoff and resolving an in-doubt COMMIT from the checkpoint. Caller must hold
// commitMu.
func (s *Session) run(ctx context.Context, seq int64, attempt func(ctx context.Context, n int) (commitOutcome, error)) error {
	start := time.Now()
	r := s.cfg.Retry
	for n := 1; ; n++ {
		outcome, err := attempt(ctx, n)
		if outcome == outcomeCommitted {
			return nil
		}
		if ctx.Err() != nil {
			if outcome == outcomeInDoubt {
				// The caller gave up while the transaction may still run on the
				// server (its whole message was sent): end it, and learn whether it
				// had committed.
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
				committed, rerr := s.resolve(rctx, seq)
				cancel()
				if rerr == nil && committed {
					s.count("in_doubt_committed")
					return nil
				}
				if rerr != nil {
					s.mu.Lock()
					s.resync = true
					s.mu.Unlock()
				}
			}
			return ctx.Err()
		}
		if pg := pgErrorOf(err); pg != nil {
			switch pg.Code {
			case codeAlreadyCommitted:
				if n == 1 {
					s.mu.Lock()
					s.resync = true
					s.mu.Unlock()
					return fmt.Errorf("pgetl: job %q: checkpoint is ahead of this session (batch %d already committed); retry to resync: %w", s.cfg.Job, seq, err)
				}
				// A replay found its batch committed: the earlier attempt's COMMIT
				// went through after all.
				s.count("in_doubt_committed")
				return nil
			case codeFenced:
				s.fence()
				return fmt.Errorf("%w: job %q batch %d: %w", ErrFenced, s.cfg.Job, seq, err)
			}
		}
		if outcome == outcomeInDoubt {
			committed, rerr := s.resolve(ctx, seq)
			if rerr == nil && committed {
				s.log.Info("pgetl: in-doubt commit resolved: committed", "job", s.cfg.Job, "seq", seq)
				s.count("in_doubt_committed")
				return nil
			}
			if rerr != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if errors.Is(rerr, ErrFenced) {
					return rerr
				}
				// Unresolved: the replay's checkpoint fence still prevents a duplicate.
				s.log.Warn("pgetl: in-doubt commit unresolved; replay is fenced by the checkpoint", "job", s.cfg.Job, "seq", seq, "err", rerr)
			}
		}
		if !IsTransient(err) {
			return err
		}
		class := retryClass(err)
		if n >= r.MaxAttempts || time.Since(start) >= r.MaxElapsed {
			return fmt.Errorf("%w: job %q batch %d after %d attempts in %v: %w", ErrRetriesExhausted, s.cfg.Job, seq, n, time.Since(start).Round(time.Millisecond), err)
		}
		backoff := s.backoff(n)
		s.mu.Lock()
		s.stat.retries[class]++
		s.mu.Unlock()
		s.log.Warn("pgetl: retrying", "job", s.cfg.Job, "seq", seq, "attempt", n, "class", class, "backoff", backoff, "err", err)
		if s.cfg.OnRetryFunc != nil {
			s.cfg.OnRetryFunc(RetryEvent{Job: s.cfg.Job, Seq: seq, Attempt: n, Class: class, Backoff: backoff, Err: err})
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// backoff returns the wait before attempt n+1: full jitter over an exponential bound.
func (s *Session) backoff(n int) time.Duration {
	r := s.cfg.Retry
	bound := r.InitialBackoff << min(n-1, 30)
	if bound > r.MaxBackoff || bound <= 0 {
		bound = r.MaxBackoff
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	x := uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 | uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48
	return time.Duration(x%uint64(bound)) + bound/10
}

// resolve decides whether batch seq committed after its connection failed around
// COMMIT, or after the caller gave up waiting. It ends the batch's backend if it is
// still there (found by the batch's unique application_name; a backend that is
// ended before its COMMIT rolls back), then reads the checkpoint row with FOR
// UPDATE, which waits for any transaction still holding it: the answer is final, not
// a guess. Should the old message still reach the server later, the checkpoint fence
// makes it fail rather than commit a second time.
func (s *Session) resolve(ctx context.Context, seq int64) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Guards.IdleInTransactionTimeout+10*time.Second)
	defer cancel()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Release()
	app := s.appName(seq)
	_, _ = conn.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = $1 AND pid <> pg_backend_pid()`, app)
	// pg_terminate_backend only signals: wait (bounded) until the backend is gone.
	for i := 0; i < 100; i++ {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&n); err != nil || n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	var cur int64
	var owner *string
	err = conn.QueryRow(ctx, `SELECT seq, owner FROM `+s.schema+`.checkpoint WHERE job = $1 FOR UPDATE`, s.cfg.Job).Scan(&cur, &owner)
	if err != nil {
		return false, err
	}
	if owner == nil || *owner != s.owner {
		// Another session owns the job now: its progress says nothing about this
		// batch.
		return false, s.fence()
	}
	return cur >= seq, nil
}

func retryClass(err error) string {
	if pg := pgErrorOf(err); pg != nil {
		switch {
		case pg.Code == "40001":
			return "serialization"
		case pg.Code == "40P01":
			return "deadlock"
		case pg.Code == "55P03":
			return "lock_timeout"
		case pg.Code == "25006":
			return "read_only"
		case pg.Code == "53300":
			return "too_many_connections"
		case pg.Code == "25P03" || pg.Code == "57P05":
			return "idle_timeout"
		case strings.HasPrefix(pg.Code, "57P"):
			return "server_shutdown"
		}
		return "sqlstate_" + pg.Code
	}
	return "connection"
}

func (s *Session) count(class string) {
	s.mu.Lock()
	s.stat.retries[class]++
	s.mu.Unlock()
}

// Tx runs fn in a short transaction on a connection acquired for it: BEGIN, the
// guards (SET LOCAL), fn, the checkpoint advance (so the session's fencing and
// in-doubt resolution cover custom work too), COMMIT, release. After a transient
// failure the transaction is rolled back and fn is called again on a fresh
// connection, so fn must do all its work through tx and must not keep effects of a
// failed attempt. fn must not call tx.Commit or tx.Rollback: return nil to commit, an
// error to roll back (that error is returned as is).
func (s *Session) Tx(ctx context.Context, fn func(pgx.Tx) error) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	if err := s.sync(ctx); err != nil {
		return err
	}
	seq := s.nextSeq()
	var (
		fnErr error
		last  *sessionTx // the last attempt's transaction, whose hooks are pending
	)
	err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
		if last != nil {
			last.runRollback() // a new attempt: the previous one did not commit
		}
		out, stx, err, ferr := s.txAttempt(ctx, seq, n, fn)
		last, fnErr = stx, ferr
		return out, err
	})
	if err == nil && fnErr == nil {
		s.committed(seq, nil, 0, 0, 0)
		if last != nil {
			last.runCommit()
		}
		return nil
	}
	if last != nil {
		last.runRollback()
	}
	if fnErr != nil {
		return fnErr
	}
	return err
}

// txAttempt is one attempt of Tx. The hooks of the returned transaction are pending:
// the caller runs them once the outcome is final.
func (s *Session) txAttempt(ctx context.Context, seq int64, n int, fn func(pgx.Tx) error) (out commitOutcome, stx *sessionTx, err, fnErr error) {
	t0 := time.Now()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return outcomeFailed, nil, err, nil
	}
	defer func() {
		conn.Release()
		s.mu.Lock()
		s.stat.holdNanos += int64(time.Since(t0))
		s.mu.Unlock()
	}()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return outcomeFailed, nil, err, nil
	}
	stx = &sessionTx{Tx: tx}
	if _, err := tx.Exec(ctx, s.guardSQL(seq)); err != nil {
		_ = tx.Rollback(ctx)
		return outcomeFailed, stx, err, nil
	}
	if ferr := fn(stx); ferr != nil {
		_ = tx.Rollback(ctx)
		if IsTransient(ferr) && ctx.Err() == nil {
			// fn's statement failed for a transient reason: retry the whole unit.
			return outcomeFailed, stx, ferr, nil
		}
		return outcomeFailed, stx, nil, ferr
	}
	if _, err := tx.Exec(ctx, s.advanceSQL(seq, nil, 0, 0)); err != nil {
		_ = tx.Rollback(ctx)
		return outcomeFailed, stx, err, nil
	}
	if s.cfg.beforeCommit != nil {
		s.cfg.beforeCommit(ctx, seq, n, conn.Conn().PgConn())
	}
	if err := tx.Commit(ctx); err != nil {
		if pg := pgErrorOf(err); pg != nil && pg.Severity == "ERROR" {
			return outcomeFailed, stx, err, nil
		}
		return outcomeInDoubt, stx, err, nil
	}
	return outcomeCommitted, stx, nil, nil
}

// sync re-reads the checkpoint's sequence after an in-doubt commit that the caller
// abandoned, so the next unit of work gets the right sequence. Caller must hold
// commitMu.
func (s *Session) sync(ctx context.Context) error {
	s.mu.Lock()
	need := s.resync
	s.mu.Unlock()
	if !need {
		return nil
	}
	var seq int64
	var cursor, owner *string
	var rows, rejects int64
	err := s.pool.QueryRow(ctx, `SELECT seq, cursor, rows, rejects, owner FROM `+s.schema+`.checkpoint WHERE job = $1 FOR UPDATE`, s.cfg.Job).
		Scan(&seq, &cursor, &rows, &rejects, &owner)
	if err != nil {
		return fmt.Errorf("pgetl: resync checkpoint of job %q: %w", s.cfg.Job, err)
	}
	if owner == nil || *owner != s.owner {
		return s.fence()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cp.Seq, s.cp.Rows, s.cp.Rejects, s.resync = seq, rows, rejects, false
	if n := rows + rejects; n > s.nextRow.Load() {
		s.nextRow.Store(n)
	}
	if cursor != nil {
		s.cp.Cursor = *cursor
	}
	return nil
}

// nextSeq returns the sequence number of the next unit of work. Caller must hold
// commitMu.
func (s *Session) nextSeq() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cp.Seq + 1
}

// committed records a committed unit of work. Caller must hold commitMu.
func (s *Session) committed(seq int64, cursor *string, rows, rejects, bytes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cp.Seq = seq
	if cursor != nil {
		s.cp.Cursor = *cursor
	}
	s.cp.Rows += rows
	s.cp.Rejects += rejects
	s.cp.UpdatedAt = time.Now()
	s.stat.batches++
	s.stat.rows += rows
	s.stat.rejects += rejects
	s.stat.bytes += bytes
}

// sessionTx is the pgx.Tx handed to Session.Tx's function.
type sessionTx struct {
	pgx.Tx
	commitFns, rollbackFns []func()
}

var errTxManaged = errors.New("pgetl: Session.Tx commits and rolls back for you: return nil to commit, an error to roll back")

// Commit refuses: Session.Tx commits after fn returns nil.
func (t *sessionTx) Commit(context.Context) error { return errTxManaged }

// Rollback refuses: Session.Tx rolls back when fn returns an error.
func (t *sessionTx) Rollback(context.Context) error { return errTxManaged }

func (t *sessionTx) onCommit(f func())   { t.commitFns = append(t.commitFns, f) }
func (t *sessionTx) onRollback(f func()) { t.rollbackFns = append(t.rollbackFns, f) }

func (t *sessionTx) runCommit() {
	for _, f := range t.commitFns {
		f()
	}
	t.commitFns, t.rollbackFns = nil, nil
}

func (t *sessionTx) runRollback() {
	for _, f := range t.rollbackFns {
		f()
	}
	t.commitFns, t.rollbackFns = nil, nil
}

var _ commitHooks = (*sessionTx)(nil)
