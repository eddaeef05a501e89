package pgetl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// commit commits bt as one batch: its rows, its rejects and its checkpoint in one
// transaction, retried as a whole on transient failures. A data error is pinned to
// its row (from the COPY's CONTEXT line or the failing statement, else by
// bisection) and handled by the reject policy. Any failure is sticky.
func (b *BatchSession) commit(ctx context.Context, bt *batch) (err error) {
	s := b.s
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	defer func() {
		if err != nil {
			b.fail(err)
		} else {
			select {
			case b.free <- bt:
			default:
			}
		}
	}()
	b.mu.Lock()
	err = b.err
	b.mu.Unlock()
	if err != nil {
		return err
	}
	if err := s.usable(); err != nil {
		return err
	}
	if err := s.sync(ctx); err != nil {
		return err
	}
	t0 := time.Now()
	seq := s.nextSeq()
	rejected := map[int]bool{} // rows of bt rejected while isolating bad rows
	rejects := append([]Reject(nil), bt.rejects...)
	for {
		sel, merged := b.selectRows(bt, func(i int) bool { return rejected[i] })
		sel = b.knownFirst(bt, sel)
		if err := b.checkRejects(bt, rejects); err != nil {
			return err
		}
		var sent int64
		err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
			out, nbytes, err := b.attempt(ctx, seq, n, bt, sel, int64(len(sel))+merged, rejects, bt.last, false)
			sent = nbytes
			return out, err
		})
		if err == nil {
			rows := int64(len(sel)) + merged
			b.committed(seq, bt.last, rows, rejects, sent, t0)
			b.publishKeys(bt, sel)
			return nil
		}
		pg := pgErrorOf(err)
		var rerr *rowError
		if pg != nil && ctx.Err() == nil && b.staleKey(bt, pg) {
			continue // retry the batch as a merge
		}
		if ctx.Err() != nil || pg == nil || !isDataError(pg.Code) {
			return &BatchError{Job: s.cfg.Job, Seq: seq, Row: -1, SQLState: sqlState(pg), Err: err}
		}
		pos := -1
		if errors.As(err, &rerr) {
			pos = rerr.pos
		} else if pos, err = b.bisect(ctx, seq, bt, sel); err != nil {
			return &BatchError{Job: s.cfg.Job, Seq: seq, Row: -1, SQLState: sqlState(pg), Err: err}
		}
		if pos < 0 || pos >= len(sel) {
			return &BatchError{Job: s.cfg.Job, Seq: seq, Row: -1, SQLState: pg.Code, Constraint: pg.ConstraintName,
				Err: fmt.Errorf("pgetl: data error not caused by a row of the batch: %w", pg)}
		}
		bad := sel[pos]
		rej := b.rejectOf(bt, bad, pg)
		if b.cfg.Rejects == RejectFail {
			return b.failAt(ctx, seq, bt, bad, rejected, rejects, rej, pg, t0)
		}
		rejects = append(rejects, rej)
		rejected[bad] = true
	}
}

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

func (b *BatchSession) committed(seq int64, cursor *string, rows int64, rejects []Reject, sent int64, t0 time.Time) {
	s := b.s
	s.committed(seq, cursor, rows, int64(len(rejects)), sent)
	d := time.Since(t0)
	s.mu.Lock()
	s.stat.flushNanos += int64(d)
	s.mu.Unlock()
	if b.cfg.OnCommitFunc != nil {
		c := ""
		if cursor != nil {
			c = *cursor
		}
		b.cfg.OnCommitFunc(BatchResult{Job: s.cfg.Job, Seq: seq, Rows: rows, Rejects: int64(len(rejects)), Bytes: sent, Cursor: c, Duration: d})
	}
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

// selectRows returns the rows of bt to send, in the order they were added, leaving
// out those skip names. For an upsert, a row whose key appears again later among the
// rows sent is left out too (the last one wins) and counted in merged; a key holding
// a NULL never merges (NULLs never conflict).
func (b *BatchSession) selectRows(bt *batch, skip func(int) bool) (sel []int, merged int64) {
	sel = make([]int, 0, bt.rows())
	if b.keyIx == nil {
		for i := range bt.rows() {
			if !skip(i) {
				sel = append(sel, i)
			}
		}
		return sel, 0
	}
	last := make(map[string]int, bt.rows())
	for i, k := range bt.keys {
		if k != "" && !skip(i) {
			last[k] = i
		}
	}
	for i, k := range bt.keys {
		switch {
		case skip(i):
		case k == "" || last[k] == i:
			sel = append(sel, i)
		default:
			merged++
		}
	}
	return sel, merged
}

// rowError pins a failure to a position in the rows sent: from a COPY error's
// CONTEXT line, or the failing statement of the statement path.
type rowError struct {
	pos int
	err error
}

func (e *rowError) Error() string { return e.err.Error() }
func (e *rowError) Unwrap() error { return e.err }

// attempt makes one attempt to commit rows sel of bt (with rejects and the
// checkpoint at cursor) on a fresh connection, in one round trip: one simple-query
// message holding BEGIN, the guards, the COPY, the merge, the rejects, the
// checkpoint and COMMIT, with the COPY data right behind it. With probe, it instead
// runs the rows in a transaction that is rolled back, to test them.
func (b *BatchSession) attempt(ctx context.Context, seq int64, n int, bt *batch, sel []int, rows int64, rejects []Reject, cursor *string, probe bool) (commitOutcome, int64, error) {
	s := b.s
	t0 := time.Now()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return outcomeFailed, 0, err
	}
	defer func() {
		conn.Release()
		s.mu.Lock()
		s.stat.holdNanos += int64(time.Since(t0))
		s.mu.Unlock()
	}()
	pgc := conn.Conn().PgConn()
	if s.cfg.beforeCommit != nil && !probe {
		s.cfg.beforeCommit(ctx, seq, n, pgc)
	}
	if b.cfg.SQL != "" {
		out, err := b.statementAttempt(ctx, conn.Conn(), seq, bt, sel, rows, rejects, cursor, probe)
		return out, 0, err
	}
	var q strings.Builder
	q.WriteString("BEGIN;")
	q.WriteString(s.guardSQL(seq))
	if probe {
		q.WriteString("SET CONSTRAINTS ALL IMMEDIATE;")
	}
	q.WriteString(b.sql.stageStmt)
	// With a key cache, sel holds the known keys first (staged, then one UPDATE …
	// FROM), then the new ones (COPYed straight into the table).
	known, cached := len(sel), b.cfg.KeyCache != nil && !bt.stale
	if cached {
		known = 0
		for known < len(sel) && bt.known[sel[known]] {
			known++
		}
	}
	copies, starts, nbytes := b.copyData(bt, sel[:known], 0)
	for range copies {
		q.WriteString(b.sql.copyStmt)
	}
	if known < len(sel) {
		c2, s2, n2 := b.copyData(bt, sel[known:], known)
		for range c2 {
			q.WriteString(b.sql.copyNew)
		}
		copies, starts, nbytes = append(copies, c2...), append(starts, s2...), nbytes+n2
	}
	if cached {
		q.WriteString(b.sql.update + strconv.Itoa(known) + ");")
	} else {
		q.WriteString(b.sql.merge)
	}
	if probe {
		q.WriteString("ROLLBACK")
	} else {
		q.WriteString(b.rejectSQL(seq, rejects))
		if !s.cfg.skipCheckpoint {
			q.WriteString(s.advanceSQL(seq, cursor, rows, int64(len(rejects))))
		}
		q.WriteString("COMMIT")
	}
	tag, done, err := sendBatch(ctx, pgc, q.String(), copies)
	if pg := pgErrorOf(err); pg != nil && isDataError(pg.Code) {
		if line := copyLine(pg); line > 0 && done < len(copies) {
			if pos := starts[done] + line - 1; pos < len(sel) {
				err = &rowError{pos: pos, err: err}
			}
		}
	}
	if err == nil {
		if want := map[bool]string{true: "ROLLBACK", false: "COMMIT"}[probe]; tag != want {
			return outcomeFailed, nbytes, fmt.Errorf("pgetl: batch ended with %q, not %s", tag, want)
		}
		return outcomeCommitted, nbytes, nil
	}
	if pg := pgErrorOf(err); pg != nil && pg.Severity == "ERROR" {
		// The server refused a statement: the rest of the message, COMMIT included,
		// was skipped. Roll back to keep the connection.
		if pgc.TxStatus() != 'I' {
			_ = pgc.Exec(ctx, "ROLLBACK").Close()
		}
		return outcomeFailed, nbytes, err
	}
	if probe {
		return outcomeFailed, nbytes, err
	}
	// The connection failed (or a FATAL arrived) after the message was sent, and
	// COMMIT may have run.
	return outcomeInDoubt, nbytes, err
}

// copyData returns the binary COPY streams of rows sel of bt, one per COPY
// statement (see copyChunkRows), without copying the rows, and the position in the
// batch's sent rows (sel starting at offset) of each stream's first row.
func (b *BatchSession) copyData(bt *batch, sel []int, offset int) ([]net.Buffers, []int, int64) {
	chunk := copyChunkRows(len(sel))
	var copies []net.Buffers
	var starts []int
	var n int64
	for pos := 0; pos < len(sel) || copies == nil; pos += chunk {
		part := sel[pos:min(pos+chunk, len(sel))]
		bufs := net.Buffers{copyHeader}
		n += int64(len(copyHeader) + len(copyTrailer))
		for i := 0; i < len(part); {
			j := i
			for j+1 < len(part) && part[j+1] == part[j]+1 {
				j++
			}
			seg := bt.buf[bt.offs[part[i]]:bt.end(part[j])]
			bufs = append(bufs, seg)
			n += int64(len(seg))
			i = j + 1
		}
		copies = append(copies, append(bufs, copyTrailer))
		starts = append(starts, offset+pos)
	}
	return copies, starts, n
}

// statementAttempt runs the statement path: the rows' statements pipelined between
// BEGIN and the checkpoint and COMMIT, in one round trip.
func (b *BatchSession) statementAttempt(ctx context.Context, conn *pgx.Conn, seq int64, bt *batch, sel []int, rows int64, rejects []Reject, cursor *string, probe bool) (commitOutcome, error) {
	s := b.s
	batch := &pgx.Batch{}
	batch.Queue("BEGIN")
	for _, stmt := range s.guardStmts(seq) {
		batch.Queue(stmt)
	}
	first := batch.Len()
	for _, i := range sel {
		batch.Queue(b.cfg.SQL, bt.vals[i]...)
	}
	if probe {
		batch.Queue("ROLLBACK")
	} else {
		if r := b.rejectSQL(seq, rejects); r != "" {
			batch.Queue(strings.TrimSuffix(r, ";"))
		}
		batch.Queue(strings.TrimSuffix(s.advanceSQL(seq, cursor, rows, int64(len(rejects))), ";"))
		batch.Queue("COMMIT")
	}
	br := conn.SendBatch(ctx, batch)
	var firstErr error
	for i := range batch.Len() {
		_, err := br.Exec()
		if err != nil && firstErr == nil {
			firstErr = err
			if i >= first && i < first+len(sel) {
				firstErr = &rowError{pos: i - first, err: err}
			}
		}
	}
	closeErr := br.Close()
	if firstErr == nil {
		firstErr = closeErr
	}
	if firstErr == nil {
		return outcomeCommitted, nil
	}
	if pg := pgErrorOf(firstErr); pg != nil && pg.Severity == "ERROR" {
		if conn.PgConn().TxStatus() != 'I' {
			_ = conn.PgConn().Exec(ctx, "ROLLBACK").Close()
		}
		return outcomeFailed, firstErr
	}
	if probe {
		return outcomeFailed, firstErr
	}
	return outcomeInDoubt, firstErr
}

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

func (b *BatchSession) decodeRow(bt *batch, i int) []any {
	row := bt.buf[bt.offs[i]:bt.end(i)]
	if len(row) < 2 {
		return nil
	}
	n := int(row[0])<<8 | int(row[1])
	p := 2
	vals := make([]any, 0, n)
	for c := 0; c < n && p+4 <= len(row); c++ {
		l := int32(uint32(row[p])<<24 | uint32(row[p+1])<<16 | uint32(row[p+2])<<8 | uint32(row[p+3]))
		p += 4
		if l < 0 {
			vals = append(vals, nil)
			continue
		}
		src := row[p : p+int(l)]
		p += int(l)
		var v any = fmt.Sprintf("\\x%x", src)
		if t, ok := b.m.TypeForOID(b.oids[c]); ok {
			if dv, err := t.Codec.DecodeValue(b.m, b.oids[c], pgtype.BinaryFormatCode, src); err == nil {
				v = dv
			}
		}
		vals = append(vals, v)
	}
	return vals
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

func valuesJSON(vals []any) string {
	out := make([]any, len(vals))
	for i, v := range vals {
		if _, err := json.Marshal(v); err != nil {
			v = fmt.Sprint(v)
		}
		out[i] = v
	}
	j, err := json.Marshal(out)
	if err != nil {
		return "null"
	}
	return string(j)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
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

// knownFirst orders sel with the rows whose key the key cache holds first (they are
// updated), the new ones after (they are inserted), each group in batch order.
func (b *BatchSession) knownFirst(bt *batch, sel []int) []int {
	if b.cfg.KeyCache == nil || bt.stale {
		return sel
	}
	out := make([]int, 0, len(sel))
	for _, i := range sel {
		if bt.known[i] {
			out = append(out, i)
		}
	}
	for _, i := range sel {
		if !bt.known[i] {
			out = append(out, i)
		}
	}
	return out
}

// staleKey reports whether the key cache was wrong for this batch: a row sent as
// new failed on the key's unique index (another writer inserted it, or the cache was
// not preloaded), or fewer rows were updated than the cache knew (PGK01: a key was
// deleted elsewhere). The batch is then retried as a merge (INSERT … ON CONFLICT),
// which is right whatever the cache says: a stale cache costs one retry.
func (b *BatchSession) staleKey(bt *batch, pg *pgconn.PgError) bool {
	if b.cfg.KeyCache == nil || bt.stale {
		return false
	}
	if pg.Code != codeRowsMismatch && (pg.Code != "23505" || !b.keyIndexes[pg.ConstraintName]) {
		return false
	}
	bt.stale = true
	b.s.count("stale_key")
	return true
}

// publishKeys adds the keys of a committed batch that the key cache lacked (the
// inserted ones, and existing ones it did not know) to it.
func (b *BatchSession) publishKeys(bt *batch, sel []int) {
	kc := b.cfg.KeyCache
	if kc == nil {
		return
	}
	var keys []any
	for _, i := range sel {
		if k := bt.keyVals[i]; !kc.HasKey(k) {
			keys = append(keys, k)
		}
	}
	if len(keys) > 0 {
		b.cfg.KeyCache.AddKeys(keys)
	}
}
