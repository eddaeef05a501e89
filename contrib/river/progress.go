package pgetlriver

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

// Queryer is what [ReadProgress] needs: a *pgxpool.Pool, *pgx.Conn or pgx.Tx.
type Queryer interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// PartitionState is where one partition stands, as [ReadProgress] classifies it.
type PartitionState string

// Partition states. A partition is Done once its checkpoint is finished; else
// Running while a session holds its lease; else Failed when River discarded or
// cancelled its job (re-enqueue the job to run it again); else Retrying when River
// holds it for a retry after an error; else Pending (waiting for a worker, snoozed,
// or between time slices).
const (
	StateDone     PartitionState = "done"
	StateRunning  PartitionState = "running"
	StateFailed   PartitionState = "failed"
	StateRetrying PartitionState = "retrying"
	StatePending  PartitionState = "pending"
)

// PartitionProgress is one partition's line in a [Progress].
type PartitionProgress struct {
	Partition   string
	State       PartitionState
	RiverState  string // the River job's state ("" if River no longer has the job)
	RiverJobID  int64
	Attempt     int
	AttemptedBy string // the River client that ran the last attempt
	Rows        int64  // rows committed (the checkpoint's count)
	RowsTotal   int64  // rows of a range partition; 0 when unknown
	LeaseLive   bool
	UpdatedAt   time.Time // of the checkpoint
}

// Progress sums a job's partitions.
type Progress struct {
	Job string
	// Partitions counts the partitions known to River or to the checkpoint table.
	Partitions int
	// Done, Running, Failed, Retrying and Pending count partitions by state.
	Done, Running, Failed, Retrying, Pending int
	// Rows is the sum of the partitions' committed rows.
	Rows int64
	// RowsTotal is the sum of the range partitions' sizes (0 when none is a range).
	RowsTotal int64
	// Parts are the partitions, by name.
	Parts []PartitionProgress
}

// Finished reports whether every partition is done.
func (p Progress) Finished() bool { return p.Partitions > 0 && p.Done == p.Partitions }

// String renders the progress on one line.
func (p Progress) String() string {
	s := fmt.Sprintf("%s: %d/%d partitions done, %d running, %d pending, %d retrying, %d failed; %d rows",
		p.Job, p.Done, p.Partitions, p.Running, p.Pending, p.Retrying, p.Failed, p.Rows)
	if p.RowsTotal > 0 {
		s += fmt.Sprintf(" of %d (%.1f%%)", p.RowsTotal, 100*float64(p.Rows)/float64(p.RowsTotal))
	}
	return s
}

// ProgressConfig says where [ReadProgress] finds its tables.
type ProgressConfig struct {
	// RiverSchema is the schema of River's tables (Config.Schema of the clients);
	// empty uses the search_path.
	RiverSchema string
	// CheckpointSchema is pgetl's checkpoint schema. Defaults to
	// pgetl.CheckpointSchemaDefault.
	CheckpointSchema string
}

// ReadProgress reads the progress of job: the last River job of each of its
// partitions joined with the partition's checkpoint ("<job>/<partition>"). It is
// one read-only statement and works through PgBouncer.
func ReadProgress(ctx context.Context, db Queryer, cfg ProgressConfig, job string) (Progress, error) {
	cs := cfg.CheckpointSchema
	if cs == "" {
		cs = pgetl.CheckpointSchemaDefault
	}
	riverJob := "river_job"
	if cfg.RiverSchema != "" {
		riverJob = pgx.Identifier{cfg.RiverSchema, "river_job"}.Sanitize()
	}
	// The checkpoint table is created by the first session; before that, no
	// partition has progress.
	var haveCP bool
	if err := db.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, pgx.Identifier{cs, "checkpoint"}.Sanitize()).Scan(&haveCP); err != nil {
		return Progress{}, fmt.Errorf("pgetlriver: progress of job %q: %w", job, err)
	}
	cp := `SELECT NULL::text AS part, 0::bigint AS rows, false AS finished, false AS live, NULL::timestamptz AS updated_at WHERE false`
	if haveCP {
		cp = `SELECT substr(job, length($1::text) + 2) AS part, rows, finished_at IS NOT NULL AS finished,
			coalesce(lease_until > now(), false) AS live, updated_at
		FROM ` + pgx.Identifier{cs, "checkpoint"}.Sanitize() + `
		WHERE starts_with(job, $1::text || '/') AND strpos(substr(job, length($1::text) + 2), '/') = 0`
	}
	q := `WITH r AS (
		SELECT DISTINCT ON (args->>'partition') args->>'partition' AS part, id, state::text AS state, attempt,
			coalesce(attempted_by[cardinality(attempted_by)], '') AS attempted_by,
			coalesce((args->>'to')::bigint - (args->>'from')::bigint + 1, 0) AS total
		FROM ` + riverJob + `
		WHERE kind = $2 AND args @> jsonb_build_object('job', $1::text)
		ORDER BY args->>'partition', id DESC
	), c AS (` + cp + `)
	SELECT coalesce(r.part, c.part), coalesce(r.state, ''), coalesce(r.id, 0), coalesce(r.attempt, 0),
		coalesce(r.attempted_by, ''), coalesce(r.total, 0), coalesce(c.rows, 0), coalesce(c.finished, false),
		coalesce(c.live, false), c.updated_at
	FROM r FULL JOIN c ON c.part = r.part`
	rows, err := db.Query(ctx, q, job, Kind)
	if err != nil {
		return Progress{}, fmt.Errorf("pgetlriver: progress of job %q: %w", job, err)
	}
	pr := Progress{Job: job}
	for rows.Next() {
		var (
			pp       PartitionProgress
			finished bool
			updated  *time.Time
		)
		if err := rows.Scan(&pp.Partition, &pp.RiverState, &pp.RiverJobID, &pp.Attempt, &pp.AttemptedBy,
			&pp.RowsTotal, &pp.Rows, &finished, &pp.LeaseLive, &updated); err != nil {
			rows.Close()
			return Progress{}, fmt.Errorf("pgetlriver: progress of job %q: %w", job, err)
		}
		if updated != nil {
			pp.UpdatedAt = *updated
		}
		switch {
		case finished:
			pp.State = StateDone
			pr.Done++
		case pp.LeaseLive:
			pp.State = StateRunning
			pr.Running++
		case pp.RiverState == "discarded" || pp.RiverState == "cancelled":
			pp.State = StateFailed
			pr.Failed++
		case pp.RiverState == "retryable":
			pp.State = StateRetrying
			pr.Retrying++
		default:
			pp.State = StatePending
			pr.Pending++
		}
		pr.Rows += pp.Rows
		pr.RowsTotal += pp.RowsTotal
		pr.Parts = append(pr.Parts, pp)
	}
	if err := rows.Err(); err != nil {
		return Progress{}, fmt.Errorf("pgetlriver: progress of job %q: %w", job, err)
	}
	pr.Partitions = len(pr.Parts)
	sort.Slice(pr.Parts, func(i, j int) bool { return pr.Parts[i].Partition < pr.Parts[j].Partition })
	return pr, nil
}

// Migrate creates or upgrades River's tables in schema (empty: the search_path's
// first schema) with River's migrator, creating the schema if missing. Run it
// from one process (the coordinator) on a direct connection, not through
// PgBouncer.
func Migrate(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	if pool == nil {
		return errors.New("pgetlriver: Migrate needs a pool")
	}
	if schema != "" {
		if _, err := pool.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{schema}.Sanitize()); err != nil {
			return fmt.Errorf("pgetlriver: create schema %s: %w", schema, err)
		}
	}
	m, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Schema: schema})
	if err != nil {
		return fmt.Errorf("pgetlriver: River migrator: %w", err)
	}
	if _, err := m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("pgetlriver: migrate River's tables: %w", err)
	}
	return nil
}
