package pgetl

import (
	"context"
	"errors"
	"log/slog"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// fakeClock is a clock whose time moves only when the retry loop sleeps, and whose
// draws are the largest allowed (rand returns n-1).
type fakeClock struct {
	now    time.Time
	sleeps []time.Duration
}

func (f *fakeClock) clock() clock {
	return clock{
		now: func() time.Time { return f.now },
		sleep: func(_ context.Context, d time.Duration) error {
			f.sleeps = append(f.sleeps, d)
			f.now = f.now.Add(d)
			return nil
		},
		rand: func(n int64) int64 { return n - 1 },
	}
}

// TestBackoffFullJitter: the backoff is a draw from [0, min(MaxBackoff,
// InitialBackoff·2^(n-1))], never above MaxBackoff, and the retries stop at
// MaxElapsed, the last wait cut to what is left of it.
func TestBackoffFullJitter(t *testing.T) {
	fc := &fakeClock{now: time.Unix(0, 0)}
	s := &Session{cfg: SessionConfig{Job: "b", Retry: RetryPolicy{MaxAttempts: 100, MaxElapsed: 5 * time.Second,
		InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}}, clock: fc.clock()}
	s.stat.retries = map[string]int64{}
	s.log = slog.New(slog.DiscardHandler)
	for n, want := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 4: 800 * time.Millisecond, 5: time.Second, 30: time.Second} {
		require.Equal(t, want, s.backoff(n), "attempt %d at the top of its range", n)
	}
	var events []RetryEvent
	s.cfg.OnRetryFunc = func(e RetryEvent) { events = append(events, e) }
	lost := &netError{}
	calls := 0
	err := s.run(context.Background(), 1, func(context.Context, int) (commitOutcome, error) {
		calls++
		return outcomeFailed, lost
	})
	require.ErrorIs(t, err, ErrRetriesExhausted)
	var total time.Duration
	for _, d := range fc.sleeps {
		require.LessOrEqual(t, d, time.Second)
		total += d
	}
	require.Equal(t, 5*time.Second, total, "waits add up to MaxElapsed exactly")
	require.Len(t, events, calls-1)
	require.Equal(t, "connection", events[0].Class)
}

type netError struct{}

func (*netError) Error() string   { return "connection reset" }
func (*netError) Unwrap() error   { return syscall.ECONNRESET }
func (*netError) Timeout() bool   { return false }
func (*netError) Temporary() bool { return true }

// TestSchemaMigratesFromVersion1: checkpoint objects made by an older pgetl (no
// version marker, the 7-argument advance, no claim function, no table_name) are
// upgraded in place by the next session, keeping the job's checkpoint.
func TestSchemaMigratesFromVersion1(t *testing.T) {
	t.Parallel()
	db := pgtest.New(t)
	ctx := context.Background()
	sch := pgx.Identifier{db.Schema}.Sanitize()
	db.Exec(t, `CREATE TABLE `+sch+`.checkpoint (job text PRIMARY KEY, seq bigint NOT NULL DEFAULT 0, cursor text,
		rows bigint NOT NULL DEFAULT 0, rejects bigint NOT NULL DEFAULT 0, owner text, lease_until timestamptz,
		finished_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
	CREATE TABLE `+sch+`.reject (job text NOT NULL, seq bigint NOT NULL, row_index bigint NOT NULL, cursor text, sqlstate text,
		message text, column_name text, constraint_name text, row jsonb, created_at timestamptz NOT NULL DEFAULT now(),
		PRIMARY KEY (job, seq, row_index));
	CREATE FUNCTION `+sch+`.advance(p_job text, p_owner text, p_seq bigint, p_cursor text, p_rows bigint, p_rejects bigint,
		p_lease interval) RETURNS void LANGUAGE sql AS 'SELECT 1';
	INSERT INTO `+sch+`.checkpoint (job, seq, cursor, rows) VALUES ('old', 7, '700', 700)`)
	s, err := NewSession(ctx, db.Pool, SessionConfig{Job: "old", CheckpointSchema: db.Schema})
	require.NoError(t, err)
	defer s.Close(ctx)
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, Checkpoint{Job: "old", Seq: 7, Cursor: "700", Rows: 700, UpdatedAt: cp.UpdatedAt, Run: 1}, cp)
	var marker string
	require.NoError(t, db.Pool.QueryRow(ctx, "SELECT obj_description(to_regprocedure($1), 'pg_proc')",
		sch+".advance(text,text,bigint,text,bigint,bigint,interval,bigint)").Scan(&marker))
	require.Equal(t, schemaMarker, marker)
	require.Equal(t, int64(1), db.Int(t, "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'reject' AND column_name = 'table_name'", db.Schema))
	require.NoError(t, s.Tx(ctx, func(pgx.Tx) error { return nil }), "the migrated fence works")
	cp, err = s.Checkpoint(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(8), cp.Seq)
	require.False(t, errors.Is(err, ErrInDoubt))
}
