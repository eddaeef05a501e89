package faultsuite_test

// Soak (issue 9): a 200k-row upsert job (BatchConfig.Key on the primary key, a
// quarter of the keys already there with stale content) with bad rows rejected to
// the reject table, whose product references are resolved through a SKU cache
// (Cache.GetOrCreate in Session.Tx, one unit per 1,000 source rows), runs through a
// Toxiproxy proxy while the test injects a seeded random fault every 150–450 ms:
//
//   - reset: the next connection to carry data (either way) is closed with an RST;
//   - cut: the first connection to pass a random 1–300 kB upstream is closed there
//     (a COPY cut mid-stream);
//   - lost reply + cut: replies are dropped for 50–250 ms, then every proxied
//     connection is closed (a COMMIT whose reply is lost is in doubt);
//   - terminate: pg_terminate_backend of the job's backends in a transaction.
//
// Each fault strikes at most once (one-shot toxics), so failed attempts (retried or
// found committed in doubt) must not exceed the faults that struck. Five fixed seeds,
// each bounded to 60 s; the invariant is checked on every seed.
//
// TestFaultSoakInFlight runs the same chaos with four batches in flight and 1,000
// rows per batch (issue 17), on 40,000 rows and two seeds, and also checks the
// order: the checkpoint monitor of ordering_test.go (the cursor only moves forward
// and always matches the committed rows) and OnCommitFunc's order.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/pgetl/pgetl/internal/testkit/faultproxy"
	"github.com/stretchr/testify/require"
)

func TestFaultSoak(t *testing.T) {
	t.Parallel()
	n, seeds := int64(200_000), []uint64{1, 2, 3, 4, 5}
	if testing.Short() || os.Getenv("PGETL_BENCH_SMALL") != "" {
		n, seeds = 40_000, []uint64{1, 2}
	}
	for _, seed := range seeds {
		t.Run("seed="+strconv.FormatUint(seed, 10), func(t *testing.T) {
			soak(t, seed, n, soakConfig{commitRows: 5_000})
		})
	}
}

func TestFaultSoakInFlight(t *testing.T) {
	t.Parallel()
	for _, seed := range []uint64{41, 42} {
		t.Run("seed="+strconv.FormatUint(seed, 10), func(t *testing.T) {
			soak(t, seed, 40_000, soakConfig{inFlight: 4, commitRows: 1_000, checkOrder: true})
		})
	}
}

// soakConfig is what differs between the soak tests.
type soakConfig struct {
	inFlight   int  // BatchConfig.InFlight (0: the default)
	commitRows int  // BatchConfig.CommitRows
	checkOrder bool // run the checkpoint monitor and check OnCommitFunc's order
}

func soakSKU(i int64) string { return fmt.Sprintf("SKU-%07d", i/50) }

func soak(t *testing.T, seed uint64, n int64, sc soakConfig) {
	const chunk = 1_000
	rng := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	db := setupCache(t).db // products (id, sku UNIQUE, name)
	ctx := context.Background()
	db.Exec(t, `CREATE TABLE lines (id bigint PRIMARY KEY, product_id bigint NOT NULL REFERENCES products (id),
		qty int NOT NULL CHECK (qty >= 0), note text NOT NULL)`)
	db.Exec(t, `INSERT INTO products (sku) VALUES ('SKU-stale')`)

	// Bad rows: a CHECK and a NOT NULL violation (found by the merge, so isolated by
	// bisection) and a value that does not encode (rejected by Add).
	bad := map[int64]string{}
	for len(bad) < 12 {
		bad[1+rng.Int64N(n)] = []string{"check", "not_null", "type"}[len(bad)%3]
	}
	var badRows []int64
	for i := range bad {
		badRows = append(badRows, i)
	}
	sort.Slice(badRows, func(a, b int) bool { return badRows[a] < badRows[b] })
	db.Exec(t, `INSERT INTO lines SELECT i, (SELECT id FROM products WHERE sku = 'SKU-stale'), 0, 'stale'
		FROM generate_series(4, $1::bigint, 4) i WHERE i <> ALL ($2::bigint[])`, n, badRows)

	px := faultproxy.NewProxy(t, faults.TCPAddr(t, db.URL))
	pool := faultPool(t, px.URL(db.URL))
	job := "soak-" + strconv.FormatUint(seed, 10)
	if sc.inFlight > 0 {
		job = fmt.Sprintf("soak-k%d-%d", sc.inFlight, seed)
	}
	s, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: job, CheckpointSchema: db.Schema,
		Retry: pgetl.RetryPolicy{MaxAttempts: 20, MaxElapsed: 30 * time.Second, InitialBackoff: 20 * time.Millisecond, MaxBackoff: 300 * time.Millisecond}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	cache := newCache[string](t, pgetl.CacheConfig{})
	products := pgetl.Lookup{Table: "products", Key: "sku", Value: "id"}
	sampler := faults.SampleActivity(t, db.URL, "pgetl "+job+"#", 20*time.Millisecond)
	var order commitOrder
	var mon *cpMonitor
	if sc.checkOrder {
		// The rows committed are the fresh ones: the stale rows are those not loaded yet.
		mon = startMonitor(t, db.URL, db.Schema, job,
			"SELECT count(*), coalesce(sum(id), 0)::bigint, coalesce(max(id), 0) FROM lines WHERE note <> 'stale'", badRows)
	}

	jctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	start := time.Now()
	res := goJob(func() error {
		b, err := s.Batch(jctx, pgetl.BatchConfig{Table: "lines", Columns: []string{"id", "product_id", "qty", "note"},
			Key: []string{"id"}, CommitRows: sc.commitRows, Rejects: pgetl.RejectToTable, InFlight: sc.inFlight,
			OnCommitFunc: order.onCommit})
		if err != nil {
			return err
		}
		defer b.Close(jctx)
		for from := int64(1); from <= n; from += chunk {
			to := min(from+chunk-1, n)
			keys := make([]string, 0, to-from+1)
			for i := from; i <= to; i++ {
				keys = append(keys, soakSKU(i))
			}
			var ids []int64
			if err := s.Tx(jctx, func(tx pgx.Tx) error {
				var err error
				ids, err = cache.GetOrCreate(jctx, tx, products, keys)
				return err
			}); err != nil {
				return fmt.Errorf("rows %d-%d: resolve SKUs: %w", from, to, err)
			}
			for i := from; i <= to; i++ {
				row := []any{i, ids[i-from], int32(i % 1000), "n" + strconv.FormatInt(i, 10)}
				switch bad[i] {
				case "check":
					row[2] = int32(-1)
				case "not_null":
					row[3] = nil
				case "type":
					row[2] = "many"
				}
				if err := b.Add(jctx, strconv.FormatInt(i, 10), row...); err != nil {
					return fmt.Errorf("row %d: %w", i, err)
				}
			}
		}
		return b.Close(jctx)
	})

	// The faults, from this goroutine, until the job ends.
	injected := map[string]int{}
	tried := 0
	var jobErr error
	pending, pendingKind := "", "" // the one-shot toxic in force, and its kind
	settle := func() {
		if pending != "" {
			if px.Fired(pending) {
				injected[pendingKind]++
			}
			px.Remove(t, pending)
			pending = ""
		}
	}
loop:
	for tried < 400 {
		select {
		case jobErr = <-res:
			break loop
		case <-time.After(time.Duration(150+rng.IntN(300)) * time.Millisecond):
		}
		settle()
		tried++
		switch kind := rng.IntN(4); kind {
		case 0: // reset
			dir := []faultproxy.Direction{faultproxy.Upstream, faultproxy.Downstream}[rng.IntN(2)]
			pending, pendingKind = px.CutOnce(t, dir, 0, true), "reset"
		case 1: // cut
			pending, pendingKind = px.CutOnce(t, faultproxy.Upstream, 1000+rng.Int64N(300_000), false), "cut"
		case 2: // lost reply + cut
			name := px.LoseReplies(t)
			time.Sleep(time.Duration(50+rng.IntN(200)) * time.Millisecond) // the fault's duration
			px.Remove(t, name)
			injected["lost_reply"]++
		case 3: // terminate
			k := db.Int(t, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE $1`, "pgetl "+job+"#%")
			injected["terminate"] += int(k)
		}
	}
	if tried >= 400 {
		jobErr = waitJob(t, res, 60*time.Second)
	}
	// A one-shot toxic still armed when the job ended struck nothing of it.
	if pending != "" && px.Fired(pending) {
		injected[pendingKind]++
	}
	elapsed := time.Since(start)
	sampler.Stop()
	st := s.Stat()
	var total int
	for _, v := range injected {
		total += v
	}
	t.Logf("seed %d: %v; faults injected %d %v (of %d tried); failed attempts %d: retries %v; bisect probes %d; cache %+v",
		seed, elapsed.Round(time.Millisecond), total, injected, tried, failedAttempts(st), st.Retries(), st.Retries()["bisect_probe"], cache.Stat())
	// No wall-clock bound here (issue 13 item 9): the job runs under its own
	// context's deadline, so a hang fails as jobErr.
	require.NoError(t, jobErr, "seed %d", seed)

	// The invariant.
	var cnt, sum, distinct, wrong int64
	require.NoError(t, db.Pool.QueryRow(ctx, `SELECT count(*), coalesce(sum(id), 0)::bigint, count(DISTINCT id) FROM lines`).Scan(&cnt, &sum, &distinct))
	wantSum := n * (n + 1) / 2
	for _, i := range badRows {
		wantSum -= i
	}
	want := n - int64(len(badRows))
	require.Equal(t, want, cnt, "rows")
	require.Equal(t, want, distinct, "distinct rows")
	require.Equal(t, wantSum, sum, "sum of ids")
	require.NoError(t, db.Pool.QueryRow(ctx, `SELECT count(*) FROM lines l JOIN products p ON p.id = l.product_id
		WHERE p.sku <> 'SKU-' || lpad((l.id / 50)::text, 7, '0') OR l.qty <> l.id % 1000 OR l.note <> 'n' || l.id`).Scan(&wrong))
	require.Zero(t, wrong, "rows whose content differs from the source (stale or wrong product)")
	require.Equal(t, n/50+2, db.Int(t, "SELECT count(*) FROM products"), "each SKU created once")
	requireCheckpoint(t, db.Pool, db.Schema, job, strconv.FormatInt(n, 10), want, int64(len(badRows)))
	requireRejects(t, db.Pool, db.Schema, job, badRows)
	for k, id := range (&cacheBundle{db: db}).tableMap(t) {
		if v, ok := cache.Get(k); ok {
			require.Equal(t, id, v, "cached id of %s", k)
		} else {
			require.Equal(t, "SKU-stale", k, "committed SKU %s not cached", k)
		}
	}
	require.Zero(t, cache.Stat().StagedTransactions())
	requireNoIdleInTx(t, sampler, 500*time.Millisecond)
	// A reset, a cut and a terminated backend strike one attempt each; a lost-reply
	// episode cuts every connection, so it can strike each batch in flight and the
	// Tx unit resolving SKUs at the time: up to InFlight + 1 attempts.
	k := sc.inFlight
	if k == 0 {
		k = pgetl.InFlightDefault
	}
	struck := total + injected["lost_reply"]*k
	require.LessOrEqual(t, failedAttempts(st), int64(struck), "failed attempts ≤ attempts the faults injected can strike")
	require.Positive(t, total, "faults struck")
	if sc.checkOrder {
		cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
		require.NoError(t, err)
		require.Equal(t, cp.Seq, mon.require(t, 5).seq, "the monitor's last sample is the final checkpoint")
		order.require(t, cp.Seq)
	}
}
