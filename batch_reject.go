package pgetl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// failAt commits the rows of bt before row bad (in the order they were added), with
// the checkpoint at the last of them (RejectFail), then returns the bad row's error.
func (b *BatchSession) failAt(ctx context.Context, seq int64, bt *batch, bad int, rejected map[int]bool, rejects []Reject, rej Reject, pg *pgconn.PgError, t0 time.Time) error {
	s := b.s
	berr := &BatchError{Job: s.cfg.Job, Seq: seq, Row: rej.Row, Cursor: rej.Cursor, Column: rej.Column,
		Value: b.value(bt, rej, pg), SQLState: pg.Code, Constraint: pg.ConstraintName, Err: pg}
	prefix, merged := b.selectRows(bt, func(i int) bool { return i >= bad || rejected[i] })
	// The checkpoint's cursor is that of the last row before the bad one, rejected
	// rows included: rows up to there are accounted for.
	var cursor *string
	lastIdx := int64(-1)
	for i := bad - 1; i >= 0; i-- {
		if !rejected[i] {
			cursor, lastIdx = &bt.cursors[i], bt.idx[i]
			break
		}
	}
	var keep []Reject
	for i := range rejects {
		if rejects[i].Row < rej.Row {
			keep = append(keep, rejects[i])
			if rejects[i].Row > lastIdx {
				cursor, lastIdx = &rejects[i].Cursor, rejects[i].Row
			}
		}
	}
	if len(prefix) == 0 && len(keep) == 0 {
		return berr
	}
	prefix = b.knownFirst(bt, prefix)
	rows := int64(len(prefix)) + merged
	var sent int64
	err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
		out, nbytes, err := b.attempt(ctx, seq, n, bt, prefix, rows, keep, cursor, false)
		sent = nbytes
		return out, err
	})
	if err != nil {
		return fmt.Errorf("%w (and committing the rows before it failed: %w)", berr, err)
	}
	b.committed(seq, cursor, rows, keep, sent, t0)
	b.publishKeys(bt, prefix)
	berr.Committed = true
	return berr
}

// checkRejects enforces MaxRejects and MaxRejectRatio.
func (b *BatchSession) checkRejects(bt *batch, rejects []Reject) error {
	if len(rejects) == 0 || (b.cfg.MaxRejects == 0 && b.cfg.MaxRejectRatio == 0) {
		return nil
	}
	s := b.s
	s.mu.Lock()
	total := s.cp.Rejects + int64(len(rejects))
	seen := s.cp.Rows + s.cp.Rejects + bt.seen
	s.mu.Unlock()
	over := b.cfg.MaxRejects > 0 && total > b.cfg.MaxRejects
	if b.cfg.MaxRejectRatio > 0 && seen >= 1000 && float64(total) > b.cfg.MaxRejectRatio*float64(seen) {
		over = true
	}
	if !over {
		return nil
	}
	last := rejects[len(rejects)-1]
	return &BatchError{Job: s.cfg.Job, Seq: s.nextSeq(), Row: last.Row, Cursor: last.Cursor, Column: last.Column,
		SQLState: last.SQLState, Constraint: last.Constraint,
		Err: fmt.Errorf("%w: %d rejected of %d seen (MaxRejects %d, MaxRejectRatio %g): %s", ErrTooManyRejects, total, seen, b.cfg.MaxRejects, b.cfg.MaxRejectRatio, last.Message)}
}

// rowError pins a failure to a position in the rows sent: from a COPY error's
// CONTEXT line, or the failing statement of the statement path.
type rowError struct {
	pos int
	err error
}

func (e *rowError) Error() string { return e.err.Error() }

func (e *rowError) Unwrap() error { return e.err }

// bisect finds the row whose addition makes the batch fail: the smallest k such
// that rows sel[:k] fail, by binary search over prefixes, each probe in its own
// rolled-back transaction with constraints checked immediately: O(log n) probes. A
// prefix (not a half) is probed so that a conflict between two rows of the batch
// (a duplicate key) pins the later one, as COPY itself would. A probe that reports a
// COPY line pins the row at once.
func (b *BatchSession) bisect(ctx context.Context, seq int64, bt *batch, sel []int) (int, error) {
	// probe reports whether rows sel[:k] fail, or the row a failure names.
	probe := func(k int) (bool, int, error) {
		b.s.count("bisect_probe")
		var err error
		for attempt := 1; ; attempt++ {
			_, _, err = b.attempt(ctx, seq, 0, bt, sel[:k], 0, nil, nil, true)
			if err == nil || !IsTransient(err) || ctx.Err() != nil || attempt >= b.s.cfg.Retry.MaxAttempts {
				break
			}
			select {
			case <-ctx.Done():
				return false, -1, ctx.Err()
			case <-time.After(b.s.backoff(attempt)):
			}
		}
		if err == nil {
			return false, -1, nil
		}
		pg := pgErrorOf(err)
		if pg == nil || !isDataError(pg.Code) {
			return false, -1, err
		}
		var rerr *rowError
		if errors.As(err, &rerr) {
			return true, rerr.pos, nil
		}
		return true, -1, nil
	}
	lo, hi := 0, len(sel) // sel[:lo] passes; sel[:hi] is assumed to fail
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		fails, at, err := probe(mid)
		if err != nil {
			return -1, err
		}
		if at >= 0 {
			return at, nil
		}
		if fails {
			hi = mid
		} else {
			lo = mid
		}
	}
	if hi == len(sel) && hi > 0 {
		// The whole batch was never probed on its own: check that its rows are the
		// cause (not, say, the checkpoint's statement).
		fails, at, err := probe(hi)
		if err != nil {
			return -1, err
		}
		if at >= 0 {
			return at, nil
		}
		if !fails {
			return -1, nil
		}
	}
	return hi - 1, nil
}

var copyLineRE = regexp.MustCompile(`COPY [^,]+, line (\d+)(?:, column ([^:\s]+))?`)

// copyLine returns the 1-based line (row) of a COPY error's CONTEXT, or 0.
func copyLine(pg *pgconn.PgError) int {
	m := copyLineRE.FindStringSubmatch(pg.Where)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

func copyColumn(pg *pgconn.PgError) string {
	if pg.ColumnName != "" {
		return pg.ColumnName
	}
	if m := copyLineRE.FindStringSubmatch(pg.Where); m != nil {
		return m[2]
	}
	return ""
}

func sqlState(pg *pgconn.PgError) string {
	if pg == nil {
		return ""
	}
	return pg.Code
}

// rejectOf describes row i of bt as refused with pg.
func (b *BatchSession) rejectOf(bt *batch, i int, pg *pgconn.PgError) Reject {
	return Reject{Row: bt.idx[i], Cursor: bt.cursors[i], SQLState: pg.Code, Message: pg.Message,
		Column: copyColumn(pg), Constraint: pg.ConstraintName, Values: b.rowJSON(bt, i)}
}

// rowJSON renders row i of bt as a JSON array, decoding its binary COPY tuple.
func (b *BatchSession) rowJSON(bt *batch, i int) string {
	if bt.vals != nil {
		return valuesJSON(bt.vals[i])
	}
	vals := b.decodeRow(bt, i)
	return valuesJSON(vals)
}

// value returns the bad value of a rejected row (truncated), when its column is known.
func (b *BatchSession) value(bt *batch, rej Reject, pg *pgconn.PgError) string {
	c := indexOf(b.cfg.Columns, copyColumn(pg))
	if c < 0 {
		return ""
	}
	var vals []any
	if err := json.Unmarshal([]byte(rej.Values), &vals); err != nil || c >= len(vals) {
		return ""
	}
	if vals[c] == nil {
		return "NULL"
	}
	return truncate(fmt.Sprint(vals[c]), 64)
}

// rejectSQL returns the INSERT of rejects into the reject table, or "".
func (b *BatchSession) rejectSQL(seq int64, rejects []Reject) string {
	if len(rejects) == 0 {
		return ""
	}
	s := b.s
	var q strings.Builder
	q.WriteString("INSERT INTO " + s.schema + ".reject (job, seq, row_index, cursor, sqlstate, message, column_name, constraint_name, row) VALUES ")
	for i, r := range rejects {
		if i > 0 {
			q.WriteString(", ")
		}
		fmt.Fprintf(&q, "(%s, %d, %d, %s, %s, %s, %s, %s, %s::jsonb)", quoteLiteral(s.cfg.Job), seq, r.Row,
			quoteLiteral(r.Cursor), quoteLiteral(r.SQLState), quoteLiteral(strings.ToValidUTF8(r.Message, "?")),
			quoteLiteral(r.Column), quoteLiteral(r.Constraint), quoteLiteral(strings.ReplaceAll(r.Values, "\\u0000", "")))
	}
	q.WriteString(";")
	return q.String()
}
