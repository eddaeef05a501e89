package pgetl

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Checkpoint is where a job stands: the last committed batch and the cursor of its
// last row.
type Checkpoint struct {
	Job       string    // the job's name
	Seq       int64     // sequence of the last committed batch (0: none yet)
	Cursor    string    // the cursor of the last committed row ("" when none)
	Rows      int64     // rows committed by the job since its start (or Restart), over all its runs
	Rejects   int64     // rows rejected since its start (or Restart), over all its runs
	UpdatedAt time.Time // when the checkpoint last advanced
	Finished  bool      // whether Finish marked the job done
	// Run counts the job's runs: 1 for its first (and after Restart), incremented
	// when a session with SessionConfig.Incremental claims the job after Finish.
	Run int64
}

func newToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// schemaVersion is the version of the checkpoint schema objects (tables and
// functions) this code needs. It is recorded as the comment of the advance function;
// the claim function checks it (and that the reject table exists) on every call, so a
// session starts in one round trip when the objects are current, and runs setup
// (idempotent DDL under an advisory lock, which migrates older objects in place) and
// claims again only when the claim fails for want of current objects. A schema made
// by an older pgetl is thus upgraded rather than used as it is.
//
// Version 2: the claim is one function call (one round trip); the reject table names
// the table a rejected row was meant for.
// Version 3: the checkpoint counts the job's runs (column run: incremental runs, see
// SessionConfig.Incremental); claim takes the schema marker and fails with PGF06
// unless it matches.
// Version 4: the fence waits at most 5 s (lock_timeout if shorter) for a batch before
// it that has not reached the server, not lock_timeout: a pooler's PAUSE or safe
// shutdown, which waits for the waiting transaction, held the batch it waited for.
const schemaVersion = 4

// schemaMarker is the comment of the advance function that marks schemaVersion.
var schemaMarker = "pgetl schema " + strconv.Itoa(schemaVersion)

// setup creates the checkpoint schema, tables and functions if missing, or migrates
// them from an older version, in one round trip. NewSession runs it only when the
// claim finds the objects missing or of another version, so that a role without
// CREATE can run jobs once the objects were made.
func (s *Session) setup(ctx context.Context, found error) error {
	sch := s.schema
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := s.pool.Exec(ctx, "BEGIN;"+checkpointDDL(sch)+"COMMIT"); err != nil {
		// The set-up's error first: errors.As finds its cause before the claim's.
		return fmt.Errorf("pgetl: set up checkpoint table in schema %s (need %q): %w (the claim found: %w)", sch, schemaMarker, err, found)
	}
	return nil
}

// checkpointDDL creates or migrates the checkpoint objects in schema sch (quoted) to
// schemaVersion. Every statement is idempotent.
func checkpointDDL(sch string) string {
	return `SELECT pg_advisory_xact_lock(hashtext('pgetl.setup'));
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
	updated_at  timestamptz NOT NULL DEFAULT now(),
	run         bigint NOT NULL DEFAULT 1
);
ALTER TABLE ` + sch + `.checkpoint ADD COLUMN IF NOT EXISTS run bigint NOT NULL DEFAULT 1;
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
ALTER TABLE ` + sch + `.reject ADD COLUMN IF NOT EXISTS table_name text;
CREATE OR REPLACE FUNCTION ` + sch + `.advance(p_job text, p_owner text, p_seq bigint, p_cursor text,
	p_rows bigint, p_rejects bigint, p_lease interval, p_confirmed bigint) RETURNS void LANGUAGE plpgsql AS $pgetl$
DECLARE
	cur_owner text;
	cur_seq bigint;
	-- How long to wait for a batch before this one that has not reached the server
	-- (several in flight): lock_timeout, at most 5 s. Its client may be retrying it,
	-- or a pooler may hold it (PgBouncer's PAUSE or safe shutdown waits for this
	-- transaction): PGF03 then ends this one, which the client replays after it.
	deadline timestamptz := clock_timestamp() + least(coalesce(nullif(current_setting('lock_timeout'), '0')::interval, interval '30 seconds'), interval '5 seconds');
BEGIN
	LOOP
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
		ELSIF cur_seq < p_confirmed OR clock_timestamp() > deadline THEN
			RAISE EXCEPTION 'pgetl: job % checkpoint at batch %, cannot advance to %', p_job, cur_seq, p_seq USING ERRCODE = 'PGF03';
		END IF;
		-- A batch before this one, which the session sent but has not heard of yet, is
		-- still on its way (several batches in flight): wait for it to take the row.
		PERFORM pg_sleep(0.0002);
	END LOOP;
END
$pgetl$;
DROP FUNCTION IF EXISTS ` + sch + `.claim(text, text, interval, bool, bool);
CREATE OR REPLACE FUNCTION ` + sch + `.claim(p_job text, p_owner text, p_lease interval, p_takeover bool, p_restart bool,
	p_continue bool, p_marker text)
	RETURNS TABLE (seq bigint, cursor text, rows bigint, rejects bigint, updated_at timestamptz, finished bool, prev_owner text, run bigint)
	LANGUAGE plpgsql AS $pgetl$
DECLARE
	c ` + sch + `.checkpoint;
BEGIN
	IF coalesce(obj_description(to_regprocedure(` + quoteLiteral(sch+".advance(text,text,bigint,text,bigint,bigint,interval,bigint)") + `), 'pg_proc'), '') <> p_marker
		OR to_regclass(` + quoteLiteral(sch+".reject") + `) IS NULL THEN
		RAISE EXCEPTION 'pgetl: checkpoint objects in schema % are not at %', ` + quoteLiteral(sch) + `, p_marker USING ERRCODE = 'PGF06';
	END IF;
	INSERT INTO ` + sch + `.checkpoint AS t (job) VALUES (p_job) ON CONFLICT (job) DO NOTHING;
	SELECT * INTO c FROM ` + sch + `.checkpoint t WHERE t.job = p_job FOR UPDATE;
	IF c.owner IS NOT NULL AND coalesce(c.lease_until > now(), false) AND NOT p_takeover THEN
		RAISE EXCEPTION 'pgetl: job % is claimed by owner % (lease until %)', p_job, c.owner, c.lease_until USING ERRCODE = 'PGF04';
	END IF;
	IF c.finished_at IS NOT NULL AND NOT p_restart AND NOT p_continue THEN
		RAISE EXCEPTION 'pgetl: job % is finished', p_job USING ERRCODE = 'PGF05';
	END IF;
	IF p_restart THEN
		UPDATE ` + sch + `.checkpoint t SET owner = p_owner, lease_until = now() + p_lease, cursor = NULL, rows = 0, rejects = 0,
			finished_at = NULL, run = 1 WHERE t.job = p_job;
		RETURN QUERY SELECT c.seq, NULL::text, 0::bigint, 0::bigint, c.updated_at, false, c.owner, 1::bigint;
	ELSIF c.finished_at IS NOT NULL THEN
		-- p_continue: the job's next run, after the last run's cursor.
		UPDATE ` + sch + `.checkpoint t SET owner = p_owner, lease_until = now() + p_lease, finished_at = NULL,
			run = t.run + 1 WHERE t.job = p_job;
		RETURN QUERY SELECT c.seq, c.cursor, c.rows, c.rejects, c.updated_at, false, c.owner, c.run + 1;
	ELSE
		UPDATE ` + sch + `.checkpoint t SET owner = p_owner, lease_until = now() + p_lease WHERE t.job = p_job;
		RETURN QUERY SELECT c.seq, c.cursor, c.rows, c.rejects, c.updated_at, false, c.owner, c.run;
	END IF;
END
$pgetl$;
CREATE OR REPLACE FUNCTION ` + sch + `.expect_rows(p_got bigint, p_want bigint) RETURNS void LANGUAGE plpgsql AS $pgetl$
BEGIN
	IF p_got <> p_want THEN
		RAISE EXCEPTION 'pgetl: % rows matched, % expected', p_got, p_want USING ERRCODE = 'PGK01';
	END IF;
END
$pgetl$;
COMMENT ON FUNCTION ` + sch + `.advance(text,text,bigint,text,bigint,bigint,interval,bigint) IS ` + quoteLiteral(schemaMarker) + `;
`
}

// SQLSTATEs raised by the checkpoint's functions.
const (
	codeFenced           = "PGF01" // advance: another session owns the job
	codeAlreadyCommitted = "PGF02" // advance: the checkpoint is at or past this batch
	codeCheckpointGap    = "PGF03" // advance: the checkpoint is behind the batch before this one
	codeClaimed          = "PGF04" // claim: another session's lease is live
	codeFinished         = "PGF05" // claim: the job is finished
	codeSchemaVersion    = "PGF06" // claim: the checkpoint objects are of another version
	codeRowsMismatch     = "PGK01" // expect_rows: an upsert's key cache was stale
)

// claim takes the job for this session: one round trip when the checkpoint objects
// are current (the claim function checks their version), else setup's and a second
// claim's besides. The statements run in QueryExecModeExec (parse, bind and execute
// in one message, no prepared statement), which also works behind a transaction
// pooler; updated_at travels as microseconds since the epoch, so that its text form
// (DateStyle) does not matter.
func (s *Session) claim(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cp, prev, err := s.claimOnce(ctx)
	if pg := pgErrorOf(err); pg != nil && needsSetup(pg.Code) {
		if err := s.setup(ctx, err); err != nil {
			return err
		}
		cp, prev, err = s.claimOnce(ctx)
	}
	if pg := pgErrorOf(err); pg != nil {
		switch pg.Code {
		case codeClaimed:
			return fmt.Errorf("%w: job %q (%s; wait for the lease to expire or set Takeover)", ErrJobClaimed, s.cfg.Job, strings.TrimPrefix(pg.Message, "pgetl: "))
		case codeFinished:
			return fmt.Errorf("%w: job %q (set Restart to run it again, or Incremental to continue after its last cursor)", ErrJobFinished, s.cfg.Job)
		}
	}
	if err != nil {
		return fmt.Errorf("pgetl: claim job %q: %w", s.cfg.Job, err)
	}
	s.cp = cp
	s.nextRow.Store(cp.Rows + cp.Rejects)
	attrs := []any{"job", s.cfg.Job, "run", cp.Run, "seq", cp.Seq, "rows", cp.Rows, "rejects", cp.Rejects}
	switch {
	case s.cfg.Restart:
		attrs = append(attrs, "restart", true)
	case cp.Seq > 0:
		attrs = append(attrs, "resumed_after_cursor", cp.Cursor)
	}
	if prev != nil {
		attrs = append(attrs, "taken_over_from", *prev)
	}
	s.log.Info("pgetl: job started", attrs...)
	return nil
}

// needsSetup reports whether a claim that failed with SQLSTATE code found the
// checkpoint objects missing (schema, table, type or function) or of another version.
func needsSetup(code string) bool {
	switch code {
	case codeSchemaVersion,
		"42883", // undefined_function: no claim function, or one of an older signature
		"42P01", // undefined_table
		"3F000", // invalid_schema_name
		"42704": // undefined_object (the checkpoint row type)
		return true
	}
	return false
}

// claimOnce runs the claim function once.
func (s *Session) claimOnce(ctx context.Context) (cp Checkpoint, prev *string, err error) {
	cp = Checkpoint{Job: s.cfg.Job}
	var cursor *string
	var updated int64
	err = s.pool.QueryRow(ctx, `SELECT seq, cursor, rows, rejects, (extract(epoch FROM updated_at) * 1000000)::int8, finished, prev_owner, run FROM `+
		s.schema+`.claim($1::text, $2::text, $3::int8 * interval '1 millisecond', $4::bool, $5::bool, $6::bool, $7::text)`,
		pgx.QueryExecModeExec, s.cfg.Job, s.owner, s.cfg.Lease.Milliseconds(), s.cfg.Takeover, s.cfg.Restart, s.cfg.Incremental, schemaMarker).
		Scan(&cp.Seq, &cursor, &cp.Rows, &cp.Rejects, &updated, &cp.Finished, &prev, &cp.Run)
	if cursor != nil {
		cp.Cursor = *cursor
	}
	cp.UpdatedAt = time.UnixMicro(updated)
	return cp, prev, err
}

// checkpointRow is the checkpoint row of a job as the database holds it.
type checkpointRow struct {
	Checkpoint
	Owner string // "" when no session holds the job
	Found bool   // whether the job has a row
}

// readCheckpoint is the one reader of a job's checkpoint row. With lock, it reads
// FOR UPDATE, which waits for a transaction still holding the row (a batch in flight
// or an abandoned one being ended), so the answer is final. It runs in one round trip
// (QueryExecModeExec), and reads a checkpoint table of schema version 2 too (no run
// column: run 1), as ReadCheckpoint may run before any session migrated it.
func readCheckpoint(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, schema, job string, lock bool) (checkpointRow, error) {
	row := checkpointRow{Checkpoint: Checkpoint{Job: job}}
	q := `SELECT seq, cursor, rows, rejects, (extract(epoch FROM updated_at) * 1000000)::int8, finished_at IS NOT NULL, owner,
		coalesce((to_jsonb(c) ->> 'run')::int8, 1) FROM ` + schema + `.checkpoint c WHERE job = $1::text`
	if lock {
		q += " FOR UPDATE"
	}
	var cursor, owner *string
	var updated int64
	err := db.QueryRow(ctx, q, pgx.QueryExecModeExec, job).Scan(&row.Seq, &cursor, &row.Rows, &row.Rejects, &updated, &row.Finished, &owner, &row.Run)
	if errors.Is(err, pgx.ErrNoRows) {
		return row, nil
	}
	if err != nil {
		return row, fmt.Errorf("pgetl: read checkpoint of job %q: %w", job, err)
	}
	row.Found = true
	row.UpdatedAt = time.UnixMicro(updated)
	if cursor != nil {
		row.Cursor = *cursor
	}
	if owner != nil {
		row.Owner = *owner
	}
	return row, nil
}

// leaseRenewer is the session's background service that extends its lease every
// Lease/3, from Start until Stop. If the lease was taken over, it fences the session
// and closes Lost, which tests (and callers through the session's errors) can wait
// on instead of polling.
type leaseRenewer struct {
	s    *Session
	stop chan struct{}
	done chan struct{}
	lost chan struct{} // closed when another session took the job over
	once sync.Once
}

func newLeaseRenewer(s *Session) *leaseRenewer {
	return &leaseRenewer{s: s, stop: make(chan struct{}), done: make(chan struct{}), lost: make(chan struct{})}
}

// Start starts the renewal loop.
func (r *leaseRenewer) Start() { go r.run() }

// Stop stops the loop and waits for it. It is idempotent.
func (r *leaseRenewer) Stop() {
	r.once.Do(func() { close(r.stop) })
	<-r.done
}

// Lost is closed once the lease was found taken over.
func (r *leaseRenewer) Lost() <-chan struct{} { return r.lost }

func (r *leaseRenewer) run() {
	defer close(r.done)
	s := r.s
	t := time.NewTicker(s.cfg.Lease / 3)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Lease/3)
		tag, err := s.pool.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET lease_until = now() + $3::int8 * interval '1 millisecond'
			WHERE job = $1::text AND owner = $2::text`, pgx.QueryExecModeExec, s.cfg.Job, s.owner, s.cfg.Lease.Milliseconds())
		cancel()
		switch {
		case err != nil:
			s.log.Warn("pgetl: lease renewal failed", "job", s.cfg.Job, "err", err)
		case tag.RowsAffected() == 0:
			s.mu.Lock()
			s.fenced = true
			s.mu.Unlock()
			s.log.Error("pgetl: job taken over by another session", "job", s.cfg.Job)
			close(r.lost)
			return
		}
	}
}

// Checkpoint returns where the job stands: the checkpoint as of the claim, advanced
// by every batch this session committed since. A job resumes by skipping source rows
// up to and including Checkpoint().Cursor.
//
// It never reports a position behind what committed: after a commit whose outcome
// the session could not learn, it reads the checkpoint from the database (waiting
// for the row's lock), and if the database cannot be read it returns an error
// wrapping ErrInDoubt rather than a cursor that may be stale. If the database lost
// committed batches, it returns the *CheckpointLostError.
func (s *Session) Checkpoint(ctx context.Context) (Checkpoint, error) {
	if err := ctx.Err(); err != nil {
		return Checkpoint{}, err
	}
	s.mu.Lock()
	closed, resync, lost, cp := s.closed, s.resync, s.lost, s.cp
	s.mu.Unlock()
	switch {
	case closed:
		return Checkpoint{}, ErrClosed
	case lost != nil:
		return Checkpoint{}, lost
	case !resync:
		return cp, nil
	}
	s.commitMu.Lock()
	err := s.sync(ctx)
	s.commitMu.Unlock()
	if err != nil {
		if errors.Is(err, ErrFenced) || errors.Is(err, ErrCheckpointLost) {
			return Checkpoint{}, err
		}
		return Checkpoint{}, &InDoubtError{Job: s.cfg.Job, Seq: cp.Seq + 1, Err: err}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
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
	row, err := readCheckpoint(ctx, db, pgx.Identifier{schema}.Sanitize(), job, false)
	return row.Checkpoint, err
}

// Finish marks the job finished (one round trip): a later NewSession for it returns
// ErrJobFinished unless SessionConfig.Restart is set (start over) or
// SessionConfig.Incremental (its next run, after the last cursor). Call it after the
// last batch is committed (BatchSession.Close) and before Close.
func (s *Session) Finish(ctx context.Context) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.drain()
	if err := s.usable(); err != nil {
		return err
	}
	// One round trip: QueryExecModeExec, no prepared statement.
	tag, err := s.pool.Exec(ctx, `UPDATE `+s.schema+`.checkpoint SET finished_at = now(), updated_at = now()
		WHERE job = $1::text AND owner = $2::text`, pgx.QueryExecModeExec, s.cfg.Job, s.owner)
	if err != nil {
		return fmt.Errorf("pgetl: finish job %q: %w", s.cfg.Job, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fence()
	}
	s.mu.Lock()
	s.cp.Finished = true
	cp, st := s.cp, s.stat
	s.mu.Unlock()
	s.log.Info("pgetl: job finished", "job", s.cfg.Job, "run", cp.Run, "cursor", cp.Cursor, "rows", cp.Rows, "rejects", cp.Rejects,
		"session_rows", st.rows, "session_batches", st.batches, "session_txs", st.txs)
	return nil
}

// advanceSQL returns the statement that advances the checkpoint to seq: the fence of
// a unit of work. It is the first statement of the transaction after the guards,
// before any data: it fails (PGF01/02/03) unless this session owns the job and the
// checkpoint stands at seq-1, so a replay of a batch that did commit is recognised
// as committed (PGF02) without touching the data (no unique violation blaming a good
// row, no Tx function run twice), and a second writer is fenced out before it writes.
// The row lock it takes also orders units of work that run on several connections:
// one that reaches its fence waits until the one before it commits or rolls back.
// Its counts are those the transaction will commit; adjustSQL corrects them when the
// transaction learns more (rows isolated as rejects inside it).
func (s *Session) advanceSQL(seq int64, cursor *string, rows, rejects int64) string {
	c := "NULL"
	if cursor != nil {
		c = quoteLiteral(*cursor)
	}
	return fmt.Sprintf("SELECT %s.advance(%s, %s, %d, %s, %d, %d, '%d milliseconds', %d);",
		s.schema, quoteLiteral(s.cfg.Job), quoteLiteral(s.owner), seq, c, rows, rejects, s.cfg.Lease.Milliseconds(), s.confirmedSeq())
}

// confirmedSeq is the last sequence this session knows committed: a fence for a later
// one waits (bounded by lock_timeout) while the checkpoint stands between the two,
// since the units between are this session's own, still in flight; a checkpoint
// behind it means committed batches were lost (PGF03 at once).
func (s *Session) confirmedSeq() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cp.Seq
}

// advanceQuery is advanceSQL as a parameterized statement, whose text is the same
// for every batch (the statement path: prepared once per connection).
func (s *Session) advanceQuery(seq int64, cursor *string, rows, rejects int64) (string, []any) {
	return "SELECT " + s.schema + ".advance($1, $2, $3, $4, $5, $6, $7::interval, $8)",
		[]any{s.cfg.Job, s.owner, seq, cursor, rows, rejects, s.cfg.Lease, s.confirmedSeq()}
}

// adjustSQL returns the statement that corrects the counts and cursor recorded by
// advanceSQL(seq, …) later in the same transaction (the row is already locked by
// it).
func (s *Session) adjustSQL(seq int64, cursor *string, rows, rejects int64) string {
	c := "cursor"
	if cursor != nil {
		c = quoteLiteral(*cursor)
	}
	return fmt.Sprintf("UPDATE %s.checkpoint SET cursor = %s, rows = rows + %d, rejects = rejects + %d WHERE job = %s AND owner = %s AND seq = %d;",
		s.schema, c, rows, rejects, quoteLiteral(s.cfg.Job), quoteLiteral(s.owner), seq)
}

// sync re-reads the checkpoint after a commit whose outcome the session does not
// know (abandoned by its caller, or not resolvable at the time), so the next unit of
// work gets the right sequence and Checkpoint the right cursor. Caller must hold
// commitMu.
func (s *Session) sync(ctx context.Context) error {
	s.mu.Lock()
	need := s.resync
	s.mu.Unlock()
	if !need {
		return nil
	}
	row, err := readCheckpoint(ctx, s.pool, s.schema, s.cfg.Job, true)
	if err != nil {
		return fmt.Errorf("pgetl: resync checkpoint of job %q: %w", s.cfg.Job, err)
	}
	if row.Owner != s.owner {
		return s.fence()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if row.Seq < s.cp.Seq {
		return s.checkpointLost(row)
	}
	s.cp.Seq, s.cp.Cursor, s.cp.Rows, s.cp.Rejects, s.cp.UpdatedAt, s.resync = row.Seq, row.Cursor, row.Rows, row.Rejects, row.UpdatedAt, false
	if n := row.Rows + row.Rejects; n > s.nextRow.Load() {
		s.nextRow.Store(n)
	}
	return nil
}

// checkpointLost records that the database's checkpoint row is behind what this
// session committed (a failover or restore lost committed batches) and returns the
// error every later call returns. Caller must hold mu.
func (s *Session) checkpointLost(row checkpointRow) error {
	if s.lost == nil {
		s.lost = &CheckpointLostError{Job: s.cfg.Job, Committed: s.cp, Database: row.Checkpoint}
		s.log.Error("pgetl: the database's checkpoint moved back; committed batches were lost", "job", s.cfg.Job,
			"committed_seq", s.cp.Seq, "database_seq", row.Seq, "lost_rows", s.cp.Rows-row.Rows, "resume_cursor", row.Cursor)
	}
	return s.lost
}

// gap handles PGF03 (the checkpoint is behind the batch before seq): it reads the
// row and returns a *CheckpointLostError if the database lost batches this session
// committed, else an error saying where the checkpoint stands.
func (s *Session) gap(ctx context.Context, seq int64, cause error) error {
	row, err := readCheckpoint(ctx, s.pool, s.schema, s.cfg.Job, false)
	if err != nil {
		return fmt.Errorf("pgetl: job %q batch %d: %w (and reading the checkpoint failed: %w)", s.cfg.Job, seq, cause, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if row.Seq < s.cp.Seq {
		return s.checkpointLost(row)
	}
	return fmt.Errorf("pgetl: job %q batch %d: the checkpoint stands at batch %d: %w: %w", s.cfg.Job, seq, row.Seq, errPredecessorPending, cause)
}

// errPredecessorPending marks a fence that gave up waiting for the session's own
// batches before it (in flight, being retried): transient.
var errPredecessorPending = errors.New("a batch before it has not committed yet")

// reserveSeq hands the next sequence to a unit of work that commits while earlier
// ones may still be in flight. Caller must hold commitMu.
func (s *Session) reserveSeq() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved = max(s.reserved, s.cp.Seq) + 1
	return s.reserved
}

// unreserve forgets the sequences of units that did not commit, once none is in
// flight. Caller must hold commitMu.
func (s *Session) unreserve() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserved = s.cp.Seq
}

// needsSync reports whether the checkpoint must be re-read before the next unit.
func (s *Session) needsSync() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resync
}

// drain waits until no unit of work is in flight and forgets the sequences of those
// that did not commit. Caller must hold commitMu (so no unit starts meanwhile).
func (s *Session) drain() {
	s.flight.Wait()
	s.unreserve()
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
	s.log.Debug("pgetl: batch committed", "job", s.cfg.Job, "seq", seq, "rows", rows, "rejects", rejects, "bytes", bytes, "cursor", s.cp.Cursor)
}

// batchCommitted records a committed batch (of a BatchSession or a BatchSet): the
// checkpoint, the counts (sc: inserted, updated, …; see BatchResult), the flush
// time, and the batch's and the session's OnCommitFunc. Called in batch order.
func (s *Session) batchCommitted(seq int64, cursor *string, rows int64, rejects []Reject, sent int64, t0 time.Time, onCommit func(BatchResult), sc rowCounts) {
	s.committed(seq, cursor, rows, int64(len(rejects)), sent)
	s.rejLog.log(s.log, s.cfg.Job, seq, rejects)
	d := time.Since(t0)
	s.mu.Lock()
	s.stat.flushNanos += int64(d)
	s.stat.sync.add(sc)
	s.mu.Unlock()
	c := ""
	if cursor != nil {
		c = *cursor
	}
	res := BatchResult{Job: s.cfg.Job, Seq: seq, Rows: rows, Rejects: int64(len(rejects)), Bytes: sent, Cursor: c, Duration: d,
		Inserted: sc.inserted, Updated: sc.updated, Unchanged: sc.unchanged, Merged: sc.merged}
	if onCommit != nil {
		onCommit(res)
	}
	s.notifyCommit(res) // SessionConfig.OnCommitFunc, with the unit's attempts
}

// acquire takes a connection for one attempt; release gives it back and adds the
// time it was held to Stat.HoldDuration. A batch in flight waits for its turn
// first (see takeTurn).
func (s *Session) acquire(ctx context.Context) (conn *pgxpool.Conn, release func(), err error) {
	took, gave, err := takeTurn(ctx)
	if err != nil {
		return nil, nil, err
	}
	t0 := time.Now()
	conn, err = s.pool.Acquire(ctx)
	if err != nil {
		return nil, nil, err
	}
	took()
	return conn, func() {
		conn.Release()
		gave()
		s.mu.Lock()
		s.stat.holdNanos += int64(time.Since(t0))
		s.mu.Unlock()
	}, nil
}

// txCommitted records a committed Session.Tx unit: it advances the checkpoint's
// sequence like a batch but is counted apart (Stat.Txs). Caller must hold commitMu.
func (s *Session) txCommitted(seq int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cp.Seq = seq
	s.cp.UpdatedAt = time.Now()
	s.stat.txs++
}
