// Package pgetl keeps long-running ETL jobs (one to several hours) healthy on
// PostgreSQL.
//
// A web request holds a database session for milliseconds; an ETL job holds one for
// hours, and then dies of idle timeouts in middleboxes, transactions left idle across
// non-database work, unbounded memory, and progress lost to one failed commit. pgetl
// makes the folk fixes automatic, correct and fast, on top of pgx. Users keep pgx's
// own types ([pgxpool.Pool], [pgx.Tx], [pgconn.PgError]) for everything pgetl does
// not change.
//
// # Connections
//
// [ParseConfig] and [NewPool] return a [pgxpool.Pool] with ETL defaults: connection
// lifetime and idle limits below middlebox timeouts, TCP keepalives and
// TCP_USER_TIMEOUT on every socket ([Keepalive]), libpq's keepalive keys accepted in
// the connection string, and an exec mode that works behind PgBouncer in transaction
// mode (key pgetl_pooler=pgbouncer).
//
// # Batches
//
// A [Session] runs one named job. Its [BatchSession] encodes rows into the binary COPY
// format as [BatchSession.Add] receives them and commits them in batches (by rows,
// bytes, or at least every [BatchConfig.CommitInterval]). Each batch acquires a
// connection, runs one transaction and releases the connection; the transaction is
// sent in one round trip: BEGIN, the guards (SET LOCAL idle_in_transaction_session_timeout,
// statement_timeout, lock_timeout, application_name), the COPY statements, the
// checkpoint and COMMIT in one message with the rows behind it. Between batches the
// job holds no connection and no transaction, so it is never idle in transaction and
// the pool's lifetime and health checks apply. While a batch is in flight the caller
// fills the next one (at most one in flight; batches commit in order).
//
// [Session.Tx] runs custom work in the same guarded, retried, checkpointed
// transaction.
//
// # Exactly once
//
// Each batch's rows, rejects and checkpoint row commit in one transaction. The
// checkpoint advances only for the session that owns the job (a lease, renewed
// until [Session.Close]) and only from the previous batch, so a second writer is
// fenced ([ErrFenced]) and a replay of a batch that did commit fails instead of
// duplicating rows. Transient failures ([IsTransient]) replay the whole batch on a
// fresh connection with jittered backoff. When the connection fails after COMMIT may
// have been sent, pgetl ends the batch's backend and reads the checkpoint (waiting on
// its row lock) to learn the outcome. [Session.Checkpoint] tells a restarted job
// where to resume. A job whose source has a monotonic cursor can run again after
// [Session.Finish] with [SessionConfig.Incremental]: its next run continues after the
// last cursor ([Checkpoint.Run] counts the runs).
//
// # Bad rows
//
// A value its column cannot take is refused by Add with the row and column. A row the
// server refuses (SQLSTATE classes 22 and 23) is pinned by the COPY's CONTEXT line,
// or by bisection over prefixes, each probe in its own rolled-back transaction. By
// default the rows before it are committed and the job stops with a [*BatchError];
// with [RejectToTable] the row goes to the reject table in the batch's transaction.
//
// # Lookups
//
// [Cache] is a compact key → value map (SKU → product id) that survives commits:
// preloaded by keyset pagination, and transactional: entries created by
// [Cache.GetOrCreate] inside a transaction are published only after its COMMIT.
package pgetl
