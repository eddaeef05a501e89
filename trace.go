package pgetl

import (
	"context"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// pgetl sends a batch as one message of its own (sendBatch), beside pgx's query
// methods, so a pgx.QueryTracer set on the pool (ConnConfig.Tracer: otelpgx,
// tracelog, …) would not see it. pgetl therefore reports each exchange it makes
// on its own to the connection's QueryTracer, as pgx reports a query: a
// TraceQueryStart whose SQL is a comment describing it, and a TraceQueryEnd with the
// final command tag or the error:
//
//	-- pgetl batch job="products" seq=12 attempt=1 rows=50000 rejects=0
//	-- pgetl batch job="products" seq=13 attempt=2 retry_of=connection rows=50000 rejects=0
//	-- pgetl batch isolate job="products" seq=14 attempt=1 rows=50000 rejects=1
//	-- pgetl batch probe job="products" seq=14 attempt=0 rows=25000 rejects=0
//	-- pgetl tx job="products" seq=15 attempt=1
//	-- pgetl resolve in-doubt job="products" seq=16
//
// A failed attempt ends with its error, the next attempt's comment says which
// failure class it retries; a resolution ends with the tag "committed" or
// "not committed". An attempt that cannot get a connection is not traced (a
// QueryTracer needs one).

// exchangeTrace is one exchange reported to a QueryTracer; nil if the connection has
// none.
type exchangeTrace struct {
	tr   pgx.QueryTracer
	conn *pgx.Conn
	ctx  context.Context
}

type retryOfKey struct{}

// withRetryOf marks ctx as that of an attempt retrying a failure of class.
func withRetryOf(ctx context.Context, class string) context.Context {
	return context.WithValue(ctx, retryOfKey{}, class)
}

// traceStart reports the start of an exchange of kind ("batch", "tx", …) for unit
// seq, attempt n, on conn, to conn's QueryTracer if it has one. rows and rejects
// are added to the description unless negative. It returns the context the tracer
// returned, to run the exchange under.
func (s *Session) traceStart(ctx context.Context, conn *pgx.Conn, kind string, seq int64, n int, rows, rejects int) (context.Context, *exchangeTrace) {
	tr := conn.Config().Tracer
	if tr == nil {
		return ctx, nil
	}
	var b strings.Builder
	b.WriteString("-- pgetl ")
	b.WriteString(kind)
	b.WriteString(" job=")
	b.WriteString(strconv.Quote(s.cfg.Job))
	b.WriteString(" seq=")
	b.WriteString(strconv.FormatInt(seq, 10))
	if n >= 0 {
		b.WriteString(" attempt=")
		b.WriteString(strconv.Itoa(n))
	}
	if class, ok := ctx.Value(retryOfKey{}).(string); ok && n > 1 {
		b.WriteString(" retry_of=")
		b.WriteString(class)
	}
	if rows >= 0 {
		b.WriteString(" rows=")
		b.WriteString(strconv.Itoa(rows))
	}
	if rejects >= 0 {
		b.WriteString(" rejects=")
		b.WriteString(strconv.Itoa(rejects))
	}
	tctx := tr.TraceQueryStart(ctx, conn, pgx.TraceQueryStartData{SQL: b.String()})
	return tctx, &exchangeTrace{tr: tr, conn: conn, ctx: tctx}
}

// end reports the end of the exchange: its command tag, or its error.
func (t *exchangeTrace) end(tag string, err error) {
	if t == nil {
		return
	}
	if err != nil {
		tag = ""
	}
	t.tr.TraceQueryEnd(t.ctx, t.conn, pgx.TraceQueryEndData{CommandTag: pgconn.NewCommandTag(tag), Err: err})
}

// outcomeTag is the command tag traced for an attempt's outcome.
func outcomeTag(out commitOutcome, probe bool) string {
	switch {
	case out != outcomeCommitted:
		return ""
	case probe:
		return "ROLLBACK"
	}
	return "COMMIT"
}

// attemptKind names a batch attempt in its trace.
func attemptKind(probe bool) string {
	if probe {
		return "batch probe"
	}
	return "batch"
}

// resolvedTag is the command tag traced for an in-doubt resolution.
func resolvedTag(committed bool) string {
	if committed {
		return "committed"
	}
	return "not committed"
}
