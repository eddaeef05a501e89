package faultsuite_test

// In-doubt COMMIT (issue 5, DESIGN §1.4): a Toxiproxy proxy between the job and the
// server loses, from the moment a chosen batch's attempt 1 is about to write its
// single message (the beforeCommit hook, installed with internal/testhook), either every reply (the batch commits on
// the server, the client never hears so) or every request (the batch never reaches
// the server). The client notices when the test removes the toxic, which closes the
// proxied connections (pgx then reports "unexpected EOF" for a message it sent).
// The reply-lost toxic is removed only once the test has seen, on a direct
// connection, that the batch committed, so the client's failure comes strictly after
// its COMMIT: the batch must be found committed and not replayed. The request-lost
// toxic is removed after 300 ms in which the test checks that the server never saw
// the batch: the batch must be replayed, once.

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/pgetl/pgetl/internal/testhook"
	"github.com/pgetl/pgetl/internal/testkit/faultproxy"
	"github.com/stretchr/testify/require"
)

func TestFaultInDoubtBatch(t *testing.T) {
	t.Parallel()
	for _, lost := range []string{"reply", "request"} {
		t.Run(lost, func(t *testing.T) {
			t.Parallel()
			const n, commitRows, target = 20_000, 2_000, 4
			bd := setupItems(t)
			ctx := context.Background()
			px := faultproxy.NewProxy(t, faults.TCPAddr(t, bd.db.URL))
			pool := faultPool(t, px.URL(bd.db.URL))
			job := "indoubt-" + lost
			tr := newTrigger(t)
			var attempts atomic.Int64
			hooked := testhook.WithBeforeCommit(ctx, func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
				attempts.Add(1)
				if seq == target && attempt == 1 {
					tr.pull(seq)
				}
			})
			s, err := pgetl.NewSession(hooked, pool, pgetl.SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
				Retry: pgetl.RetryPolicy{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}})
			require.NoError(t, err)
			t.Cleanup(func() { _ = s.Close(context.Background()) })
			sampler := faults.SampleActivity(t, bd.db.URL, "pgetl "+job+"#", 10*time.Millisecond)

			res := goJob(func() error {
				// One batch in flight: the toxic must strike only the batch under test
				// (batches in flight are covered by TestBatchSetInFlightUnderFaults and
				// the products kill test).
				return loadJob(ctx, s, pgetl.BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: commitRows, CommitInterval: -1,
					InFlight: 1}, 1, n, nil)
			})
			tr.wait(t, res, 30*time.Second)
			var toxic string
			if lost == "reply" {
				toxic = px.LoseReplies(t)
			} else {
				toxic = px.LoseRequests(t)
			}
			armed := time.Now()
			tr.release()
			if lost == "reply" {
				// The batch commits on the server; its reply is lost.
				require.True(t, poll(t, 10*time.Second, func() bool {
					cp, err := pgetl.ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, job)
					return err == nil && cp.Seq >= target
				}), "batch %d did not commit on the server", target)
				t.Logf("batch %d committed on the server %v after the toxic was armed; its reply is lost", target, time.Since(armed).Round(time.Millisecond))
			} else {
				time.Sleep(300 * time.Millisecond) // the fault's duration
				cp, err := pgetl.ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, job)
				require.NoError(t, err)
				require.Equal(t, int64(target-1), cp.Seq, "the lost request must not have reached the server")
				// The batch's transaction is "pgetl <job>#<seq>.<session owner token>".
				require.Zero(t, bd.db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1",
					"pgetl "+job+"#"+strconv.Itoa(target)+".%"))
			}
			cut := time.Now()
			px.Remove(t, toxic) // closes every proxied connection
			require.NoError(t, waitJob(t, res, 60*time.Second))
			t.Logf("job done %v after the connections were cut; attempts %d, retries %v", time.Since(cut).Round(time.Millisecond), attempts.Load(), s.Stat().Retries())
			sampler.Stop()

			bd.requireExactly(t, n)
			requireCheckpoint(t, bd.db.Pool, bd.db.Schema, job, strconv.Itoa(n), n, 0)
			requireRejects(t, bd.db.Pool, bd.db.Schema, job, nil)
			requireNoIdleInTx(t, sampler, 0)
			st := s.Stat()
			batches := int64(n / commitRows)
			if lost == "reply" {
				require.Equal(t, int64(1), st.Retries()["in_doubt_committed"], "the batch was found committed: %v", st.Retries())
				require.Zero(t, st.TotalRetries(), "nothing replayed: %v", st.Retries())
				require.Equal(t, batches, attempts.Load(), "one attempt per batch")
			} else {
				require.Zero(t, st.Retries()["in_doubt_committed"], "%v", st.Retries())
				require.Equal(t, int64(1), st.TotalRetries(), "replayed exactly once: %v", st.Retries())
				require.Equal(t, batches+1, attempts.Load(), "one replay")
			}
			require.LessOrEqual(t, failedAttempts(st), int64(1), "failed attempts ≤ faults injected")
		})
	}
}

// TestFaultInDoubtTx: the same two faults around the COMMIT of Session.Tx units that
// resolve SKUs with the cache (GetOrCreate) and insert order lines. A COMMIT found
// committed publishes the unit's cache entries and does not run fn again; a lost
// COMMIT request runs fn again, and the first attempt's staged entries never reach
// the cache.
func TestFaultInDoubtTx(t *testing.T) {
	t.Parallel()
	for _, lost := range []string{"reply", "request"} {
		t.Run(lost, func(t *testing.T) {
			t.Parallel()
			const units, perUnit, target = 6, 50, 3
			cb := setupCache(t)
			ctx := context.Background()
			px := faultproxy.NewProxy(t, faults.TCPAddr(t, cb.db.URL))
			pool := faultPool(t, px.URL(cb.db.URL))
			cache := newCache[string](t, pgetl.CacheConfig{})
			job := "indoubt-tx-" + lost
			tr := newTrigger(t)
			hooked := testhook.WithBeforeCommit(ctx, func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
				if seq == target && attempt == 1 {
					tr.pull(seq)
				}
			})
			s, err := pgetl.NewSession(hooked, pool, pgetl.SessionConfig{Job: job, CheckpointSchema: cb.db.Schema,
				Retry: pgetl.RetryPolicy{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}})
			require.NoError(t, err)
			t.Cleanup(func() { _ = s.Close(context.Background()) })

			calls := make([]atomic.Int64, units+1)
			res := goJob(func() error {
				for u := 1; u <= units; u++ {
					// Each unit has 10 SKUs of the previous unit and 40 new ones.
					keys := skus((u-1)*40, (u-1)*40+perUnit)
					err := s.Tx(ctx, func(tx pgx.Tx) error {
						calls[u].Add(1)
						if calls[u].Load() > 1 {
							for _, k := range keys[10:] {
								if _, ok := cache.Get(k); ok {
									return fmt.Errorf("unit %d: key %s of a failed attempt is in the cache", u, k)
								}
							}
						}
						ids, err := cache.GetOrCreate(ctx, tx, cb.products, keys)
						if err != nil {
							return err
						}
						_, err = tx.CopyFrom(ctx, pgx.Identifier{"order_lines"}, []string{"product_id", "qty"},
							pgx.CopyFromSlice(len(ids), func(i int) ([]any, error) { return []any{ids[i], u}, nil }))
						return err
					})
					if err != nil {
						return fmt.Errorf("unit %d: %w", u, err)
					}
				}
				return nil
			})
			tr.wait(t, res, 30*time.Second)
			var toxic string
			if lost == "reply" {
				toxic = px.LoseReplies(t)
			} else {
				toxic = px.LoseRequests(t)
			}
			tr.release()
			if lost == "reply" {
				require.True(t, poll(t, 10*time.Second, func() bool {
					cp, err := pgetl.ReadCheckpoint(ctx, cb.db.Pool, cb.db.Schema, job)
					return err == nil && cp.Seq >= target
				}), "unit %d did not commit on the server", target)
			} else {
				time.Sleep(300 * time.Millisecond) // the fault's duration
				cp, err := pgetl.ReadCheckpoint(ctx, cb.db.Pool, cb.db.Schema, job)
				require.NoError(t, err)
				require.Equal(t, int64(target-1), cp.Seq, "the lost COMMIT must not have reached the server")
			}
			px.Remove(t, toxic)
			require.NoError(t, waitJob(t, res, 60*time.Second))

			st := s.Stat()
			t.Logf("retries %v", st.Retries())
			if lost == "reply" {
				require.Equal(t, int64(1), calls[target].Load(), "fn of the committed unit did not run again")
				require.Equal(t, int64(1), st.Retries()["in_doubt_committed"], "%v", st.Retries())
				require.Zero(t, st.TotalRetries(), "%v", st.Retries())
			} else {
				require.Equal(t, int64(2), calls[target].Load(), "fn of the lost unit ran again, once")
				require.Zero(t, st.Retries()["in_doubt_committed"], "%v", st.Retries())
				require.Equal(t, int64(1), st.TotalRetries(), "%v", st.Retries())
			}
			nkeys := int64((units-1)*40 + perUnit)
			require.Equal(t, nkeys, cb.db.Int(t, "SELECT count(*) FROM products"))
			require.Equal(t, int64(units*perUnit), cb.db.Int(t, "SELECT count(*) FROM order_lines"), "each unit's lines once")
			require.Equal(t, int64(perUnit), cb.db.Int(t, "SELECT count(*) FROM order_lines WHERE qty = $1", target))
			for k, id := range cb.tableMap(t) {
				v, ok := cache.Get(k)
				require.True(t, ok, "key %s committed but not cached", k)
				require.Equal(t, id, v, k)
			}
			require.Zero(t, cache.Stat().StagedTransactions())
			cp, err := pgetl.ReadCheckpoint(ctx, cb.db.Pool, cb.db.Schema, job)
			require.NoError(t, err)
			require.Equal(t, int64(units), cp.Seq)
		})
	}
}
