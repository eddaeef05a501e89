package pgetl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
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
	bt.record = append(bt.record, func() {
		b.recordCommit(seq, bt, cursor, prefix, rows, keep, sent, t0)
	})
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
	// Transient failures of a probe are retried under the session's RetryPolicy
	// (MaxAttempts per probe, MaxElapsed for the whole bisection, OnRetryFunc).
	start := b.s.clock.now()
	probe := func(k int) (bool, int, error) {
		b.s.count("bisect_probe")
		var err error
		for attempt := 1; ; attempt++ {
			_, _, err = b.attempt(ctx, seq, 0, bt, sel[:k], 0, nil, nil, true)
			if err == nil || !IsTransient(err) || ctx.Err() != nil {
				break
			}
			if werr := b.s.retryWait(ctx, seq, attempt, start, err); werr != nil {
				return false, -1, werr
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

// rowJSON renders row i of bt as a JSON object keyed by column (see valuesObject),
// decoding its binary COPY tuple.
func (b *BatchSession) rowJSON(bt *batch, i int) string {
	if bt.vals != nil {
		return b.valuesObject(bt.vals[i])
	}
	return b.valuesObject(b.decodeRow(bt, i))
}

// valuesObject renders the values of a row as a JSON object keyed by column name
// ($1, $2, … for values without a name: the statement path without Columns). Each
// value is its JSON encoding (its fmt.Sprint text if it has none) with NUL characters
// removed from its strings: jsonb cannot hold \u0000. Text is never edited as JSON:
// a literal backslash-u-0000 in a value stays as it is.
func (b *BatchSession) valuesObject(vals []any) string {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for c, v := range vals {
		if c > 0 {
			buf.WriteByte(',')
		}
		k, _ := json.Marshal(strings.ReplaceAll(b.column(c), "\x00", ""))
		buf.Write(k)
		buf.WriteByte(':')
		j, err := json.Marshal(v)
		if err != nil {
			j, _ = json.Marshal(fmt.Sprint(v))
		}
		buf.Write(withoutNUL(j))
	}
	buf.WriteByte('}')
	return buf.String()
}

// withoutNUL returns the JSON text j with NUL characters removed from its strings
// (keys included): it is decoded, cleaned and encoded again, never edited as text. A
// value without an escaped NUL is returned as is.
func withoutNUL(j []byte) []byte {
	if !bytes.Contains(j, []byte(`\u0000`)) {
		return j // not even a literal backslash-u-0000: nothing to do
	}
	d := json.NewDecoder(bytes.NewReader(j))
	d.UseNumber()
	var x any
	if err := d.Decode(&x); err != nil {
		return []byte("null")
	}
	out, err := json.Marshal(stripNUL(x))
	if err != nil {
		return []byte("null")
	}
	return out
}

// stripNUL removes NUL characters from the strings of a decoded JSON value.
func stripNUL(x any) any {
	switch x := x.(type) {
	case string:
		return strings.ReplaceAll(x, "\x00", "")
	case []any:
		for i := range x {
			x[i] = stripNUL(x[i])
		}
		return x
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, v := range x {
			m[strings.ReplaceAll(k, "\x00", "")] = stripNUL(v)
		}
		return m
	}
	return x
}

// rejectRowJSON returns a reject's Values ready for the jsonb column: an object keyed
// by column. Values from rowJSON are returned as they are; a JSON array (valuesJSON,
// the rows Add refuses) is keyed by column here, and NULs are removed from its
// strings.
func (b *BatchSession) rejectRowJSON(values string) string {
	if !strings.HasPrefix(values, "[") {
		return string(withoutNUL([]byte(values)))
	}
	d := json.NewDecoder(strings.NewReader(values))
	d.UseNumber()
	var vals []any
	if err := d.Decode(&vals); err != nil {
		return "null"
	}
	return b.valuesObject(vals)
}

// value returns the bad value of a rejected row (truncated), when its column is known.
func (b *BatchSession) value(bt *batch, rej Reject, pg *pgconn.PgError) string {
	col := copyColumn(pg)
	if col == "" {
		return ""
	}
	d := json.NewDecoder(strings.NewReader(rej.Values))
	d.UseNumber()
	var vals map[string]any
	if err := d.Decode(&vals); err != nil {
		return ""
	}
	v, ok := vals[col]
	if !ok {
		return ""
	}
	if v == nil {
		return "NULL"
	}
	return truncate(fmt.Sprint(v), 64)
}

// rejectSQL returns the INSERT of rejects into the reject table, or "". table_name is
// the batch's target table (NULL for the statement path).
func (b *BatchSession) rejectSQL(seq int64, rejects []Reject) string {
	if len(rejects) == 0 {
		return ""
	}
	s := b.s
	table := "NULL"
	if b.cfg.SQL == "" {
		table = quoteLiteral(sqlText(b.cfg.Table))
	}
	var q strings.Builder
	q.WriteString("INSERT INTO " + s.schema + ".reject (job, seq, row_index, cursor, sqlstate, message, column_name, constraint_name, table_name, row) VALUES ")
	for i, r := range rejects {
		if i > 0 {
			q.WriteString(", ")
		}
		fmt.Fprintf(&q, "(%s, %d, %d, %s, %s, %s, %s, %s, %s, %s::jsonb)", quoteLiteral(s.cfg.Job), seq, r.Row,
			quoteLiteral(sqlText(r.Cursor)), quoteLiteral(sqlText(r.SQLState)), quoteLiteral(sqlText(r.Message)),
			quoteLiteral(sqlText(r.Column)), quoteLiteral(sqlText(r.Constraint)), table, quoteLiteral(b.rejectRowJSON(r.Values)))
	}
	q.WriteString(";")
	return q.String()
}

// sqlText makes s fit a text literal: valid UTF-8, without NUL characters.
func sqlText(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "?"), "\x00", "")
}

// isolateSavepoint is the savepoint each chunk of rows runs under while bad rows are
// isolated.
const isolateSavepoint = "SAVEPOINT pgetl_row"

// Bounds of the rows per chunk while isolating bad rows (see isolateAttempt).
const (
	isolateChunkMin = 32
	isolateChunkMax = 4096
)

// segment is a run of rows of a batch that isolation sends in chunks.
type segment struct {
	rows  []int // rows of the batch, in the order sent
	fresh bool  // with a key cache: rows with new keys, COPYed into the table (else staged)
	good  bool  // known to pass: sent as one chunk
}

// isolate commits bt (RejectToTable, COPY path) after an attempt failed on a row its
// COPY placed, finding the batch's other bad rows inside one transaction (see
// isolateAttempt) rather than with one re-sent batch per bad row. good holds rows
// known to pass; rejected and rejects receive the rows found bad, which stay found
// when an attempt fails. The transaction is one unit of work for s.run: a transient
// failure replays it, an in-doubt COMMIT is resolved as for any batch. It returns the
// rows committed (in the order sent) and the rows merged into a later row of their
// key.
func (b *BatchSession) isolate(ctx context.Context, seq int64, bt *batch, good, rejected map[int]bool, rejects *[]Reject, sent *int64) (applied []int, merged int64, err error) {
	err = b.s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
		out, app, m, nbytes, err := b.isolateAttempt(ctx, seq, n, bt, good, rejected, rejects)
		*sent += nbytes
		applied, merged = app, m
		return out, err
	})
	return applied, merged, err
}

// isolateAttempt makes one attempt of isolate, on one connection held for it:
//
//  1. One round trip sends a pipeline of Query messages (sendPipeline): BEGIN, the
//     guards, the fence (advanceSQL, with the counts of the rows about to be sent),
//     the staging table and a savepoint; then every row not yet known bad, in chunks,
//     each chunk a message "ROLLBACK TO SAVEPOINT p; COPY …; RELEASE SAVEPOINT p;
//     SAVEPOINT p". A chunk that fails is rolled back by the next message and the
//     others go on, so one round trip finds one bad row in every chunk that holds
//     one: its COPY line names it.
//  2. Each next round trip re-sends, for every chunk that failed, the rows before the
//     bad one (they passed: one chunk) and the rows after it (unknown: in chunks),
//     until every row passed or was rejected: as many round trips as the most bad
//     rows in one chunk.
//  3. A last message merges or updates (upserts), inserts the rejects, corrects the
//     checkpoint's counts (adjustSQL) and commits.
//
// Rows sent: the batch once, plus, for each chunk that held a bad row, about that
// chunk again; chunks are sized from the gap seen between bad rows (half of it,
// within isolateChunkMin..isolateChunkMax), so with bad rows far apart chunks are
// large and few. Rows after a failed chunk's bad row are sent after the rest of the
// batch: a row rejected for an error another row can cause (a duplicate key, a
// missing referenced row) is therefore tried once more at the end, in a plain insert;
// of two rows of one batch sharing a unique key, the one kept may then be the later.
func (b *BatchSession) isolateAttempt(ctx context.Context, seq int64, n int, bt *batch, good, rejected map[int]bool, rejects *[]Reject) (out commitOutcome, applied []int, merged int64, nbytes int64, err error) {
	s := b.s
	conn, giveBack, err := s.acquire(ctx)
	if err != nil {
		return outcomeFailed, nil, 0, 0, err
	}
	pgc := conn.Conn().PgConn()
	ctx, tr := s.traceStart(ctx, conn.Conn(), "batch isolate", seq, n, bt.rows(), len(*rejects))
	defer func() {
		tr.end(outcomeTag(out, false), err)
		if out != outcomeCommitted && !pgc.IsClosed() && pgc.TxStatus() != 'I' {
			_ = pgc.Exec(ctx, "ROLLBACK").Close()
		}
		giveBack()
	}()
	fail := func(err error) (commitOutcome, []int, int64, int64, error) {
		return outcomeFailed, nil, 0, nbytes, err
	}

	skip := func(i int) bool { return rejected[i] }
	sel, merged0 := b.selectRows(bt, skip)
	sel = b.knownFirst(bt, sel)
	rows0, rejects0 := int64(len(sel))+merged0, int64(len(*rejects))
	cached := b.cfg.KeyCache != nil && !bt.stale
	queued := make(map[int]bool, len(sel)) // rows sent or to be sent
	var pending []segment
	// add queues rows (in order) as segments of rows alike.
	add := func(rows []int) {
		for len(rows) > 0 {
			fresh, g := cached && !bt.known[rows[0]], good[rows[0]]
			k := 1
			for k < len(rows) && (cached && !bt.known[rows[k]]) == fresh && good[rows[k]] == g {
				k++
			}
			pending = append(pending, segment{rows: rows[:k], fresh: fresh, good: g})
			rows = rows[k:]
		}
	}
	for _, i := range sel {
		queued[i] = true
	}
	add(sel)

	const rollbackTo, release = "ROLLBACK TO " + isolateSavepoint + ";", "RELEASE " + isolateSavepoint + ";"
	found, known := 1, len(good)+1 // bad rows found and rows placed, for the chunk size
	var victims []int              // rows rejected out of order, for an error another row can cause
	// Round 0 begins the transaction, also when no row is left to send.
	for round := 0; round == 0 || len(pending) > 0; round++ {
		var msgs []pipeMsg
		if round == 0 {
			head := "BEGIN;" + s.guardSQL(seq)
			if !s.cfg.skipCheckpoint {
				head += s.advanceSQL(seq, bt.last, rows0, rejects0) + b.seenSQL(bt, seq)
			}
			msgs = append(msgs, pipeMsg{sql: head + b.sql.stageStmt + isolateSavepoint})
		}
		chunk := min(max(known/found/4, isolateChunkMin), isolateChunkMax)
		type sentChunk struct {
			rows   []int
			starts []int
		}
		var chunks []sentChunk
		for _, sg := range pending {
			step := chunk
			if sg.good {
				step = len(sg.rows)
			}
			stmt := b.sql.copyStmt
			if sg.fresh {
				stmt = b.sql.copyNew
			}
			for p := 0; p < len(sg.rows); p += step {
				part := sg.rows[p:min(p+step, len(sg.rows))]
				copies, starts, nb := b.copyData(bt, part, 0)
				nbytes += nb
				var q strings.Builder
				q.WriteString(rollbackTo)
				for range copies {
					q.WriteString(stmt)
				}
				q.WriteString(release + isolateSavepoint)
				msgs = append(msgs, pipeMsg{sql: q.String(), copies: copies})
				chunks = append(chunks, sentChunk{rows: part, starts: starts})
			}
		}
		pending = nil
		s.count("isolate_round_trip")
		res, err := sendPipeline(ctx, pgc, msgs)
		if err != nil {
			return fail(err) // COMMIT was not sent: not in doubt
		}
		if round == 0 {
			if res[0].err != nil {
				return fail(res[0].err) // the fence or a guard
			}
			res = res[1:]
		}
		failed := false
		for k, c := range chunks {
			r := res[k]
			if r.err == nil {
				applied = append(applied, c.rows...)
				known += len(c.rows)
				continue
			}
			line := copyLine(r.err)
			if !isDataError(r.err.Code) || line == 0 || r.copiesDone >= len(c.starts) {
				return fail(r.err) // transient, or not placed by the COPY: the caller bisects
			}
			pos := c.starts[r.copiesDone] + line - 1
			if pos >= len(c.rows) {
				return fail(r.err)
			}
			if cached && r.err.Code == "23505" && b.keyIndexes[r.err.ConstraintName] {
				return fail(r.err) // a stale key cache: the caller retries the batch as a merge
			}
			bad := c.rows[pos]
			*rejects = append(*rejects, b.rejectOf(bt, bad, r.err))
			rejected[bad] = true
			if (round > 0 || failed) && b.keyIx == nil && interRowError(r.err.Code) {
				victims = append(victims, bad)
			}
			failed = true
			found++
			known += pos + 1
			for _, i := range c.rows[:pos] {
				good[i] = true
			}
			add(c.rows[:pos])
			add(c.rows[pos+1:])
		}
		if err := b.checkRejects(bt, *rejects); err != nil {
			return fail(err)
		}
		if b.keyIx != nil {
			// An upsert sends the last row of each key: a rejected one uncovers the
			// row of its key before it.
			want, _ := b.selectRows(bt, skip)
			var more []int
			for _, i := range b.knownFirst(bt, want) {
				if !queued[i] {
					queued[i] = true
					more = append(more, i)
				}
			}
			add(more)
		}
	}
	if len(victims) > 0 {
		// Try the rows rejected out of order once more, each on its own, now that
		// every row before them is in.
		slices.Sort(victims)
		msgs := make([]pipeMsg, len(victims))
		for k, i := range victims {
			copies, _, nb := b.copyData(bt, []int{i}, 0)
			nbytes += nb
			msgs[k] = pipeMsg{sql: rollbackTo + b.sql.copyStmt + release + isolateSavepoint, copies: copies}
		}
		s.count("isolate_round_trip")
		res, err := sendPipeline(ctx, pgc, msgs)
		if err != nil {
			return fail(err)
		}
		for k, i := range victims {
			if r := res[k].err; r != nil {
				if !isDataError(r.Code) {
					return fail(r)
				}
				continue
			}
			delete(rejected, i)
			*rejects = slices.DeleteFunc(*rejects, func(r Reject) bool { return r.Row == bt.idx[i] })
			applied = append(applied, i)
		}
	}

	want, merged := b.selectRows(bt, skip)
	if len(want) != len(applied) {
		return fail(fmt.Errorf("pgetl: bug: isolation sent %d rows of %d", len(applied), len(want)))
	}
	var q strings.Builder
	q.WriteString(rollbackTo + release)
	if cached {
		k := 0
		for _, i := range applied {
			if bt.known[i] {
				k++
			}
		}
		q.WriteString(b.sql.update + strconv.Itoa(k) + ");")
	} else {
		q.WriteString(b.sql.merge)
	}
	q.WriteString(b.rejectSQL(seq, *rejects))
	if !s.cfg.skipCheckpoint {
		q.WriteString(s.adjustSQL(seq, nil, int64(len(applied))+merged-rows0, int64(len(*rejects))-rejects0))
	}
	q.WriteString("COMMIT")
	if s.cfg.beforeCommit != nil {
		s.cfg.beforeCommit(ctx, seq, n, pgc)
	}
	s.count("isolate_round_trip")
	tag, _, err := sendBatch(ctx, pgc, q.String(), nil)
	if err == nil {
		if tag != "COMMIT" {
			return fail(fmt.Errorf("pgetl: batch ended with %q, not COMMIT", tag))
		}
		return outcomeCommitted, applied, merged, nbytes, nil
	}
	if pg := pgErrorOf(err); pg != nil && pg.Severity == "ERROR" {
		return fail(err)
	}
	// The connection failed (or a FATAL arrived) after COMMIT was sent.
	return outcomeInDoubt, nil, 0, nbytes, err
}

// interRowError reports a SQLSTATE another row of the batch can cause: a unique or
// exclusion violation, a missing referenced row.
func interRowError(code string) bool {
	return code == "23505" || code == "23P01" || code == "23503"
}
