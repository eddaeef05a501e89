package pgetl

import (
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrClosed is returned by any method of a [Session] or [BatchSession] called after
// its Close, and by Add or Flush after a BatchSession has stopped on an error.
var ErrClosed = errors.New("pgetl: closed")

// ErrJobClaimed is returned by [NewSession] when another live session holds the job's
// claim (its lease has not expired) and [SessionConfig.Takeover] is false.
var ErrJobClaimed = errors.New("pgetl: job is claimed by another session")

// ErrFenced is returned when a session tries to advance a checkpoint that another
// session has taken over since. The batch in flight is rolled back; nothing of it is
// committed. The session cannot continue: a newer owner is running the job.
var ErrFenced = errors.New("pgetl: job was taken over by another session (fenced)")

// ErrJobFinished is returned by [NewSession] for a job that was marked finished by
// [Session.Finish], unless [SessionConfig.Restart] asks to start it over or
// [SessionConfig.Incremental] to continue it after its last cursor.
var ErrJobFinished = errors.New("pgetl: job is already finished")

// ErrTooManyRejects is returned (wrapped in a [*BatchError]) when the rejected rows of
// a job exceed [BatchConfig.MaxRejects] or [BatchConfig.MaxRejectRatio]. Everything
// committed before stays committed.
var ErrTooManyRejects = errors.New("pgetl: too many rejected rows")

// ErrRetriesExhausted is returned (wrapping the last cause) when a batch or
// transaction still fails with transient errors after [RetryPolicy.MaxAttempts]
// attempts or [RetryPolicy.MaxElapsed].
var ErrRetriesExhausted = errors.New("pgetl: retries exhausted")

// ErrCheckpointLost is returned (in a [*CheckpointLostError]) when the database's
// checkpoint of the job is behind what this session committed and was told was
// durable: committed batches were lost, by a failover to a standby that had not
// received them or by a restore from backup. Nothing more is written; the rows the
// database lost are not loaded. A rerun resumes from the checkpoint the database
// holds now and loads them again.
var ErrCheckpointLost = errors.New("pgetl: the database's checkpoint moved back: committed batches were lost")

// ErrInDoubt is returned (in an [*InDoubtError]) when the outcome of a commit could
// not be learned: the connection failed after COMMIT was sent and the server could
// not be asked in time. The batch's rows may or may not be in the database; they
// are never there twice, because the checkpoint's fence rejects a replay of a
// committed batch. Read the checkpoint (Session.Checkpoint resolves it, or a new
// Session after a restart) to learn where the job stands.
var ErrInDoubt = errors.New("pgetl: commit outcome unknown")

// CheckpointLostError reports that the database's checkpoint moved back (see
// [ErrCheckpointLost]).
type CheckpointLostError struct {
	Job string
	// Committed is where this session had committed the job to.
	Committed Checkpoint
	// Database is where the database's checkpoint stands now: a rerun resumes here.
	Database Checkpoint
}

// Error implements error.
func (e *CheckpointLostError) Error() string {
	return fmt.Sprintf("pgetl: job %q: the database's checkpoint moved back from batch %d to batch %d: "+
		"%d committed rows were lost by the database (a failover to a standby that had not received them, or a restore); "+
		"nothing more was written, and a rerun resumes from cursor %q (%d rows loaded)",
		e.Job, e.Committed.Seq, e.Database.Seq, e.Committed.Rows-e.Database.Rows, e.Database.Cursor, e.Database.Rows)
}

// Is reports target == ErrCheckpointLost.
func (e *CheckpointLostError) Is(target error) bool { return target == ErrCheckpointLost }

// InDoubtError reports a commit whose outcome is unknown (see [ErrInDoubt]).
type InDoubtError struct {
	Job string
	Seq int64 // the batch whose commit is in doubt
	Err error // why it could not be resolved
}

// Error implements error.
func (e *InDoubtError) Error() string {
	return fmt.Sprintf("pgetl: job %q batch %d: commit outcome unknown (the connection failed after COMMIT was sent, and the checkpoint could not be read): %v",
		e.Job, e.Seq, e.Err)
}

// Is reports target == ErrInDoubt.
func (e *InDoubtError) Is(target error) bool { return target == ErrInDoubt }

// Unwrap returns why the outcome could not be resolved.
func (e *InDoubtError) Unwrap() error { return e.Err }

// BatchError describes a batch that failed. It names the batch, and where the failure
// is pinned to one row, the row's index within the job (0-based, counting every row
// passed to Add), its cursor, and the column. Unwrap returns the cause, so
// errors.As(err, &pgErr) finds a *pgconn.PgError when the server reported it.
type BatchError struct {
	Job      string // the job name
	Seq      int64  // the batch sequence number within the job
	Row      int64  // index of the failing row within the job; -1 if not pinned to a row
	Cursor   string // the cursor passed to Add with that row
	Column   string // the column, when known
	Value    string // the value (truncated to 64 bytes), when known
	SQLState string // the SQLSTATE, when the server reported one
	// Constraint is the violated constraint, when the server named one.
	Constraint string
	// Committed reports whether the rows of the batch before Row were committed (with
	// the checkpoint) before the error was returned.
	Committed bool
	Err       error // the cause
}

// Error implements error.
func (e *BatchError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pgetl: job %q", e.Job)
	if e.Seq > 0 {
		fmt.Fprintf(&b, " batch %d", e.Seq)
	}
	if e.Row >= 0 {
		fmt.Fprintf(&b, " row %d", e.Row)
		if e.Cursor != "" {
			fmt.Fprintf(&b, " (cursor %q)", e.Cursor)
		}
	}
	if e.Column != "" {
		fmt.Fprintf(&b, " column %q", e.Column)
	}
	if e.Value != "" {
		fmt.Fprintf(&b, " value %q", e.Value)
	}
	if e.Constraint != "" {
		fmt.Fprintf(&b, " constraint %q", e.Constraint)
	}
	if e.Committed {
		b.WriteString(" (rows before it committed)")
	}
	if e.Err != nil {
		b.WriteString(": ")
		// The cause's own "pgetl: job …:" prefix would repeat what was said.
		msg := strings.TrimPrefix(e.Err.Error(), "pgetl: ")
		msg = strings.TrimPrefix(msg, fmt.Sprintf("job %q batch %d: ", e.Job, e.Seq))
		msg = strings.TrimPrefix(msg, fmt.Sprintf("job %q: ", e.Job))
		b.WriteString(msg)
	}
	return b.String()
}

// Unwrap returns the cause.
func (e *BatchError) Unwrap() error { return e.Err }

func pgErrorOf(err error) *pgconn.PgError {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr
	}
	return nil
}
