package pgetl

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Reject records a row that the caller's own checks refused (a field its parser
// could not read, a record that fails a business rule) as a reject of the job, in
// place of the row Add would have buffered. The row goes to the reject table
// (<CheckpointSchema>.reject) in the transaction of the batch it falls in, with that
// batch's rows and checkpoint: it is written exactly once, with its batch, and a
// batch that is replayed (a retry, an in-doubt commit) writes it again only if the
// first attempt did not commit. cursor is the row's position in the source, as for
// Add: once its batch commits, the checkpoint is past it. reason is stored as the
// reject's message; its sqlstate is empty and, when values holds one value per
// column, its row is a JSON object keyed by column, else the JSON array of values
// (the source's raw fields, say).
//
// A row rejected this way counts as a row Add refused under RejectToTable, whatever
// the batch's reject policy: toward the batch's size, MaxRejects and MaxRejectRatio
// at once (the Reject that exceeds a limit commits the rows before it and returns a
// *BatchError wrapping ErrTooManyRejects, which every later call returns), and in
// BatchResult.Rejects, Stat.Rejects and the checkpoint's Rejects once its batch
// commits. It returns ErrClosed after Close has begun and the error of an earlier
// failed flush.
func (b *BatchSession) Reject(ctx context.Context, cursor, reason string, values ...any) error {
	if err := checkCursor(cursor); err != nil {
		return err
	}
	b.mu.Lock()
	if err := b.stateErr(); err != nil {
		b.mu.Unlock()
		return err
	}
	bt := b.cur
	idx := b.s.nextRow.Add(1) - 1
	rej := Reject{Row: idx, Cursor: cursor, Message: sqlText(reason), Values: b.callerRowJSON(len(b.oids), values), Table: b.tableName()}
	if total, seen, over := b.overRejects(bt); over {
		b.mu.Unlock()
		berr := &BatchError{Job: b.s.cfg.Job, Row: idx, Cursor: cursor, Err: fmt.Errorf("pgetl: rejected by the caller: %s", reason)}
		return b.tooManyRejects(ctx, berr, total, seen)
	}
	bt.rejects = append(bt.rejects, rej)
	bt.extra += rejectOverhead + len(rej.Cursor) + len(rej.Message) + len(rej.Values)
	// As for a row Add refuses: the row takes its place in the batch, and its cursor
	// is accounted for.
	bt.seen++
	bt.lastCur = cursor
	bt.last = &bt.lastCur
	full := bt.seen >= int64(b.limit) || len(bt.buf)+bt.extra >= b.cfg.CommitBytes
	if full && b.limit < b.cfg.CommitRows {
		b.limit = min(2*b.limit, b.cfg.CommitRows)
	}
	b.mu.Unlock()
	if !full {
		return nil
	}
	return b.dispatch(ctx, false)
}

// Reject records a source record that the caller's own checks refused, as
// BatchSession.Reject does: table names the table of the set whose row it was
// meant to be (the reject's table_name), or is empty for a record refused as a
// whole. The record counts as one reject toward MaxRejects and MaxRejectRatio at
// once and in the counts of its batch; it goes to the reject table in its batch's
// transaction, exactly once. One reject too many stops the set: the records before
// it commit, and the *BatchError wrapping ErrTooManyRejects is returned by every
// later call.
func (set *BatchSet) Reject(ctx context.Context, cursor, table, reason string, values ...any) error {
	if err := checkCursor(cursor); err != nil {
		return err
	}
	part := -1
	for i, b := range set.parts {
		if b.cfg.Table == table {
			part = i
			break
		}
	}
	if table != "" && part < 0 {
		return fmt.Errorf("pgetl: BatchSet.Reject: %q is not a table of the set", table)
	}
	set.mu.Lock()
	if err := set.stateErr(); err != nil {
		set.mu.Unlock()
		return err
	}
	bt := set.cur
	idx := set.s.nextRow.Add(1) - 1
	vals := callerArrayJSON(values)
	if part >= 0 {
		vals = set.parts[part].callerRowJSON(set.parts[part].nvals, values)
	}
	rej := Reject{Row: idx, Cursor: cursor, Message: sqlText(reason), Values: vals, Table: table}
	bt.rej = append(bt.rej, rej)
	bt.rows++ // a reject takes its place in the batch, as a refused row does
	bt.bytes += rejectOverhead + len(rej.Cursor) + len(rej.Message) + len(rej.Values)
	if err := set.checkRejects(bt, nil); err != nil {
		bt.rej, bt.rows = bt.rej[:len(bt.rej)-1], bt.rows-1
		bt.bytes -= rejectOverhead + len(rej.Cursor) + len(rej.Message) + len(rej.Values)
		return set.refuse(ctx, err)
	}
	return set.endRecord(ctx, bt, cursor)
}

// checkCursor refuses a cursor the checkpoint cannot hold.
func checkCursor(cursor string) error {
	if strings.IndexByte(cursor, 0) >= 0 || !utf8.ValidString(cursor) {
		return errors.New("pgetl: cursor must be valid UTF-8 without NUL bytes")
	}
	return nil
}

// callerRowJSON renders the values of a row the caller rejected: an object keyed by
// column when there are n values (those Add takes), else as callerArrayJSON.
func (b *BatchSession) callerRowJSON(n int, values []any) string {
	if len(values) == n && n > 0 {
		return b.valuesObject(values)
	}
	return callerArrayJSON(values)
}

// callerArrayJSON renders values as {"values": [...]}, NUL characters removed from
// its strings: an object, so that rejectRowJSON keeps it as it is rather than keying
// the array by column.
func callerArrayJSON(values []any) string {
	return `{"values":` + string(withoutNUL([]byte(valuesJSON(values)))) + `}`
}

// tableName is the table named in the reject table for b's rejects ("" for the
// statement path).
func (b *BatchSession) tableName() string {
	if b.cfg.SQL != "" {
		return ""
	}
	return b.cfg.Table
}
