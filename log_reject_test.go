package pgetl

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// recordHandler is a slog.Handler that keeps the records it is given.
type recordHandler struct {
	level slog.Level
	mu    sync.Mutex
	recs  []slog.Record
}

func (h *recordHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r.Clone())
	h.mu.Unlock()
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

// take returns the records whose message starts with prefix, as maps of their
// attributes (plus "msg"), and forgets every record.
func (h *recordHandler) take(prefix string) []map[string]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []map[string]string
	for _, r := range h.recs {
		if !strings.HasPrefix(r.Message, prefix) {
			continue
		}
		m := map[string]string{"msg": r.Message, "level": r.Level.String()}
		r.Attrs(func(a slog.Attr) bool {
			m[a.Key] = a.Value.String()
			return true
		})
		out = append(out, m)
	}
	h.recs = nil
	return out
}

// TestRejectWarnRateLimited: each reject is logged at Warn once its batch commits,
// with its row, cursor, column and reason: the first RejectLogBurst of an interval
// one by one, the rest as one summary when the interval is over or the session
// closes.
func TestRejectWarnRateLimited(t *testing.T) {
	t.Parallel()
	bd := setupItems(t)
	ctx := context.Background()
	h := &recordHandler{level: slog.LevelWarn}
	s := bd.session(t, "warn", func(c *SessionConfig) { c.Logger = slog.New(h) })
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s.rejLog.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, Rejects: RejectToTable, CommitInterval: -1})
	require.NoError(t, err)
	reject := func(from, to int) {
		for i := from; i <= to; i++ {
			require.NoError(t, b.Reject(ctx, strconv.Itoa(i), fmt.Sprintf("bad %d", i), i))
		}
		require.NoError(t, b.Flush(ctx))
	}
	const rowMsg, sumMsg = "pgetl: row rejected", "pgetl: more rows rejected"

	reject(1, 12)
	recs := h.take("pgetl: ")
	require.Len(t, recs, RejectLogBurst, "the first %d one by one, then nothing", RejectLogBurst)
	for k, r := range recs {
		require.Equal(t, rowMsg, r["msg"])
		require.Equal(t, "WARN", r["level"])
		require.Equal(t, strconv.Itoa(k), r["row"])
		require.Equal(t, strconv.Itoa(k+1), r["cursor"])
		require.Equal(t, fmt.Sprintf("bad %d", k+1), r["reason"])
		require.Equal(t, "warn", r["job"])
	}

	// A new interval: the summary of the two not logged, then the next reject (a
	// value Add refuses: its column and SQLSTATE are logged too).
	advance(RejectLogInterval)
	bad := itemRow(13)
	bad[4] = "not a time"
	require.NoError(t, b.Add(ctx, "13", bad...))
	require.NoError(t, b.Flush(ctx))
	recs = h.take("pgetl: ")
	require.Len(t, recs, 2)
	require.Equal(t, sumMsg, recs[0]["msg"])
	require.Equal(t, "2", recs[0]["rejects"])
	require.Equal(t, rowMsg, recs[1]["msg"])
	require.Equal(t, "12", recs[1]["row"])
	require.Equal(t, "at", recs[1]["column"])
	require.Equal(t, "22P02", recs[1]["sqlstate"])

	reject(14, 25) // 9 more fit in the interval, 3 do not
	recs = h.take("pgetl: ")
	require.Len(t, recs, RejectLogBurst-1)
	require.Equal(t, "21", recs[len(recs)-1]["row"])
	require.NoError(t, b.Close(ctx))
	require.Empty(t, h.take("pgetl: "), "nothing until the interval ends or the session closes")
	require.NoError(t, s.Close(ctx))
	recs = h.take("pgetl: ")
	require.Len(t, recs, 1)
	require.Equal(t, sumMsg, recs[0]["msg"])
	require.Equal(t, "3", recs[0]["rejects"])
	require.Equal(t, int64(25), s.Stat().Rejects())
}
