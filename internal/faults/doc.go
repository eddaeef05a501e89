// Package faults is the fault kit of pgetl's fault-injection tests: real faults
// against real servers, each started on loopback and stopped by PID in t.Cleanup.
//
//   - Cluster: a throwaway PostgreSQL cluster (initdb + pg_ctl as the postgres user on
//     a free loopback port) to restart, stop, crash or set read-only.
//   - PgBouncer: a PgBouncer in transaction mode in front of a server, restartable with
//     SIGTERM (immediate) or SIGINT (safe: waits for transactions to end).
//   - RunInNetNS, InNetNS and Cluster.BlackHole: a test re-executes itself inside a
//     private network namespace where iptables DROP rules black-hole a cluster's port
//     without touching the host's network.
//   - Sampler: records every moment a backend of an application_name prefix is idle
//     in transaction.
//
// The Toxiproxy-based Proxy (resets, cuts, lost replies or requests, latency,
// refused connections) is in internal/testkit/faultproxy, in the test-kit module, so
// that Toxiproxy stays out of the core module's dependencies; TCPAddr gives it its
// upstream.
//
// Helpers that need root, a binary or a server that is missing call
// pgtest.Unavailable: the test fails under CI=true and skips otherwise.
//
// What a pgx v5 client sees (measured by this package's tests on Debian 12,
// PostgreSQL 15, PgBouncer 1.18):
//   - Cluster.Restart: 57P01 admin_shutdown on existing sessions (≈0.2–0.3 s).
//   - Cluster.CrashBackend: every session of the cluster is cut ("conn closed" on
//     the next use); ready again ≈0.1–0.2 s after the SIGKILL.
//   - Cluster.SetReadOnly: 25006 read_only_sql_transaction on the next write.
//   - Cluster.BlackHole with TCP_USER_TIMEOUT 3 s on the client socket: the query
//     fails with io.ErrUnexpectedEOF (pgx does not keep the ETIMEDOUT) ≈3.4 s after
//     it was sent.
package faults
