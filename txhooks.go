package pgetl

import "github.com/jackc/pgx/v5"

// commitHooks is implemented by the pgx.Tx that [Session.Tx] hands to its function
// (and by the transaction of a batch flush). Code that stages state for a transaction
// (the [Cache]) registers what to do once the COMMIT is confirmed (publish) or once
// the transaction is known not to have committed (discard). Hooks run after the
// connection is released, in registration order, at most once; on a retry the
// attempt's hooks are discarded with it.
type commitHooks interface {
	pgx.Tx
	onCommit(f func())
	onRollback(f func())
}
