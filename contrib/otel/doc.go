// Package pgetlotel reports pgetl jobs to OpenTelemetry: a span per committed batch
// and metrics read from the session's [pgetl.Stat] and a [pgetl.Cache]'s
// [pgetl.CacheStat].
//
// A pgx tracer on the pool (otelpgx and the like) does not see pgetl's batches: a
// batch goes to the server as one message of pgetl's own. This package hooks the
// session instead, through [pgetl.SessionConfig.OnCommitFunc] and
// [pgetl.SessionConfig.OnRetryFunc]:
//
//	inst := pgetlotel.New(pgetlotel.WithTracerProvider(tp), pgetlotel.WithMeterProvider(mp))
//	cfg := pgetl.SessionConfig{Job: "products"}
//	inst.Configure(&cfg) // chains any OnCommitFunc and OnRetryFunc already set
//	s, err := pgetl.NewSession(ctx, pool, cfg)
//	// …
//	reg, err := inst.Observe(s) // the metrics read from s.Stat()
//	// …
//	defer reg.Unregister()
//
// # Spans
//
// One span "pgetl.batch" per committed batch, created when the batch commits, with
// its start set back by [pgetl.BatchResult.Duration] (first attempt to commit,
// retries included). Spans are roots: the session's hooks carry no context.
// Attributes: pgetl.job, pgetl.batch.seq, pgetl.batch.rows, pgetl.batch.rejects,
// pgetl.batch.bytes, pgetl.batch.cursor, pgetl.batch.attempts, pgetl.batch.in_doubt.
// Events, at the time they happened:
//
//   - "pgetl.retry" for each failed attempt that was retried: pgetl.retry.attempt,
//     pgetl.retry.class (as counted in [pgetl.Stat.Retries]), pgetl.retry.backoff
//     (seconds) and pgetl.retry.error.
//   - "pgetl.in_doubt" when an attempt's COMMIT was in doubt and the batch was found
//     committed (pgetl.in_doubt.outcome = "committed").
//
// Batches that fail do not get a span: the session's caller receives the error.
//
// # Metrics
//
// All carry the attribute job (plus those given [WithAttributes]). The counters are
// observable, read from [pgetl.Session.Stat] at each collection, so they equal Stat
// by construction. Names as the OpenTelemetry Prometheus exporter writes them:
//
//	pgetl.rows.committed      counter    pgetl_rows_committed_total       rows committed
//	pgetl.batches.committed   counter    pgetl_batches_committed_total    batches committed
//	pgetl.txs.committed       counter    pgetl_txs_committed_total        Session.Tx units committed
//	pgetl.bytes.committed     counter    pgetl_bytes_committed_total      encoded bytes committed
//	pgetl.rejects             counter    pgetl_rejects_total              rows rejected
//	pgetl.retries             counter    pgetl_retries_total{class}       as Stat.Retries, by class
//	pgetl.batch.duration      histogram  pgetl_batch_duration_seconds     BatchResult.Duration
//	pgetl.since_last_commit   gauge      pgetl_since_last_commit_seconds  since the last commit
//
// pgetl.retries has one series per class of [pgetl.Stat.Retries], including
// "in_doubt_committed" and "bisect_probe"; the common classes (connection,
// server_shutdown, idle_timeout, serialization, deadlock, lock_timeout, read_only,
// too_many_connections, in_doubt_committed, bisect_probe) are reported at 0 from the
// start, so that a first retry shows as an increase. pgetl.batch.duration is recorded by the
// hooks [Instrumentation.Configure] installs; the others by [Instrumentation.Observe].
//
// [Instrumentation.ObserveCache] reports a cache, with the attribute cache:
//
//	pgetl.cache.hits      counter  pgetl_cache_hits_total    lookups answered by the cache
//	pgetl.cache.misses    counter  pgetl_cache_misses_total  lookups it could not answer
//	pgetl.cache.bytes     gauge    pgetl_cache_bytes         memory of its entries
//	pgetl.cache.entries   gauge    pgetl_cache_entries       entries
package pgetlotel
