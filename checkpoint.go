package pgetl

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

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
