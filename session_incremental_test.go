package pgetl

import (
	"context"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// incrementalRun is one run of a job whose source (ids 1..upTo, growing between
// runs) has a monotonic cursor: it claims the job, reads the source after the
// checkpoint's cursor, loads what is new, finishes and closes. It returns the
// checkpoint as claimed.
func (bd *bundle) incrementalRun(t *testing.T, job string, upTo int64, mod ...func(*SessionConfig)) Checkpoint {
	t.Helper()
	ctx := context.Background()
	s := bd.session(t, job, append([]func(*SessionConfig){func(c *SessionConfig) { c.Incremental = true }}, mod...)...)
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	after := int64(0)
	if cp.Cursor != "" {
		after, err = strconv.ParseInt(cp.Cursor, 10, 64)
		require.NoError(t, err)
	}
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 40})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b, after+1, upTo))
	require.NoError(t, b.Close(ctx))
	require.NoError(t, s.Finish(ctx))
	require.NoError(t, s.Close(ctx))
	return cp
}

// TestIncrementalRuns: with SessionConfig.Incremental a finished job runs again and
// continues after its last cursor, loading only the rows the source gained; the run
// counter counts the runs and the batch sequence goes on across them (the fence is
// the same); without the option a finished job stays finished; Restart starts over
// (run 1, no cursor).
func TestIncrementalRuns(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	const job = "incremental"

	cp := bd.incrementalRun(t, job, 300)
	require.Equal(t, Checkpoint{Job: job, Run: 1, UpdatedAt: cp.UpdatedAt}, cp, "a new job: run 1, nothing committed")
	bd.requireExactly(t, 300)
	run1, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, job)
	require.NoError(t, err)
	require.True(t, run1.Finished)
	require.Equal(t, Checkpoint{Job: job, Seq: 8, Cursor: "300", Rows: 300, Finished: true, Run: 1, UpdatedAt: run1.UpdatedAt}, run1)

	// Without the option a finished job keeps today's behaviour.
	_, err = NewSession(ctx, bd.pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema})
	require.ErrorIs(t, err, ErrJobFinished)

	// Run 2: the source gained rows 301..450; only those are loaded.
	cp = bd.incrementalRun(t, job, 450)
	require.Equal(t, Checkpoint{Job: job, Seq: 8, Cursor: "300", Rows: 300, Run: 2, UpdatedAt: cp.UpdatedAt}, cp,
		"run 2 starts after run 1's cursor, unfinished")
	bd.requireExactly(t, 450)
	run2, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, job)
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: job, Seq: 12, Cursor: "450", Rows: 450, Finished: true, Run: 2, UpdatedAt: run2.UpdatedAt}, run2,
		"the batch sequence goes on across runs")

	// Run 3 finds nothing new: it commits nothing and finishes.
	cp = bd.incrementalRun(t, job, 450)
	require.Equal(t, int64(3), cp.Run)
	require.Equal(t, "450", cp.Cursor)
	bd.requireExactly(t, 450)

	// Restart starts over, from run 1 and no cursor.
	s := bd.session(t, job, func(c *SessionConfig) { c.Restart = true; c.Incremental = true })
	cp, err = s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: job, Seq: 12, Run: 1, UpdatedAt: cp.UpdatedAt}, cp)
	require.NoError(t, s.Close(ctx))
	after, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, job)
	require.NoError(t, err)
	require.Equal(t, int64(1), after.Run)
	require.False(t, after.Finished)
}

// TestIncrementalRunCrashResumes: a run that stops before Finish (its session lost,
// taken over) resumes in the same run, after its own last cursor, exactly once; the
// taken-over session is fenced as in any run.
func TestIncrementalRunCrashResumes(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	const job = "incremental-crash"
	bd.incrementalRun(t, job, 100)

	// Run 2 commits rows 101..180 and dies (no Finish, no Close).
	s2 := bd.session(t, job, func(c *SessionConfig) { c.Incremental = true })
	cp, err := s2.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(2), cp.Run)
	b2, err := s2.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 40})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b2, 101, 180))
	require.NoError(t, b2.Flush(ctx))

	// Its successor takes the job over: still run 2, after row 180.
	s3 := bd.session(t, job, func(c *SessionConfig) { c.Incremental = true; c.Takeover = true })
	cp, err = s3.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: job, Seq: 5, Cursor: "180", Rows: 180, Run: 2, UpdatedAt: cp.UpdatedAt}, cp)

	// The old session is fenced: nothing more of it lands.
	require.NoError(t, load(ctx, b2, 181, 190))
	require.ErrorIs(t, b2.Close(ctx), ErrFenced)

	b3, err := s3.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 40})
	require.NoError(t, err)
	require.NoError(t, load(ctx, b3, 181, 250))
	require.NoError(t, b3.Close(ctx))
	require.NoError(t, s3.Finish(ctx))
	require.NoError(t, s3.Close(ctx))
	bd.requireExactly(t, 250)
	final, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, job)
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: job, Seq: 7, Cursor: "250", Rows: 250, Finished: true, Run: 2, UpdatedAt: final.UpdatedAt}, final)
}

// TestSchemaMigratesFromVersion2: checkpoint objects made by the previous pgetl
// (schema version 2: no run column, the 5-argument claim) are migrated in place by
// the next session, which finds them through its claim failing (no such claim
// function); ReadCheckpoint reads the old table as it is (run 1). A job finished
// under version 2 continues as its run 2 with Incremental.
func TestSchemaMigratesFromVersion2(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	sch := pgx.Identifier{bd.db.Schema}.Sanitize()
	bd.db.Exec(t, "BEGIN;"+checkpointDDLv2(sch)+"COMMIT")
	bd.db.Exec(t, `INSERT INTO `+sch+`.checkpoint (job, seq, cursor, rows, finished_at) VALUES ('done', 3, '100', 100, now()), ('midway', 2, '7', 7, NULL)`)
	old, err := ReadCheckpoint(ctx, bd.pool, bd.db.Schema, "done")
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: "done", Seq: 3, Cursor: "100", Rows: 100, Finished: true, Run: 1, UpdatedAt: old.UpdatedAt}, old)

	s := bd.session(t, "midway")
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: "midway", Seq: 2, Cursor: "7", Rows: 7, Run: 1, UpdatedAt: cp.UpdatedAt}, cp)
	require.NoError(t, s.Tx(ctx, func(pgx.Tx) error { return nil }), "the migrated fence works")
	require.NoError(t, s.Close(ctx))

	var marker string
	require.NoError(t, bd.pool.QueryRow(ctx, "SELECT obj_description(to_regprocedure($1), 'pg_proc')",
		sch+".advance(text,text,bigint,text,bigint,bigint,interval,bigint)").Scan(&marker))
	require.Equal(t, schemaMarker, marker)
	require.Equal(t, int64(0), bd.db.Int(t, "SELECT count(*) FROM pg_proc WHERE proname = 'claim' AND pronamespace = $1::regnamespace AND pronargs = 5", sch),
		"the version 2 claim is dropped")

	_, err = NewSession(ctx, bd.pool, SessionConfig{Job: "done", CheckpointSchema: bd.db.Schema})
	require.ErrorIs(t, err, ErrJobFinished, "a job finished under version 2 stays finished")
	cp = bd.incrementalRun(t, "done", 130)
	require.Equal(t, Checkpoint{Job: "done", Seq: 3, Cursor: "100", Rows: 100, Run: 2, UpdatedAt: cp.UpdatedAt}, cp)
	require.Equal(t, int64(30), bd.db.Int(t, "SELECT count(*) FROM "+bd.table))
}

// TestSchemaStaleMarkerMigrates: a current-looking schema whose version marker is
// another (an older pgetl ran its DDL over it) is set up again: the claim refuses
// it (PGF06) and the session runs the DDL, then claims.
func TestSchemaStaleMarkerMigrates(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	sch := pgx.Identifier{bd.db.Schema}.Sanitize()
	require.NoError(t, bd.session(t, "first").Close(ctx))
	adv := sch + ".advance(text,text,bigint,text,bigint,bigint,interval,bigint)"
	bd.db.Exec(t, `COMMENT ON FUNCTION `+adv+` IS 'pgetl schema 2'`)
	s := bd.session(t, "second")
	require.NoError(t, s.Close(ctx))
	var marker string
	require.NoError(t, bd.pool.QueryRow(ctx, "SELECT obj_description(to_regprocedure($1), 'pg_proc')", adv).Scan(&marker))
	require.Equal(t, schemaMarker, marker)
}

// checkpointDDLv2 is the DDL of schema version 2 (pgetl before incremental runs),
// verbatim but for the marker, for the migration test.
func checkpointDDLv2(sch string) string {
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
ALTER TABLE ` + sch + `.reject ADD COLUMN IF NOT EXISTS table_name text;
CREATE OR REPLACE FUNCTION ` + sch + `.advance(p_job text, p_owner text, p_seq bigint, p_cursor text,
	p_rows bigint, p_rejects bigint, p_lease interval, p_confirmed bigint) RETURNS void LANGUAGE plpgsql AS $pgetl$
DECLARE
	cur_owner text;
	cur_seq bigint;
	deadline timestamptz := clock_timestamp() + coalesce(nullif(current_setting('lock_timeout'), '0')::interval, interval '30 seconds');
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
CREATE OR REPLACE FUNCTION ` + sch + `.claim(p_job text, p_owner text, p_lease interval, p_takeover bool, p_restart bool)
	RETURNS TABLE (seq bigint, cursor text, rows bigint, rejects bigint, updated_at timestamptz, finished bool, prev_owner text)
	LANGUAGE plpgsql AS $pgetl$
DECLARE
	c ` + sch + `.checkpoint;
BEGIN
	INSERT INTO ` + sch + `.checkpoint AS t (job) VALUES (p_job) ON CONFLICT (job) DO NOTHING;
	SELECT * INTO c FROM ` + sch + `.checkpoint t WHERE t.job = p_job FOR UPDATE;
	IF c.owner IS NOT NULL AND coalesce(c.lease_until > now(), false) AND NOT p_takeover THEN
		RAISE EXCEPTION 'pgetl: job % is claimed by owner % (lease until %)', p_job, c.owner, c.lease_until USING ERRCODE = 'PGF04';
	END IF;
	IF c.finished_at IS NOT NULL AND NOT p_restart THEN
		RAISE EXCEPTION 'pgetl: job % is finished', p_job USING ERRCODE = 'PGF05';
	END IF;
	IF p_restart THEN
		UPDATE ` + sch + `.checkpoint t SET owner = p_owner, lease_until = now() + p_lease, cursor = NULL, rows = 0, rejects = 0,
			finished_at = NULL WHERE t.job = p_job;
		RETURN QUERY SELECT c.seq, NULL::text, 0::bigint, 0::bigint, c.updated_at, false, c.owner;
	ELSE
		UPDATE ` + sch + `.checkpoint t SET owner = p_owner, lease_until = now() + p_lease WHERE t.job = p_job;
		RETURN QUERY SELECT c.seq, c.cursor, c.rows, c.rejects, c.updated_at, c.finished_at IS NOT NULL, c.owner;
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
COMMENT ON FUNCTION ` + sch + `.advance(text,text,bigint,text,bigint,bigint,interval,bigint) IS ` + `'pgetl schema 2'` + `;
`
}

// TestIncrementalRunsThroughPgBouncer: behind PgBouncer in transaction mode the
// first session of a schema creates the checkpoint objects (claim, setup, claim),
// and runs, incremental runs, Finish and Close rely on no session state.
func TestIncrementalRunsThroughPgBouncer(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	pool, err := NewPool(ctx, pgtest.WithParam(pgtest.PgBouncerURL(t), PoolerKey, "pgbouncer"))
	require.NoError(t, err)
	defer pool.Close()
	bd.pool = pool
	const job = "incremental-bouncer"
	require.Equal(t, int64(1), bd.incrementalRun(t, job, 120).Run)
	cp := bd.incrementalRun(t, job, 200)
	require.Equal(t, int64(2), cp.Run)
	require.Equal(t, "120", cp.Cursor)
	bd.requireExactly(t, 200)
	_, err = NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema})
	require.ErrorIs(t, err, ErrJobFinished)
}

// TestSchemaCurrentNeedsNoCreate: once the checkpoint objects exist at the current
// version, a role without CREATE on their schema starts sessions, runs them and
// finishes them: the claim checks the version itself and NewSession sends no DDL.
// A stale version makes NewSession try the DDL, which such a role cannot run: it
// fails naming the set-up and the privilege.
func TestSchemaCurrentNeedsNoCreate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	bd := setupItems(t)
	sch := pgx.Identifier{bd.db.Schema}.Sanitize()
	require.NoError(t, bd.session(t, "owner-made").Close(ctx)) // the objects, made by a role that may
	role := pgx.Identifier{bd.db.Schema + "_etl"}.Sanitize()
	bd.db.Exec(t, `CREATE ROLE `+role+` NOLOGIN`)
	t.Cleanup(func() {
		// The schema (and the grants on its objects) is dropped after this, by
		// pgtest: drop what the role owns or was granted outside it first.
		_, _ = bd.db.Pool.Exec(context.Background(), `DROP OWNED BY `+role+`; DROP ROLE `+role)
	})
	bd.db.Exec(t, `GRANT USAGE ON SCHEMA `+sch+` TO `+role+`;
		GRANT SELECT, INSERT, UPDATE ON `+sch+`.checkpoint, `+sch+`.items TO `+role+`;
		GRANT SELECT, INSERT ON `+sch+`.reject TO `+role)
	cfg, err := ParseConfig(bd.db.URL)
	require.NoError(t, err)
	cfg.ConnConfig.AfterConnect = func(ctx context.Context, c *pgconn.PgConn) error {
		return c.Exec(ctx, "SET ROLE "+role).Close()
	}
	pool, err := NewPoolWithConfig(ctx, cfg)
	require.NoError(t, err)
	defer pool.Close()
	limited := &bundle{db: bd.db, pool: pool, table: bd.table}
	require.Equal(t, int64(1), limited.incrementalRun(t, "limited", 50).Run)
	require.Equal(t, int64(2), limited.incrementalRun(t, "limited", 80).Run)
	bd.requireExactly(t, 80)

	bd.db.Exec(t, `COMMENT ON FUNCTION `+sch+`.advance(text,text,bigint,text,bigint,bigint,interval,bigint) IS 'pgetl schema 2'`)
	_, err = NewSession(ctx, pool, SessionConfig{Job: "limited", CheckpointSchema: bd.db.Schema, Incremental: true})
	require.ErrorContains(t, err, "set up checkpoint table")
	var pg *pgconn.PgError
	require.ErrorAs(t, err, &pg)
	require.Equal(t, "42501", pg.Code, "insufficient privilege: %v", err)
}
