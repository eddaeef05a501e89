package pgetl

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Rate limit of the Warn a session logs per reject (see [SessionConfig.Logger]).
const (
	// RejectLogBurst is how many rejects are logged one by one per
	// RejectLogInterval; the others of the interval are counted and logged as one
	// summary.
	RejectLogBurst = 10
	// RejectLogInterval is the interval of RejectLogBurst.
	RejectLogInterval = time.Minute
)

// rejectLog rate-limits the Warn logged for each reject: the first RejectLogBurst
// rejects of each RejectLogInterval are logged one by one (row, cursor, table,
// column, reason), the others are counted and summarised in one Warn when the
// interval is over (at the next reject) or when the session closes. Rejects are
// logged when their batch commits, so a replayed batch logs its rejects once.
type rejectLog struct {
	mu         sync.Mutex       // guards the fields below
	now        func() time.Time // nil: time.Now (tests replace it)
	start      time.Time        // the interval's start
	logged     int              // rejects logged in the interval
	suppressed int64            // rejects of the interval not logged
	since      time.Time        // the first of them
}

// log logs the rejects of batch seq of job, as far as the rate limit allows.
func (l *rejectLog) log(lg *slog.Logger, job string, seq int64, rejects []Reject) {
	if len(rejects) == 0 || !lg.Enabled(context.Background(), slog.LevelWarn) {
		return
	}
	l.mu.Lock()
	now := time.Now
	if l.now != nil {
		now = l.now
	}
	t := now()
	var summary int64
	var since time.Time
	if l.start.IsZero() || t.Sub(l.start) >= RejectLogInterval {
		summary, since = l.suppressed, l.since
		l.start, l.logged, l.suppressed = t, 0, 0
	}
	n := min(len(rejects), RejectLogBurst-l.logged)
	l.logged += n
	if rest := int64(len(rejects) - n); rest > 0 {
		if l.suppressed == 0 {
			l.since = t
		}
		l.suppressed += rest
	}
	l.mu.Unlock()
	if summary > 0 {
		logSuppressed(lg, job, summary, since)
	}
	for _, r := range rejects[:n] {
		attrs := []any{"job", job, "seq", seq, "row", r.Row, "cursor", r.Cursor}
		if r.Table != "" {
			attrs = append(attrs, "table", r.Table)
		}
		if r.Column != "" {
			attrs = append(attrs, "column", r.Column)
		}
		if r.SQLState != "" {
			attrs = append(attrs, "sqlstate", r.SQLState)
		}
		if r.Constraint != "" {
			attrs = append(attrs, "constraint", r.Constraint)
		}
		attrs = append(attrs, "reason", r.Message)
		lg.Warn("pgetl: row rejected", attrs...)
	}
}

// flush logs the summary of the rejects not logged yet, if any.
func (l *rejectLog) flush(lg *slog.Logger, job string) {
	l.mu.Lock()
	summary, since := l.suppressed, l.since
	l.suppressed = 0
	l.mu.Unlock()
	if summary > 0 {
		logSuppressed(lg, job, summary, since)
	}
}

func logSuppressed(lg *slog.Logger, job string, n int64, since time.Time) {
	lg.Warn("pgetl: more rows rejected", "job", job, "rejects", n,
		"since", since, "limit", RejectLogBurst, "per", RejectLogInterval, "see", "the reject table")
}
