package pgetl

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// commit commits bt as one batch, one batch at a time (InFlight 1): see commitUnit.
// Any failure is sticky.
func (b *BatchSession) commit(ctx context.Context, bt *batch) (err error) {
	s := b.s
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	defer func() {
		if err != nil {
			b.fail(err)
		}
	}()
	if err := b.ready(ctx); err != nil {
		return err
	}
	err = b.commitUnit(ctx, bt, s.nextSeq())
	for _, r := range bt.record {
		r()
	}
	if err == nil {
		b.recycle(bt)
	}
	return err
}

// ready reports why the batch session cannot commit: its sticky error, the
// session's state, a checkpoint that cannot be re-read. Caller holds s.commitMu.
func (b *BatchSession) ready(ctx context.Context) error {
	b.mu.Lock()
	err := b.err
	b.mu.Unlock()
	if err != nil {
		return err
	}
	if err := b.s.usable(); err != nil {
		return err
	}
	return b.s.sync(ctx)
}

// recycle puts a committed batch on the free list.
func (b *BatchSession) recycle(bt *batch) {
	select {
	case b.free <- bt:
	default:
	}
}

// commitUnit commits bt as unit seq: its rows, its rejects and its checkpoint in one
// transaction, retried as a whole on transient failures. A data error is pinned to
// its row (from the COPY's CONTEXT line or the failing statement, else by
// bisection) and handled by the reject policy. What committed is appended to
// bt.record, to be accounted for once the batches before it are.
func (b *BatchSession) commitUnit(ctx context.Context, bt *batch, seq int64) error {
	s := b.s
	t0 := time.Now()
	rejected := map[int]bool{} // rows of bt rejected while isolating bad rows
	rejects := append([]Reject(nil), bt.rejects...)
	var sent int64        // bytes sent for the batch, every attempt included
	var good map[int]bool // set: isolate the bad rows; rows known to pass
	for {
		sel, merged := b.selectRows(bt, func(i int) bool { return rejected[i] })
		sel = b.knownFirst(bt, sel)
		if err := b.checkRejects(bt, rejects); err != nil {
			return err
		}
		var err error
		if good != nil {
			var applied []int
			applied, merged, err = b.isolate(ctx, seq, bt, good, rejected, &rejects, &sent)
			good = nil
			if err == nil {
				rows, rej, sent := int64(len(applied))+merged, rejects, sent
				bt.counted = false // the isolation's merges do not report
				bt.record = append(bt.record, func() {
					b.recordCommit(seq, bt, bt.last, applied, rows, rej, sent, t0)
				})
				return nil
			}
			if errors.Is(err, ErrTooManyRejects) {
				return err
			}
			// A failure isolation cannot place (a data error without a COPY line,
			// found by the merge or at COMMIT): bisect the rows it left.
			sel, _ = b.selectRows(bt, func(i int) bool { return rejected[i] })
			sel = b.knownFirst(bt, sel)
		} else {
			err = s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
				out, nbytes, err := b.attempt(ctx, seq, n, bt, sel, int64(len(sel))+merged, rejects, bt.last, false)
				sent += nbytes
				return out, err
			})
			if err == nil {
				rows, rej, sent, sel := int64(len(sel))+merged, rejects, sent, sel
				bt.record = append(bt.record, func() {
					b.recordCommit(seq, bt, bt.last, sel, rows, rej, sent, t0)
				})
				return nil
			}
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
			if b.pipe != nil {
				b.pipe.abortAfter(seq) // later batches must not commit past the bad row
			}
			return b.failAt(ctx, seq, bt, bad, rejected, rejects, rej, pg, t0)
		}
		rejects = append(rejects, rej)
		rejected[bad] = true
		if rerr != nil && b.cfg.SQL == "" {
			// The COPY placed the bad row: rows before it passed. Find the other bad
			// rows in one transaction rather than one re-sent batch each.
			good = make(map[int]bool, pos)
			for _, i := range sel[:pos] {
				good[i] = true
			}
		}
	}
}

// attempt makes one attempt to commit rows sel of bt (with rejects and the
// checkpoint at cursor) on a fresh connection, in one round trip: one simple-query
// message holding BEGIN, the guards, the checkpoint's fence (advanceSQL), the COPY,
// the merge, the rejects and COMMIT, with the COPY data right behind it. With probe, it instead
// runs the rows in a transaction that is rolled back, to test them.
func (b *BatchSession) attempt(ctx context.Context, seq int64, n int, bt *batch, sel []int, rows int64, rejects []Reject, cursor *string, probe bool) (out commitOutcome, nbytes int64, err error) {
	s := b.s
	conn, release, err := s.acquire(ctx)
	if err != nil {
		return outcomeFailed, 0, err
	}
	defer release()
	ctx, tr := s.traceStart(ctx, conn.Conn(), attemptKind(probe), seq, n, len(sel), len(rejects))
	defer func() { tr.end(outcomeTag(out, probe), err) }()
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
	} else if !s.cfg.skipCheckpoint {
		// The fence first: a replay of a committed batch stops here (PGF02), before
		// its rows could hit a unique key.
		q.WriteString(s.advanceSQL(seq, cursor, rows, int64(len(rejects))))
	}
	// A sync batch whose rows are all unchanged sends none: no staging, no merge.
	noRows := b.sync != nil && len(sel) == 0
	if !noRows {
		q.WriteString(b.sql.stageStmt)
	}
	// With a key cache, sel holds the known keys first (staged, then one UPDATE …
	// FROM), then the new ones (COPYed straight into the table).
	known, cached := len(sel), b.cfg.KeyCache != nil && !bt.stale
	if cached {
		known = 0
		for known < len(sel) && bt.known[sel[known]] {
			known++
		}
	}
	var copies []net.Buffers
	var starts []int
	if !noRows && cached && b.sync != nil {
		// A sync stages its known rows with where the preload found them.
		copies, starts, nbytes = b.syncCopyData(bt, sel[:known])
		for range copies {
			q.WriteString(b.sql.copyTID)
		}
	} else if !noRows {
		copies, starts, nbytes = b.copyData(bt, sel[:known], 0)
		for range copies {
			q.WriteString(b.sql.copyStmt)
		}
	}
	if known < len(sel) {
		c2, s2, n2 := b.copyData(bt, sel[known:], known)
		for range c2 {
			q.WriteString(b.sql.copyNew)
		}
		copies, starts, nbytes = append(copies, c2...), append(starts, s2...), nbytes+n2
	}
	if cached && !noRows {
		q.WriteString(b.sql.update + strconv.Itoa(known) + ");")
	} else if !cached && !noRows {
		q.WriteString(b.sql.mergeCount)
	}
	if !probe && b.sync != nil {
		// A sync's seen keys, after the fence, as the message's last COPY.
		stmt, data := b.seenCopy(bt, seq)
		q.WriteString(stmt)
		copies = append(copies, data)
		for _, d := range data {
			nbytes += int64(len(d))
		}
	}
	if probe {
		q.WriteString("ROLLBACK")
	} else {
		q.WriteString(b.rejectSQL(seq, rejects))
		q.WriteString("COMMIT")
	}
	var counts rowCounts
	counted := false
	tag, done, err := sendBatchRows(ctx, pgc, q.String(), copies, func(vals [][]byte) {
		if len(vals) == 4 && string(vals[0]) == "pgetl_n" {
			if _, ins, upd, ok := parseCounts(vals[1:]); ok {
				counts, counted = rowCounts{inserted: ins, updated: upd}, true
			}
		}
	})
	if !probe {
		// What this attempt did, if it is the one that commits (or committed, in
		// doubt): a key cache knows which keys exist, a plain insert inserts.
		switch {
		case len(b.cfg.Key) == 0:
			counts, counted = rowCounts{inserted: int64(len(sel))}, true
		case cached:
			counts, counted = rowCounts{inserted: int64(len(sel) - known), updated: int64(known)}, true
		}
		bt.counts, bt.counted = counts, counted
	}
	if pg := pgErrorOf(err); pg != nil && isDataError(pg.Code) {
		if line := copyLine(pg); line > 0 && done < len(starts) {
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
	gq, gargs := s.guardQuery(seq)
	batch.Queue(gq, gargs...)
	if !probe {
		aq, aargs := s.advanceQuery(seq, cursor, rows, int64(len(rejects)))
		batch.Queue(aq, aargs...) // the fence first
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
