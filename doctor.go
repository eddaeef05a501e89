package pgetl

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Backend is one server process (one client session) as pg_stat_activity shows it.
type Backend struct {
	PID             int32  // the backend's process id
	User            string // its role
	Database        string // its database
	ApplicationName string // its application_name
	ClientAddr      string // client address, "" for a Unix socket
	State           string // "idle in transaction" or "idle in transaction (aborted)"
	// StateAge is how long the backend has been in State (now - state_change): for an
	// idle-in-transaction backend, how long it has been holding its transaction
	// without running anything.
	StateAge time.Duration
	// XactStart is when its transaction began. Together with PID it identifies the
	// transaction: [TerminateBackends] ends a backend only if it is still in that
	// transaction.
	XactStart time.Time
	// XactAge is how long the transaction has been open (now - xact_start).
	XactAge time.Duration
	// Query is the last statement the backend ran (pg_stat_activity.query, at most
	// track_activity_query_size bytes): for an idle-in-transaction backend, the
	// statement that left the transaction open, not one still running.
	Query string
}

// IdleInTransaction returns the backends of the server that have been idle in
// transaction (state "idle in transaction" or "idle in transaction (aborted)") for
// longer than olderThan, longest idle first: the sessions the field reports find
// piling up, each holding its locks and snapshot (blocking vacuum) while its client
// does something else or has vanished. The calling backend is never listed. db is a
// pool, a connection or a transaction.
//
// Backends of other users are listed too, but PostgreSQL shows their query only to
// superusers and members of pg_read_all_stats; for others Query reads
// "<insufficient privilege>".
func IdleInTransaction(ctx context.Context, db Querier, olderThan time.Duration) ([]Backend, error) {
	if olderThan < 0 {
		olderThan = 0
	}
	rows, err := db.Query(ctx, `SELECT pid, coalesce(usename, ''), coalesce(datname, ''), coalesce(application_name, ''),
		coalesce(host(client_addr), ''), state,
		extract(epoch FROM now() - state_change)::float8, xact_start,
		extract(epoch FROM now() - xact_start)::float8, coalesce(query, '')
	FROM pg_stat_activity
	WHERE state IN ('idle in transaction', 'idle in transaction (aborted)')
		AND pid <> pg_backend_pid()
		AND state_change < now() - $1::float8 * interval '1 second'
	ORDER BY state_change, pid`, olderThan.Seconds())
	if err != nil {
		return nil, fmt.Errorf("pgetl: list idle-in-transaction sessions: %w", err)
	}
	var out []Backend
	for rows.Next() {
		var b Backend
		var stateAge, xactAge float64
		if err := rows.Scan(&b.PID, &b.User, &b.Database, &b.ApplicationName, &b.ClientAddr, &b.State,
			&stateAge, &b.XactStart, &xactAge, &b.Query); err != nil {
			rows.Close()
			return nil, fmt.Errorf("pgetl: list idle-in-transaction sessions: %w", err)
		}
		b.StateAge = time.Duration(stateAge * float64(time.Second))
		b.XactAge = time.Duration(xactAge * float64(time.Second))
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgetl: list idle-in-transaction sessions: %w", err)
	}
	return out, nil
}

// TerminateBackends ends the given backends with pg_terminate_backend, each only if
// it is still idle in the same transaction (same PID and XactStart, state idle in
// transaction) as when it was listed by [IdleInTransaction]: a backend that went on
// to other work since, or a PID reused by a new session, is left alone. This matters
// when an operator confirms the list minutes after it was taken. It returns the PIDs
// it signalled; their transactions roll back and the backends exit shortly after
// (pg_terminate_backend does not wait). Terminating other users' backends needs
// superuser or membership in pg_signal_backend.
//
// It takes Backends rather than bare PIDs for that check; build a Backend with PID
// and XactStart to end a backend found otherwise.
func TerminateBackends(ctx context.Context, db Querier, backends []Backend) ([]int32, error) {
	if len(backends) == 0 {
		return nil, nil
	}
	pids := make([]int32, len(backends))
	starts := make([]time.Time, len(backends))
	for i, b := range backends {
		pids[i], starts[i] = b.PID, b.XactStart
	}
	// The candidates are materialized first so that pg_terminate_backend runs only on
	// rows that passed every check (the planner may reorder the quals of one WHERE).
	rows, err := db.Query(ctx, `WITH victim AS MATERIALIZED (
			SELECT a.pid FROM pg_stat_activity a
			JOIN unnest($1::int4[], $2::timestamptz[]) AS t(pid, xact_start)
				ON a.pid = t.pid AND a.xact_start = t.xact_start
			WHERE a.state IN ('idle in transaction', 'idle in transaction (aborted)')
				AND a.pid <> pg_backend_pid())
		SELECT pid FROM victim WHERE pg_terminate_backend(pid) ORDER BY pid`, pids, starts)
	if err != nil {
		return nil, fmt.Errorf("pgetl: terminate backends: %w", err)
	}
	done, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil, fmt.Errorf("pgetl: terminate backends: %w", err)
	}
	return done, nil
}
