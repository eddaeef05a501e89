// Package remotebench measures pgetl over a distant link: its tests load the products
// workload (internal/workload) through the in-process Toxiproxy of
// internal/testkit/faultproxy with a round trip of 1, 10 or 50 ms added, and count
// the round trips of the calls a job makes outside its batches.
//
// BenchmarkRemote reports, for each round trip, rows/s, x_psql (the ratio to psql
// \copy of the same rows, a CSV file, over the same link) and x_copy (the ratio to pgx
// CopyFrom of all rows in one transaction over the same link), both measured in the
// same run, of BatchSession inserts at the default CommitRows and at 1,000 rows per
// commit and of an upsert (half the keys existing), each at BatchConfig.InFlight 1,
// 2, 4 and 8, and of the field report's pattern (one INSERT per row, a commit every
// 25 rows), at 10 ms only and on a few hundred rows:
//
//	go test -run '^$' -bench Remote -benchtime 1x ./remotebench
//
// PGETL_BENCH_SMALL=1 loads 10,000 rows over the 1 and 10 ms links only. TestRoundTrips
// counts request→reply turns with a counting net.Conn and fails when one is added.
//
// The package holds tests only; it is a package of the test-kit module so that
// Toxiproxy stays out of the core module's go.sum.
package remotebench
