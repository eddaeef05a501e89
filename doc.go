// Package pgetl keeps long-running ETL jobs (one to several hours) healthy on
// PostgreSQL.
//
// A web request holds a database session for milliseconds; an ETL job holds one for
// hours, and then dies of idle timeouts in middleboxes, transactions left idle across
// non-database work, unbounded memory, and progress lost to one failed commit. pgetl
// makes the folk fixes automatic, correct and fast, on top of pgx:
//
//   - [ParseConfig] and [NewPool]: a [pgxpool.Pool] with ETL defaults (connection
//     lifetime and idle limits below middlebox timeouts, TCP keepalives and
//     TCP_USER_TIMEOUT on every socket, an exec mode that works behind PgBouncer).
//   - [Session] and [BatchSession]: a batch-commit loop that holds no connection and
//     no transaction while user code runs, commits each batch with its checkpoint in
//     one short transaction, retries whole batches after connection failures, and
//     resolves an ambiguous COMMIT from the checkpoint instead of guessing.
//   - [Cache]: lookups that survive commits, published only after the batch that
//     created them committed.
package pgetl
