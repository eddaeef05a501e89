package pgetl

import (
	"context"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// recTracer is a pgx.QueryTracer that records every query's SQL and its end.
type recTracer struct {
	mu    sync.Mutex
	spans []*recSpan
}

type recSpan struct {
	sql   string
	ended bool
	tag   string
	err   error
}

type recSpanKey struct{}

func (r *recTracer) TraceQueryStart(ctx context.Context, conn *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if conn == nil {
		panic("TraceQueryStart without a connection")
	}
	sp := &recSpan{sql: d.SQL}
	r.mu.Lock()
	r.spans = append(r.spans, sp)
	r.mu.Unlock()
	return context.WithValue(ctx, recSpanKey{}, sp)
}

func (r *recTracer) TraceQueryEnd(ctx context.Context, conn *pgx.Conn, d pgx.TraceQueryEndData) {
	if conn == nil {
		panic("TraceQueryEnd without a connection")
	}
	sp := ctx.Value(recSpanKey{}).(*recSpan)
	r.mu.Lock()
	defer r.mu.Unlock()
	if sp.ended {
		panic("span ended twice: " + sp.sql)
	}
	sp.ended, sp.tag, sp.err = true, d.CommandTag.String(), d.Err
}

// pgetl returns pgetl's own spans (their SQL starts with "-- pgetl").
func (r *recTracer) pgetl() []recSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []recSpan
	for _, sp := range r.spans {
		if strings.HasPrefix(sp.sql, "-- pgetl ") {
			out = append(out, *sp)
		}
	}
	return out
}

// TestQueryTracerSeesBatches: a pgx.QueryTracer set on the pool sees every batch
// commit (which pgetl sends on its own, past pgx's query methods), each Tx call,
// retries (the failed attempt ends with its error, the next one names the class it
// retries) and an in-doubt resolution, each with a descriptive comment as its SQL
// and the final command tag.
func TestQueryTracerSeesBatches(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	rec := &recTracer{}
	g := newGate()
	pool := faultPool(t, bd.db.URL, func(c *pgxpool.Config) {
		c.ConnConfig.Tracer = rec
		c.MaxConns = 1
		dial := c.ConnConfig.DialFunc
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &gatedConn{Conn: conn, g: g}, nil
		}
	})
	const job = "trace"
	var armed sync.Once
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: bd.db.Schema,
		Retry: RetryPolicy{InitialBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond},
		beforeCommit: func(_ context.Context, seq int64, attempt int, pgc *pgconn.PgConn) {
			switch {
			case seq == 2 && attempt == 1:
				_ = pgc.Conn().Close() // a lost connection: in doubt, resolved, retried
			case seq == 5 && attempt == 1:
				armed.Do(func() { g.arm(pgc) }) // the reply is lost: in doubt
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })

	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 100, CommitInterval: -1, InFlight: 1})
	require.NoError(t, err)
	for i := int64(1); i <= 300; i++ {
		if i == 150 {
			require.NoError(t, b.Reject(ctx, "150", "refused by the caller"))
			continue
		}
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), itemRow(i)...))
	}
	require.NoError(t, b.Flush(ctx))
	require.NoError(t, s.Tx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO "+bd.table+" VALUES ($1, $2, $3, $4, $5)", itemRow(301)...)
		return err
	}))
	// Batch 4 commits on the server but its reply never comes; cut the connection
	// once it did commit: resolution finds it committed.
	done := goJob(func() error {
		if err := b.Add(ctx, "302", itemRow(302)...); err != nil {
			return err
		}
		return b.Close(ctx)
	})
	require.True(t, poll(t, 20*time.Second, func() bool {
		cp, err := ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, job)
		return err == nil && cp.Seq >= 5
	}), "batch 5 did not commit")
	close(g.cut)
	require.NoError(t, waitJob(t, done, 60*time.Second))
	bd.requireExactly(t, 302, 150)

	q := `job="trace"`
	want := []struct {
		sql, tag string
		failed   bool
	}{
		{"-- pgetl batch " + q + " seq=1 attempt=1 rows=100 rejects=0", "COMMIT", false},
		{"-- pgetl batch " + q + " seq=2 attempt=1 rows=99 rejects=1", "", true},
		// The connection failed with the message maybe sent: in doubt, resolved.
		{"-- pgetl resolve in-doubt " + q + " seq=2", "not committed", false},
		{"-- pgetl batch " + q + " seq=2 attempt=2 retry_of=connection rows=99 rejects=1", "COMMIT", false},
		{"-- pgetl batch " + q + " seq=3 attempt=1 rows=100 rejects=0", "COMMIT", false},
		{"-- pgetl tx " + q + " seq=4 attempt=1", "COMMIT", false},
		{"-- pgetl batch " + q + " seq=5 attempt=1 rows=1 rejects=0", "", true},
		{"-- pgetl resolve in-doubt " + q + " seq=5", "committed", false},
	}
	got := rec.pgetl()
	for i, sp := range got {
		t.Logf("%d: %s → %q %v", i, sp.sql, sp.tag, sp.err)
	}
	require.Len(t, got, len(want))
	for i, w := range want {
		require.Equal(t, w.sql, got[i].sql, "span %d", i)
		require.True(t, got[i].ended, "span %d ended", i)
		require.Equal(t, w.tag, got[i].tag, "span %d", i)
		require.Equal(t, w.failed, got[i].err != nil, "span %d: %v", i, got[i].err)
	}
	require.Equal(t, int64(1), s.Stat().Retries()["in_doubt_committed"])
}

// TestQueryTracerSeesSetsAndIsolation: a BatchSet's batches and the isolation of a
// batch's bad rows are traced too.
func TestQueryTracerSeesSetsAndIsolation(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	rec := &recTracer{}
	pool := faultPool(t, bd.db.URL, func(c *pgxpool.Config) { c.ConnConfig.Tracer = rec })
	s, err := NewSession(ctx, pool, SessionConfig{Job: "trace-set", CheckpointSchema: bd.db.Schema})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	set, err := s.Batches(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitInterval: -1})
	require.NoError(t, err)
	for i := int64(1); i <= 10; i++ {
		require.NoError(t, set.Add(ctx, strconv.FormatInt(i, 10), itemRow(i)))
	}
	require.NoError(t, set.Close(ctx))
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitInterval: -1, Rejects: RejectToTable})
	require.NoError(t, err)
	for i := int64(11); i <= 20; i++ {
		r := itemRow(i)
		if i == 15 {
			r[2] = "-1.00" // the CHECK refuses it: isolated by the server
		}
		require.NoError(t, b.Add(ctx, strconv.FormatInt(i, 10), r...))
	}
	require.NoError(t, b.Close(ctx))
	bd.requireExactly(t, 20, 15)
	got := rec.pgetl()
	var sqls []string
	for _, sp := range got {
		require.True(t, sp.ended, sp.sql)
		sqls = append(sqls, sp.sql)
	}
	require.Equal(t, []string{
		`-- pgetl batch job="trace-set" seq=1 attempt=1 rows=10 rejects=0`,
		`-- pgetl batch job="trace-set" seq=2 attempt=1 rows=10 rejects=0`,
		`-- pgetl batch isolate job="trace-set" seq=2 attempt=1 rows=10 rejects=1`,
	}, sqls)
	require.Error(t, got[1].err, "the first attempt met the bad row")
	require.Equal(t, "COMMIT", got[2].tag)
}
