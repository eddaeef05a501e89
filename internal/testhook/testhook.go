// Package testhook carries pgetl's fault-injection hooks to a Session through the
// context passed to NewSession, so that fault tests living in other modules (they
// need dependencies the core module must not have) can time a fault exactly without
// an exported hook in pgetl's API and without global state.
package testhook

import (
	"context"

	"github.com/jackc/pgx/v5/pgconn"
)

// BeforeCommit is called after a unit of work's statements are sent and before its
// COMMIT (Session.Tx), or before a batch's single message is written (batches), with
// the batch sequence, the attempt (from 1) and the connection.
type BeforeCommit func(ctx context.Context, seq int64, attempt int, pgConn *pgconn.PgConn)

type key struct{}

// WithBeforeCommit returns ctx carrying fn; a Session created with that context
// calls fn.
func WithBeforeCommit(ctx context.Context, fn BeforeCommit) context.Context {
	return context.WithValue(ctx, key{}, fn)
}

// BeforeCommitOf returns the hook ctx carries, or nil.
func BeforeCommitOf(ctx context.Context) BeforeCommit {
	fn, _ := ctx.Value(key{}).(BeforeCommit)
	return fn
}
