package pgetlotel_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pgetl/pgetl"
	pgetlotel "github.com/pgetl/pgetl/contrib/otel"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/testhook"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The test job: jobRows rows in batches of jobBatchRows; the backend of batch
// killedSeq is terminated before its attempt 1 is written, so it is retried; the row
// badRow breaks a CHECK constraint and is rejected into the reject table.
const (
	jobRows      = 1000
	jobBatchRows = 200
	killedSeq    = 3
	badRow       = 450
)

// jobRun is what a run of the test job leaves.
type jobRun struct {
	job        string
	stat       pgetl.Stat
	commits    int64 // calls of the OnCommitFunc set before Configure
	retries    int64 // calls of the OnRetryFunc set before Configure
	terminated bool  // the hook ended batch killedSeq's backend
}

// runJob runs the test job with inst's hooks and metrics; collect is called before
// the registration is unregistered and the session closed.
func runJob(t *testing.T, inst *pgetlotel.Instrumentation, collect func(r *jobRun)) *jobRun {
	t.Helper()
	ctx := context.Background()
	db := pgtest.New(t)
	db.Exec(t, `CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL CHECK (v >= 0))`)
	r := &jobRun{job: "otel-" + db.Schema}

	var terminated atomic.Bool
	hooked := testhook.WithBeforeCommit(ctx, func(ctx context.Context, seq int64, attempt int, pgConn *pgconn.PgConn) {
		if seq != killedSeq || attempt != 1 {
			return
		}
		// Wait (up to 5 s) for the backend to exit, so the batch's message finds it gone.
		var ok bool
		if err := db.Pool.QueryRow(ctx, `SELECT pg_terminate_backend($1, 5000)`, int(pgConn.PID())).Scan(&ok); err == nil && ok {
			terminated.Store(true)
		}
	})
	var commits, retries atomic.Int64
	cfg := pgetl.SessionConfig{
		Job:              r.job,
		CheckpointSchema: db.Schema,
		Retry:            pgetl.RetryPolicy{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond},
		OnCommitFunc:     func(pgetl.BatchResult) { commits.Add(1) },
		OnRetryFunc:      func(pgetl.RetryEvent) { retries.Add(1) },
	}
	inst.Configure(&cfg)
	s, err := pgetl.NewSession(hooked, db.Pool, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, s.Close(ctx)) }()
	reg, err := inst.Observe(s)
	require.NoError(t, err)
	defer func() { require.NoError(t, reg.Unregister()) }()

	b, err := s.Batch(ctx, pgetl.BatchConfig{Table: db.Qualified("items"), Columns: []string{"id", "v"},
		CommitRows: jobBatchRows, CommitInterval: -1, Rejects: pgetl.RejectToTable, MaxRejects: 10})
	require.NoError(t, err)
	for i := 1; i <= jobRows; i++ {
		v := i
		if i == badRow {
			v = -1
		}
		require.NoError(t, b.Add(ctx, strconv.Itoa(i), i, v))
	}
	require.NoError(t, b.Close(ctx))
	// A Session.Tx unit: counted in pgetl.txs.committed, no span.
	require.NoError(t, s.Tx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "UPDATE "+db.Ident("items")+" SET v = v WHERE id = 1")
		return err
	}))

	r.stat, r.commits, r.retries, r.terminated = s.Stat(), commits.Load(), retries.Load(), terminated.Load()
	require.True(t, r.terminated, "the hook did not terminate batch %d's backend", killedSeq)
	require.Equal(t, int64(jobRows-1), r.stat.Rows())
	require.Equal(t, int64(1), r.stat.Rejects())
	require.Equal(t, int64(jobRows/jobBatchRows), r.stat.Batches())
	require.Equal(t, int64(1), r.stat.Txs())
	require.Positive(t, r.stat.TotalRetries())
	collect(r)
	return r
}

func TestInstrumentation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	t.Cleanup(func() { require.NoError(t, tp.Shutdown(ctx)) })
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { require.NoError(t, mp.Shutdown(ctx)) })
	inst := pgetlotel.New(pgetlotel.WithTracerProvider(tp), pgetlotel.WithMeterProvider(mp),
		pgetlotel.WithAttributes(attribute.String("deployment", "test")))

	var rm metricdata.ResourceMetrics
	r := runJob(t, inst, func(*jobRun) {
		require.NoError(t, reader.Collect(ctx, &rm))
	})
	st := r.stat

	t.Run("HooksChained", func(t *testing.T) {
		require.Equal(t, st.Batches(), r.commits, "the OnCommitFunc set before Configure")
		// Stat.Retries also counts work that is no retried attempt (isolation round
		// trips, bisection probes, in-doubt resolutions): OnRetryFunc sees only retries.
		require.Positive(t, r.retries, "the OnRetryFunc set before Configure")
		require.LessOrEqual(t, r.retries, st.TotalRetries())
	})

	t.Run("Spans", func(t *testing.T) {
		spans := sr.Ended()
		require.Len(t, spans, int(st.Batches()), "one span per batch, none for the Tx unit")
		var rows, rejects, bytes, retryEvents int64
		var killed sdktrace.ReadOnlySpan
		seqs := map[int64]bool{}
		for _, sp := range spans {
			require.Equal(t, "pgetl.batch", sp.Name())
			a := attrs(sp.Attributes())
			require.Equal(t, r.job, a["pgetl.job"].AsString())
			require.Equal(t, "test", a["deployment"].AsString())
			seq := a["pgetl.batch.seq"].AsInt64()
			require.False(t, seqs[seq], "seq %d twice", seq)
			seqs[seq] = true
			rows += a["pgetl.batch.rows"].AsInt64()
			rejects += a["pgetl.batch.rejects"].AsInt64()
			bytes += a["pgetl.batch.bytes"].AsInt64()
			require.Contains(t, a, "pgetl.batch.cursor")
			require.False(t, a["pgetl.batch.in_doubt"].AsBool())
			require.Positive(t, a["pgetl.batch.attempts"].AsInt64())
			require.True(t, sp.EndTime().After(sp.StartTime()), "the span covers the batch's duration")
			for _, ev := range sp.Events() {
				require.Equal(t, "pgetl.retry", ev.Name)
				retryEvents++
			}
			if seq == killedSeq {
				killed = sp
			}
		}
		require.Equal(t, st.Rows(), rows, "sum of the spans' rows")
		require.Equal(t, st.Rejects(), rejects, "sum of the spans' rejects")
		require.Equal(t, st.Bytes(), bytes, "sum of the spans' bytes")
		require.Equal(t, r.retries, retryEvents, "a retry event per retried attempt (OnRetryFunc call)")

		require.NotNil(t, killed, "no span for batch %d", killedSeq)
		a := attrs(killed.Attributes())
		require.GreaterOrEqual(t, a["pgetl.batch.attempts"].AsInt64(), int64(2))
		require.NotEmpty(t, killed.Events())
		ev := killed.Events()[0]
		ea := attrs(ev.Attributes)
		require.Equal(t, int64(1), ea["pgetl.retry.attempt"].AsInt64())
		class := ea["pgetl.retry.class"].AsString()
		require.Positive(t, st.Retries()[class], "class %q is counted in Stat.Retries %v", class, st.Retries())
		require.Contains(t, ea, "pgetl.retry.backoff")
		require.NotEmpty(t, ea["pgetl.retry.error"].AsString())
		require.False(t, ev.Time.Before(killed.StartTime()), "the retry happened within the batch's span")
		require.False(t, ev.Time.After(killed.EndTime()))
	})

	t.Run("Metrics", func(t *testing.T) {
		job := attribute.String("job", r.job)
		require.Equal(t, st.Rows(), sumOf(t, rm, "pgetl.rows.committed", job))
		require.Equal(t, st.Batches(), sumOf(t, rm, "pgetl.batches.committed", job))
		require.Equal(t, st.Txs(), sumOf(t, rm, "pgetl.txs.committed", job))
		require.Equal(t, st.Bytes(), sumOf(t, rm, "pgetl.bytes.committed", job))
		require.Equal(t, st.Rejects(), sumOf(t, rm, "pgetl.rejects", job))
		require.NotEmpty(t, st.Retries())
		for class, n := range st.Retries() {
			require.Equal(t, n, sumOf(t, rm, "pgetl.retries", job, attribute.String("class", class)), "class %s", class)
		}
		require.Zero(t, st.Retries()["deadlock"])
		require.Zero(t, sumOf(t, rm, "pgetl.retries", job, attribute.String("class", "deadlock")), "a known class is reported at 0")

		h := find(t, rm, "pgetl.batch.duration")
		require.Equal(t, "s", h.Unit)
		hd := h.Data.(metricdata.Histogram[float64])
		require.Len(t, hd.DataPoints, 1)
		require.Equal(t, uint64(st.Batches()), hd.DataPoints[0].Count)
		require.Positive(t, hd.DataPoints[0].Sum)
		require.LessOrEqual(t, hd.DataPoints[0].Sum, st.FlushDuration().Seconds()+0.001, "the batches' durations are within the session's flush time")
		requireAttrs(t, hd.DataPoints[0].Attributes, job)

		g := find(t, rm, "pgetl.since_last_commit")
		require.Equal(t, "s", g.Unit)
		gd := g.Data.(metricdata.Gauge[float64])
		require.Len(t, gd.DataPoints, 1)
		require.GreaterOrEqual(t, gd.DataPoints[0].Value, 0.0)
		require.Less(t, gd.DataPoints[0].Value, 5.0, "the job just committed")
	})

	t.Run("Unregistered", func(t *testing.T) {
		var after metricdata.ResourceMetrics
		require.NoError(t, reader.Collect(ctx, &after))
		for _, sm := range after.ScopeMetrics {
			for _, m := range sm.Metrics {
				if m.Name == "pgetl.rows.committed" {
					require.Empty(t, m.Data.(metricdata.Sum[int64]).DataPoints, "the session's metrics after Unregister")
				}
			}
		}
	})
}

// TestCache checks the cache metrics against CacheStat.
func TestCache(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { require.NoError(t, mp.Shutdown(ctx)) })
	inst := pgetlotel.New(pgetlotel.WithMeterProvider(mp))

	c, err := pgetl.NewCache[string, int64](pgetl.CacheConfig{})
	require.NoError(t, err)
	for i := range 100 {
		c.Put(fmt.Sprintf("SKU-%04d", i), int64(i))
	}
	for i := range 150 {
		c.Get(fmt.Sprintf("SKU-%04d", i))
	}
	reg, err := inst.ObserveCache("sku", c)
	require.NoError(t, err)
	defer func() { require.NoError(t, reg.Unregister()) }()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(ctx, &rm))
	st := c.Stat()
	require.Equal(t, int64(100), st.Hits())
	require.Equal(t, int64(50), st.Misses())
	name := attribute.String("cache", "sku")
	require.Equal(t, st.Hits(), sumOf(t, rm, "pgetl.cache.hits", name))
	require.Equal(t, st.Misses(), sumOf(t, rm, "pgetl.cache.misses", name))
	require.Equal(t, st.Bytes(), gaugeOf(t, rm, "pgetl.cache.bytes", name))
	require.Positive(t, st.Bytes())
	require.Equal(t, st.Len(), gaugeOf(t, rm, "pgetl.cache.entries", name))

	_, err = inst.ObserveCache("nil", nil)
	require.Error(t, err)
	_, err = inst.Observe(nil)
	require.Error(t, err)
}

// TestHooks drives the hooks Configure installs directly, for outcomes a test
// server does not produce on demand: an in-doubt commit found committed, and more
// retries than a span keeps.
func TestHooks(t *testing.T) {
	t.Parallel()
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	t.Cleanup(func() { require.NoError(t, tp.Shutdown(context.Background())) })
	inst := pgetlotel.New(pgetlotel.WithTracerProvider(tp))
	var cfg pgetl.SessionConfig
	inst.Configure(&cfg)

	// Retries of unit 1 (a Tx unit: no span) are dropped when batch 2 commits.
	cfg.OnRetryFunc(pgetl.RetryEvent{Job: "j", Seq: 1, Attempt: 1, Class: "connection", Err: errors.New("tx unit")})
	for n := 1; n <= 40; n++ {
		cfg.OnRetryFunc(pgetl.RetryEvent{Job: "j", Seq: 2, Attempt: n, Class: "connection", Backoff: time.Millisecond, Err: errors.New("lost")})
	}
	cfg.OnRetryFunc(pgetl.RetryEvent{Job: "other", Seq: 2, Attempt: 1, Class: "deadlock", Err: errors.New("other job")})
	cfg.OnCommitFunc(pgetl.BatchResult{Job: "j", Seq: 2, Rows: 10, Duration: time.Second, Attempts: 41, InDoubt: true})

	spans := sr.Ended()
	require.Len(t, spans, 1)
	sp := spans[0]
	require.InDelta(t, time.Second, sp.EndTime().Sub(sp.StartTime()), float64(time.Millisecond), "start = end - Duration")
	a := attrs(sp.Attributes())
	require.True(t, a["pgetl.batch.in_doubt"].AsBool())
	require.Equal(t, int64(8), a["pgetl.batch.retry_events_dropped"].AsInt64())
	evs := sp.Events()
	require.Len(t, evs, 33, "32 retries kept, then the in-doubt outcome")
	for i, ev := range evs[:32] {
		require.Equal(t, "pgetl.retry", ev.Name)
		ea := attrs(ev.Attributes)
		require.Equal(t, int64(i+1), ea["pgetl.retry.attempt"].AsInt64())
		require.Equal(t, "lost", ea["pgetl.retry.error"].AsString())
	}
	require.Equal(t, "pgetl.in_doubt", evs[32].Name)
	require.Equal(t, "committed", attrs(evs[32].Attributes)["pgetl.in_doubt.outcome"].AsString())

	// The other job's retry is still waiting for its batch.
	cfg.OnCommitFunc(pgetl.BatchResult{Job: "other", Seq: 2, Rows: 1, Attempts: 2})
	spans = sr.Ended()
	require.Len(t, spans, 2)
	require.Len(t, spans[1].Events(), 1)
	require.Equal(t, "other job", attrs(spans[1].Events()[0].Attributes)["pgetl.retry.error"].AsString())
}

func attrs(kvs []attribute.KeyValue) map[string]attribute.Value {
	m := map[string]attribute.Value{}
	for _, kv := range kvs {
		m[string(kv.Key)] = kv.Value
	}
	return m
}

func requireAttrs(t *testing.T, set attribute.Set, want ...attribute.KeyValue) {
	t.Helper()
	for _, kv := range want {
		v, ok := set.Value(kv.Key)
		require.True(t, ok, "attribute %s missing from %v", kv.Key, set.ToSlice())
		require.Equal(t, kv.Value, v, "attribute %s", kv.Key)
	}
}

func find(t *testing.T, rm metricdata.ResourceMetrics, name string) metricdata.Metrics {
	t.Helper()
	for _, sm := range rm.ScopeMetrics {
		require.Equal(t, pgetlotel.ScopeName, sm.Scope.Name)
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m
			}
		}
	}
	t.Fatalf("metric %s not collected", name)
	return metricdata.Metrics{}
}

// sumOf returns the value of the cumulative, monotonic counter name's point that has
// the attributes want.
func sumOf(t *testing.T, rm metricdata.ResourceMetrics, name string, want ...attribute.KeyValue) int64 {
	t.Helper()
	sum, ok := find(t, rm, name).Data.(metricdata.Sum[int64])
	require.True(t, ok, "%s is not an int64 sum", name)
	require.True(t, sum.IsMonotonic, "%s is not a counter", name)
	require.Equal(t, metricdata.CumulativeTemporality, sum.Temporality)
	return pointOf(t, name, sum.DataPoints, want)
}

func gaugeOf(t *testing.T, rm metricdata.ResourceMetrics, name string, want ...attribute.KeyValue) int64 {
	t.Helper()
	g, ok := find(t, rm, name).Data.(metricdata.Gauge[int64])
	require.True(t, ok, "%s is not an int64 gauge", name)
	return pointOf(t, name, g.DataPoints, want)
}

func pointOf(t *testing.T, name string, points []metricdata.DataPoint[int64], want []attribute.KeyValue) int64 {
	t.Helper()
	for _, p := range points {
		match := true
		for _, kv := range want {
			if v, ok := p.Attributes.Value(kv.Key); !ok || v != kv.Value {
				match = false
			}
		}
		if match {
			return p.Value
		}
	}
	t.Fatalf("%s: no point with %v", name, want)
	return 0
}
