package pgetl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// BatchSet commits the rows of several tables together: a source record may add a
// row to each (an order header and its line, a fact and its audit row), and a
// batch's rows of all tables commit in one transaction, with one checkpoint, in one
// round trip, tables in the order given to [Session.Batches] (parents before
// children, for foreign keys). Tables may have lookup columns ([LookupColumn]),
// resolved in the same transaction. Each table is loaded as a [BatchSession] loads
// its one table (COPY, or an upsert through a staging table with Key), except
// KeyCache, which a set does not take. A statement (SQL, the statement path) is run
// once per row too, but on the server: its rows are COPYed into a staging table
// and a DO block runs the statement for each, in order, in the batch's transaction
// and message (a dynamic statement, planned per row: slower per row than a
// BatchSession's pipeline of prepared statements, but without a round trip).
//
// Like a BatchSession, it commits a full batch in the background while the caller
// adds rows to the next one, holds no connection between batches, and is not safe
// for concurrent use (its Close is, with Session.Close).
type BatchSet struct {
	s     *Session
	parts []*BatchSession
	cfg   BatchConfig // the set's batch settings: those of the first table

	sendMu sync.Mutex // held while a batch is handed to the flusher
	mu     sync.Mutex // guards cur, err, closed, limit, mark
	cur    *setBatch
	mark   recordMark // Add's, reused
	err    error
	closed bool
	limit  int

	queue chan setReq
	bg    context.Context
	stop  context.CancelFunc
	wg    sync.WaitGroup

	closeOnce sync.Once
	closeErr  error

	pipe *pipeline   // batches in flight
	busy atomic.Bool // one batch at a time: the loop is committing one

	// Tables with IgnoreExisting are COPYed straight into the table while no key
	// conflicts (a key that exists); see mergePlan.
	gateMu sync.Mutex
	gates  []mergeGate
}

// mergeGate decides, for a table with IgnoreExisting, whether a batch goes straight
// into the table (a COPY, the cheap way) or through a staging table merged with ON
// CONFLICT DO NOTHING. Rows whose key exists are rare in the common uses (a header
// written again after a resume, or by another job): a batch is COPYed directly, and
// if its key conflicts (23505) it is rolled back and retried as a merge; the next
// batches then merge too, 1, 2, 4, … up to 64 of them after repeated conflicts, and
// halve that run after each batch that went straight in.
type mergeGate struct {
	left int // batches still to merge
	run  int // how many batches merge after the next conflict, halved on success
}

// setBatch is one batch of a set: per table, the rows whose lookups are resolved
// (direct) and those waiting on a lookup (pending, staging-table tuples).
type setBatch struct {
	direct []*batch
	pend   []*batch
	keys   [][][]any // per table, per pending row: its lookup keys
	rej    []Reject  // rows Add refused
	last   *string
	merge  []bool // per table with IgnoreExisting: merge through a staging table
	// counts is what the last attempt that committed (or may have) did, counted
	// whether all of it is known (see BatchResult.Inserted).
	counts  rowCounts
	counted bool
	seen    int64 // source records added
	rows    int   // table rows buffered
	bytes   int
}

type setReq struct {
	ctx  context.Context
	bt   *setBatch
	done chan error
}

// Batches starts a batch set on s, one table per cfg, in the order their rows must
// be written (parents first). The batch settings (CommitRows, CommitBytes,
// CommitInterval, Rejects, MaxRejects, MaxRejectRatio, OnCommitFunc) are those of
// the first cfg; the others' are ignored. CommitRows counts table rows. ctx bounds
// only this call.
func (s *Session) Batches(ctx context.Context, cfgs ...BatchConfig) (*BatchSet, error) {
	if len(cfgs) == 0 {
		return nil, errors.New("pgetl: Session.Batches needs at least one BatchConfig")
	}
	if err := s.usable(); err != nil {
		return nil, err
	}
	slowStart := cfgs[0].CommitRows == 0
	set := &BatchSet{s: s, queue: make(chan setReq)}
	for i, cfg := range cfgs {
		cfg.Columns = append([]string(nil), cfg.Columns...)
		cfg.Key = append([]string(nil), cfg.Key...)
		cfg.Lookups = append([]LookupColumn(nil), cfg.Lookups...)
		if err := cfg.setDefaults(); err != nil {
			return nil, fmt.Errorf("%w (table %d of the set)", err, i+1)
		}
		if cfg.KeyCache != nil {
			return nil, fmt.Errorf("pgetl: Session.Batches: table %s: a batch set takes no KeyCache", cfg.Table)
		}
		if cfg.SQL != "" && len(cfg.Lookups) > 0 {
			return nil, fmt.Errorf("pgetl: Session.Batches: statement %d of the set: SQL cannot have Lookups", i+1)
		}
		if strings.Contains(cfg.SQL, "$pgetl$") {
			return nil, fmt.Errorf("pgetl: Session.Batches: statement %d of the set: SQL must not contain $pgetl$", i+1)
		}
		b := &BatchSession{s: s, cfg: cfg, m: pgtype.NewMap(), part: true}
		if err := b.describe(ctx); err != nil {
			return nil, err
		}
		if cfg.SQL != "" {
			if err := b.describeStatement(ctx, i); err != nil {
				return nil, err
			}
		}
		set.parts = append(set.parts, b)
	}
	set.cfg = set.parts[0].cfg
	inFlight := set.cfg.InFlight
	if inFlight == 0 {
		inFlight = InFlightDefault
	}
	if inFlight < 1 {
		return nil, fmt.Errorf("pgetl: BatchConfig.InFlight must be at least 1, got %d", inFlight)
	}
	set.pipe = newPipeline(s, inFlight)
	set.gates = make([]mergeGate, len(set.parts))
	set.limit = set.cfg.CommitRows
	if slowStart {
		set.limit = min(set.cfg.CommitRows, slowStartRows)
	}
	set.cur = set.newBatch()
	set.bg, set.stop = context.WithCancel(context.WithoutCancel(ctx))
	s.mu.Lock()
	if s.closed || s.closing {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if s.sets == nil {
		s.sets = map[*BatchSet]struct{}{}
	}
	s.sets[set] = struct{}{} // registered complete: Session.Close may close it from now on
	set.wg.Add(1)
	go set.loop()
	s.mu.Unlock()
	return set, nil
}

func (set *BatchSet) newBatch() *setBatch {
	n := len(set.parts)
	bt := &setBatch{direct: make([]*batch, n), pend: make([]*batch, n), keys: make([][][]any, n)}
	for i := range n {
		bt.direct[i], bt.pend[i] = &batch{}, &batch{}
	}
	return bt
}

// Add adds one source record: rows[i] is its row for the i-th table (values in the
// order of that table's Columns, then its lookups' attributes), nil for none. cursor
// is the record's position in the source, the checkpoint's cursor once its batch
// commits. A value a column cannot take is reported as a *BatchError naming the
// table, row and column, and none of the record's rows is buffered (under
// RejectToTable the row is rejected instead and the record's other rows stay). A
// record one reject too many stops the set as Reject does.
func (set *BatchSet) Add(ctx context.Context, cursor string, rows ...[]any) error {
	if len(rows) > len(set.parts) {
		return fmt.Errorf("pgetl: BatchSet.Add: %d rows for %d tables", len(rows), len(set.parts))
	}
	if strings.IndexByte(cursor, 0) >= 0 || !utf8.ValidString(cursor) {
		return errors.New("pgetl: BatchSet.Add: cursor must be valid UTF-8 without NUL bytes")
	}
	set.mu.Lock()
	if err := set.stateErr(); err != nil {
		set.mu.Unlock()
		return err
	}
	bt := set.cur
	mark := bt.mark(&set.mark)
	for i, values := range rows {
		if values == nil {
			continue
		}
		if err := set.addRow(bt, i, cursor, values); err != nil {
			// The record is refused whole: the rows of its other tables must not
			// commit under the cursor before it (a rerun adds the record again).
			bt.rollback(mark)
			return set.refuse(ctx, err)
		}
	}
	return set.endRecord(ctx, bt, cursor)
}

// refuse returns err, the error of a record Add or Reject refused, and releases
// mu. A record one reject too many (ErrTooManyRejects) stops the set, as it stops a
// BatchSession: the records before it commit (with their rejects and the
// checkpoint, so a rerun resumes at this record), then err becomes the set's
// sticky error.
func (set *BatchSet) refuse(ctx context.Context, err error) error {
	set.mu.Unlock()
	var berr *BatchError
	if !errors.Is(err, ErrTooManyRejects) || !errors.As(err, &berr) {
		return err
	}
	ferr := set.dispatch(ctx, true)
	berr.Committed = ferr == nil
	if ferr != nil {
		berr.Err = fmt.Errorf("%w (the rows before it were not committed: %w)", berr.Err, ferr)
	}
	set.fail(berr)
	return berr
}

// recordMark is where a set batch stood before a record was added.
type recordMark struct {
	direct, pend []batchMark
	keys         []int
	rej, rows    int
	bytes        int
}

// batchMark is where a batch stood.
type batchMark struct{ buf, rows int }

// mark records in m (reused: Add allocates nothing for it) where bt stands.
func (bt *setBatch) mark(m *recordMark) *recordMark {
	m.rej, m.rows, m.bytes = len(bt.rej), bt.rows, bt.bytes
	m.direct, m.pend, m.keys = m.direct[:0], m.pend[:0], m.keys[:0]
	for i := range bt.direct {
		m.direct = append(m.direct, batchMark{len(bt.direct[i].buf), len(bt.direct[i].offs)})
		m.pend = append(m.pend, batchMark{len(bt.pend[i].buf), len(bt.pend[i].offs)})
		m.keys = append(m.keys, len(bt.keys[i]))
	}
	return m
}

// rollback takes the rows added since m back out of bt.
func (bt *setBatch) rollback(m *recordMark) {
	for i := range bt.direct {
		bt.direct[i].truncate(m.direct[i])
		bt.pend[i].truncate(m.pend[i])
		clear(bt.keys[i][m.keys[i]:])
		bt.keys[i] = bt.keys[i][:m.keys[i]]
	}
	clear(bt.rej[m.rej:])
	bt.rej, bt.rows, bt.bytes = bt.rej[:m.rej], m.rows, m.bytes
}

// truncate takes the rows added since m back out of bt (a set's batch: encoded
// rows with their index, cursor and key).
func (bt *batch) truncate(m batchMark) {
	bt.buf, bt.offs = bt.buf[:m.buf], bt.offs[:m.rows]
	bt.idx, bt.cursors = bt.idx[:min(len(bt.idx), m.rows)], bt.cursors[:min(len(bt.cursors), m.rows)]
	if len(bt.keys) > m.rows {
		bt.keys = bt.keys[:m.rows]
	}
}

// stateErr returns why the set takes no rows. Caller holds mu.
func (set *BatchSet) stateErr() error {
	if set.closed {
		return ErrClosed
	}
	return set.err
}

// endRecord ends the source record at cursor, whose rows (or reject) are in bt, and
// hands bt off if it is full. Caller holds mu, which endRecord releases.
func (set *BatchSet) endRecord(ctx context.Context, bt *setBatch, cursor string) error {
	bt.seen++
	bt.last = &cursor
	overBytes := bt.bytes >= set.cfg.CommitBytes
	full := bt.rows >= set.limit || overBytes
	if full && !overBytes && set.limit < set.cfg.CommitRows && set.saturated() {
		// Slow start while every batch slot is taken: keep filling (as a
		// BatchSession does), so a long link does not cost a round trip per step.
		full = bt.rows >= set.cfg.CommitRows
	}
	if full && set.limit < set.cfg.CommitRows {
		set.limit = min(2*max(set.limit, bt.rows), set.cfg.CommitRows)
	}
	set.mu.Unlock()
	if !full {
		return nil
	}
	return set.dispatch(ctx, false)
}

// saturated reports whether a batch handed off now would wait: every slot of the
// pipeline is taken or, one batch at a time, the loop is committing one.
func (set *BatchSet) saturated() bool {
	if !set.pipe.serial() {
		return len(set.pipe.slots) == cap(set.pipe.slots)
	}
	return set.busy.Load()
}

// addRow encodes one row of table i into bt. Caller holds mu.
func (set *BatchSet) addRow(bt *setBatch, i int, cursor string, values []any) error {
	b := set.parts[i]
	idx := set.s.nextRow.Add(1) - 1
	fail := func(col int, err error) error {
		berr := &BatchError{Job: set.s.cfg.Job, Row: idx, Cursor: cursor, Column: b.column(col), Err: fmt.Errorf("table %s: %w", b.cfg.Table, err)}
		if col >= 0 && col < len(values) {
			berr.Value = truncate(fmt.Sprint(values[col]), 64)
		}
		if set.cfg.Rejects != RejectToTable || col < 0 {
			return berr
		}
		bt.rej = append(bt.rej, Reject{Row: idx, Cursor: cursor, SQLState: "22P02", Message: err.Error(), Column: berr.Column,
			Values: valuesJSON(values), Table: b.cfg.Table})
		bt.rows++
		if err := set.checkRejects(bt, nil); err != nil {
			return err
		}
		return nil
	}
	if len(values) != b.nvals {
		return fail(-1, fmt.Errorf("pgetl: got %d values for %d", len(values), b.nvals))
	}
	vals, keys, hit := values, []any(nil), true
	if len(b.lookups) > 0 {
		vals, keys, hit = b.resolveHits(values)
	}
	if hit {
		d := bt.direct[i]
		before := len(d.buf)
		if col, err := b.encode(d, vals); err != nil {
			return fail(col, err)
		}
		d.idx = append(d.idx, idx)
		d.cursors = append(d.cursors, cursor)
		bt.bytes += len(d.buf) - before
	} else {
		p := bt.pend[i]
		before := len(p.buf)
		if col, err := b.encodePending(p, idx, cursor, vals, values); err != nil {
			return fail(col, err)
		}
		p.idx = append(p.idx, idx)
		p.cursors = append(p.cursors, cursor)
		bt.keys[i] = append(bt.keys[i], keys)
		bt.bytes += len(p.buf) - before
	}
	bt.rows++
	return nil
}

// encodePending appends a staging tuple for a row waiting on a lookup: its index and
// cursor, its columns (lookup columns not resolved are NULL), then per lookup its key
// and, for GetOrCreate, its attributes. It returns the failing column of Add's values
// on error.
func (b *BatchSession) encodePending(p *batch, idx int64, cursor string, vals, values []any) (int, error) {
	start := len(p.buf)
	n := 2 + len(vals)
	for _, lc := range b.lookups {
		n++
		if lc.Mode == GetOrCreate {
			n += len(lc.attrOIDs)
		}
	}
	buf := binary.BigEndian.AppendUint16(p.buf, uint16(n))
	put := func(oid uint32, v any) error {
		sp := len(buf)
		buf = append(buf, 0, 0, 0, 0)
		out, err := b.encodeValue(oid, v, buf)
		if err != nil {
			return err
		}
		if out == nil {
			buf = binary.BigEndian.AppendUint32(buf[:sp], 0xffffffff)
		} else {
			buf = out
			binary.BigEndian.PutUint32(buf[sp:], uint32(len(buf)-sp-4))
		}
		return nil
	}
	fail := func(col int, err error) (int, error) {
		p.buf = buf[:start]
		return col, err
	}
	if err := put(pgtype.Int8OID, idx); err != nil {
		return fail(-1, err)
	}
	if err := put(pgtype.TextOID, cursor); err != nil {
		return fail(-1, err)
	}
	for c, v := range vals {
		if err := put(b.oids[c], v); err != nil {
			return fail(c, fmt.Errorf("pgetl: encode %T for column %q: %w", v, b.cfg.Columns[c], err))
		}
	}
	for _, lc := range b.lookups {
		if err := put(lc.keyOID, values[lc.col]); err != nil {
			return fail(lc.col, fmt.Errorf("pgetl: encode %T for key %s.%s: %w", values[lc.col], lc.Source.Table, lc.Source.Key, err))
		}
		if lc.Mode == GetOrCreate {
			for a, oid := range lc.attrOIDs {
				if err := put(oid, values[lc.attrs+a]); err != nil {
					return fail(lc.attrs+a, fmt.Errorf("pgetl: encode %T for %s.%s: %w", values[lc.attrs+a], lc.Source.Table, lc.Source.InsertColumns[a], err))
				}
			}
		}
	}
	p.buf = buf
	p.offs = append(p.offs, int32(start))
	return -1, nil
}

// checkRejects stops the job once its rejects exceed MaxRejects or MaxRejectRatio,
// counting those committed, those of bt and more. Caller holds mu (or owns bt).
func (set *BatchSet) checkRejects(bt *setBatch, more []Reject) error {
	cfg := set.cfg
	if cfg.MaxRejects == 0 && cfg.MaxRejectRatio == 0 {
		return nil
	}
	s := set.s
	s.mu.Lock()
	total := s.cp.Rejects + int64(len(bt.rej)+len(more))
	seen := s.cp.Rows + s.cp.Rejects + int64(bt.rows)
	s.mu.Unlock()
	over := cfg.MaxRejects > 0 && total > cfg.MaxRejects
	if cfg.MaxRejectRatio > 0 && seen >= 1000 && float64(total) > cfg.MaxRejectRatio*float64(seen) {
		over = true
	}
	if !over {
		return nil
	}
	all := append(append([]Reject(nil), bt.rej...), more...)
	last := all[len(all)-1]
	return &BatchError{Job: s.cfg.Job, Row: last.Row, Cursor: last.Cursor, Column: last.Column, SQLState: last.SQLState,
		Err: fmt.Errorf("%w: %d rejected of %d seen (MaxRejects %d, MaxRejectRatio %g): table %s: %s", ErrTooManyRejects, total, seen,
			cfg.MaxRejects, cfg.MaxRejectRatio, last.Table, last.Message)}
}

// Flush commits the buffered rows and waits until every batch handed off before
// has committed (or failed).
func (set *BatchSet) Flush(ctx context.Context) error {
	set.mu.Lock()
	err := set.err
	if set.closed {
		err = ErrClosed
	}
	set.mu.Unlock()
	if err != nil {
		return err
	}
	return set.dispatch(ctx, true)
}

// dispatch hands the current batch to the flusher; with wait, it waits for it.
func (set *BatchSet) dispatch(ctx context.Context, wait bool) error {
	set.sendMu.Lock()
	set.mu.Lock()
	if set.closed {
		set.mu.Unlock()
		set.sendMu.Unlock()
		return ErrClosed
	}
	bt := set.swap()
	set.mu.Unlock()
	req := setReq{ctx: set.bg, bt: bt}
	if wait {
		req.ctx, req.done = ctx, make(chan error, 1)
	}
	select {
	case set.queue <- req:
	case <-ctx.Done():
		set.sendMu.Unlock()
		set.fail(ctx.Err())
		return ctx.Err()
	}
	set.sendMu.Unlock()
	if !wait {
		return nil
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		set.stop()
		return <-req.done
	}
}

// swap takes the current batch if it holds anything. Caller holds mu and sendMu.
func (set *BatchSet) swap() *setBatch {
	if set.cur.seen == 0 {
		return nil
	}
	bt := set.cur
	set.cur = set.newBatch()
	return bt
}

func (set *BatchSet) fail(err error) {
	set.mu.Lock()
	if set.err == nil {
		set.err = err
	}
	set.mu.Unlock()
}

// loop is the flusher: it commits handed-off batches in order, and the buffered
// rows when they are older than CommitInterval, until Close closes the queue.
func (set *BatchSet) loop() {
	defer set.wg.Done()
	var tick <-chan time.Time
	if set.cfg.CommitInterval > 0 {
		t := time.NewTicker(max(set.cfg.CommitInterval/4, time.Millisecond))
		defer t.Stop()
		tick = t.C
	}
	lastCommit := time.Now()
	for {
		select {
		case req, ok := <-set.queue:
			if !ok {
				return
			}
			var err error
			if req.bt != nil {
				set.busy.Store(true)
				err = set.commitNext(req.ctx, req.bt, req.done != nil)
				set.busy.Store(false)
				lastCommit = time.Now()
			} else if req.done != nil {
				set.pipe.wait() // a barrier: every batch submitted is recorded
			}
			if req.done != nil {
				set.mu.Lock()
				if err == nil {
					err = set.err
				}
				set.mu.Unlock()
				req.done <- err
			}
		case <-tick:
			if time.Since(lastCommit) < set.cfg.CommitInterval || !set.sendMu.TryLock() {
				continue
			}
			set.mu.Lock()
			var bt *setBatch
			if set.err == nil && !set.closed {
				bt = set.swap()
			}
			set.mu.Unlock()
			set.sendMu.Unlock()
			lastCommit = time.Now()
			if bt != nil {
				_ = set.commitNext(set.bg, bt, false)
			}
		}
	}
}

// Close commits the buffered rows, waits for the batch in flight and stops the
// flusher. It returns the first error of the set's batches. Close is idempotent;
// Add and Flush after it return ErrClosed.
func (set *BatchSet) Close(ctx context.Context) error {
	set.closeOnce.Do(func() {
		set.mu.Lock()
		err := set.err
		set.mu.Unlock()
		if err == nil {
			err = set.dispatch(ctx, true)
		}
		set.sendMu.Lock()
		set.mu.Lock()
		set.closed = true
		set.mu.Unlock()
		close(set.queue)
		set.sendMu.Unlock()
		set.wg.Wait()
		set.pipe.wait() // batches still in flight (after a failed Flush)
		set.s.mu.Lock()
		delete(set.s.sets, set)
		set.s.mu.Unlock()
		set.stop()
		set.closeErr = err
	})
	return set.closeErr
}

// resolved is what the server reported of a pending row: its lookups' values.
type resolved struct {
	idx  int64
	vals []any // per lookup: the value, or nil when the key is unknown
}

// unitResult is what a unit of work (one batch of the set) committed, recorded by
// record once every unit before it is.
type unitResult struct {
	seq     int64
	cursor  *string
	rows    int64
	rejects []Reject
	sent    int64
	t0      time.Time
	report  []resolved
	bt      *setBatch
	counts  rowCounts
}

// commit commits bt, one batch at a time (InFlight 1): all its tables' rows, its
// rejects and its checkpoint in one transaction, retried as a whole.
func (set *BatchSet) commit(ctx context.Context, bt *setBatch) (err error) {
	s := set.s
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	defer func() {
		if err != nil {
			set.fail(err)
		}
	}()
	if err := set.ready(ctx); err != nil {
		return err
	}
	res, err := set.commitUnit(ctx, bt, s.nextSeq())
	if res != nil {
		set.record(res)
	}
	return err
}

// commitNext commits bt one batch at a time (InFlight 1), or submits it to commit
// while earlier batches are in flight; with wait, it returns once bt and every batch
// before it are recorded.
func (set *BatchSet) commitNext(ctx context.Context, bt *setBatch, wait bool) error {
	if set.pipe.serial() {
		return set.commit(ctx, bt)
	}
	done := set.pipe.submit(ctx, set.ready, func(ctx context.Context, seq int64) (func(), error) {
		res, err := set.commitUnit(ctx, bt, seq)
		if res == nil {
			return nil, err
		}
		return func() { set.record(res) }, err
	}, set.fail)
	if !wait {
		return nil
	}
	<-done
	set.mu.Lock()
	defer set.mu.Unlock()
	return set.err
}

// ready reports why the set cannot commit: its sticky error, the session's state, a
// checkpoint that cannot be re-read. Caller holds s.commitMu with no unit in flight.
func (set *BatchSet) ready(ctx context.Context) error {
	set.mu.Lock()
	err := set.err
	set.mu.Unlock()
	if err != nil {
		return err
	}
	if err := set.s.usable(); err != nil {
		return err
	}
	return set.s.sync(ctx)
}

// commitUnit commits bt as unit seq: retried as a whole; a data error the server
// pins to a row (a COPY line) rejects that row or, under RejectFail, commits the rows
// before it and stops. It returns what committed (nil if nothing) for record.
func (set *BatchSet) commitUnit(ctx context.Context, bt *setBatch, seq int64) (*unitResult, error) {
	s := set.s
	t0 := time.Now()
	skip := map[int64]bool{} // rows rejected while committing
	rejects := append([]Reject(nil), bt.rej...)
	cursor := bt.last
	set.mergePlan(bt)
	for {
		if err := set.checkRejects(&setBatch{}, rejects); err != nil {
			return nil, err
		}
		var report []resolved
		var sent, rows int64
		var unknown []Reject
		err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
			out, r, nbytes, nrows, unk, err := set.attempt(ctx, seq, n, bt, skip, rejects, cursor)
			report, sent, rows, unknown = r, nbytes, nrows, unk
			return out, err
		})
		if err == nil {
			set.mergeDone(bt)
			return &unitResult{seq: seq, cursor: cursor, rows: rows - int64(len(unknown)), rejects: append(rejects, unknown...),
				sent: sent, t0: t0, report: report, bt: bt, counts: bt.knownCounts()}, nil
		}
		pg := pgErrorOf(err)
		if pg != nil && ctx.Err() == nil && set.keyConflict(bt, pg) {
			continue // retry the batch, merging the table whose key conflicted
		}
		var rerr *setRowError
		if ctx.Err() != nil || pg == nil || !isDataError(pg.Code) || !errors.As(err, &rerr) {
			if pg != nil && pg.Code == codeRowsMismatch && len(unknown) > 0 {
				// RejectFail and a key no dimension holds: stop at the first such row.
				rerr = &setRowError{row: unknown[0].Row, reject: unknown[0]}
			} else {
				return nil, &BatchError{Job: s.cfg.Job, Seq: seq, Row: -1, SQLState: sqlState(pg), Err: err}
			}
		}
		rej := rerr.reject
		if set.cfg.Rejects == RejectFail {
			set.pipe.abortAfter(seq)
			return set.failAt(ctx, seq, bt, skip, rejects, rej, pg, t0)
		}
		rejects = append(rejects, rej)
		skip[rej.Row] = true
	}
}

// failAt commits the rows added before rej's row (RejectFail), with the checkpoint at
// the cursor of the last of them, then returns rej as a *BatchError.
func (set *BatchSet) failAt(ctx context.Context, seq int64, bt *setBatch, skip map[int64]bool, rejects []Reject, rej Reject, pg *pgconn.PgError, t0 time.Time) (*unitResult, error) {
	s := set.s
	code := rej.SQLState
	berr := &BatchError{Job: s.cfg.Job, Seq: seq, Row: rej.Row, Cursor: rej.Cursor, Column: rej.Column, SQLState: code,
		Constraint: rej.Constraint, Err: fmt.Errorf("table %s: %s", rej.Table, rej.Message)}
	if pg != nil && pg.Code == code {
		berr.Err = fmt.Errorf("table %s: %w", rej.Table, pg)
	}
	// Rows of rej's source record and after are left out; the checkpoint's cursor is
	// that of the last record before it.
	cut := map[int64]bool{}
	var cursor *string
	lastIdx := int64(-1)
	for p := range set.parts {
		for _, b := range []*batch{bt.direct[p], bt.pend[p]} {
			for i, idx := range b.idx {
				switch {
				case b.cursors[i] == rej.Cursor || idx >= rej.Row:
					cut[idx] = true
				case !skip[idx] && idx > lastIdx:
					cursor, lastIdx = &b.cursors[i], idx
				}
			}
		}
	}
	var keep []Reject
	for _, r := range rejects {
		if r.Row < rej.Row && r.Cursor != rej.Cursor {
			keep = append(keep, r)
			if r.Row > lastIdx {
				cursor, lastIdx = &r.Cursor, r.Row
			}
		}
	}
	if cursor == nil {
		return nil, berr
	}
	for idx := range skip {
		cut[idx] = true
	}
	var report []resolved
	var sent, rows int64
	var unknown []Reject
	err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
		out, r, nbytes, nrows, unk, err := set.attempt(ctx, seq, n, bt, cut, keep, cursor)
		report, sent, rows, unknown = r, nbytes, nrows, unk
		return out, err
	})
	if err != nil {
		return nil, fmt.Errorf("%w (and committing the rows before it failed: %w)", berr, err)
	}
	berr.Committed = true
	return &unitResult{seq: seq, cursor: cursor, rows: rows - int64(len(unknown)), rejects: append(keep, unknown...),
		sent: sent, t0: t0, report: report, bt: bt, counts: bt.knownCounts()}, berr
}

// record accounts for a committed unit: checkpoint, counts, OnCommitFunc, and the
// keys its transaction resolved into the lookups' caches.
func (set *BatchSet) record(r *unitResult) {
	set.s.batchCommitted(r.seq, r.cursor, r.rows, r.rejects, r.sent, r.t0, set.cfg.OnCommitFunc, r.counts)
	set.publish(r.bt, r.report)
}

// publish puts the keys the batch's transaction resolved into the lookups' caches:
// called once the batch is known committed.
func (set *BatchSet) publish(bt *setBatch, report []resolved) {
	if len(report) == 0 {
		return
	}
	byIdx := map[int64]resolved{}
	for _, r := range report {
		byIdx[r.idx] = r
	}
	for p, b := range set.parts {
		for i, idx := range bt.pend[p].idx {
			r, ok := byIdx[idx]
			if !ok {
				continue
			}
			for j, lc := range b.lookups {
				if r.vals[j] != nil && bt.keys[p][i][j] != nil {
					lc.Cache.store(bt.keys[p][i][j], r.vals[j])
				}
			}
		}
	}
}

// setRowError pins a data error to a row of a set batch.
type setRowError struct {
	row    int64
	reject Reject
	err    error
}

func (e *setRowError) Error() string { return e.err.Error() }
func (e *setRowError) Unwrap() error { return e.err }

// attempt makes one attempt at bt without the rows in skip: one simple-query message
// holding BEGIN, the guards, the fence, per table (in order) its COPY or staged
// upsert and the resolution of its pending rows, the rejects and COMMIT, with the COPY
// data behind it. It returns what the server reported of the pending rows, the bytes
// sent, the table rows the fence counted, and the pending rows rejected for an
// unknown key (LookupOnly, under RejectToTable).
func (set *BatchSet) attempt(ctx context.Context, seq int64, n int, bt *setBatch, skip map[int64]bool, rejects []Reject, cursor *string) (out commitOutcome, _ []resolved, _, _ int64, _ []Reject, err error) {
	s := set.s
	conn, release, err := s.acquire(ctx)
	if err != nil {
		return outcomeFailed, nil, 0, 0, nil, err
	}
	defer release()
	pgc := conn.Conn().PgConn()
	if s.cfg.beforeCommit != nil {
		s.cfg.beforeCommit(ctx, seq, n, pgc)
	}
	var q strings.Builder
	var copies []net.Buffers
	var where []copyRows // which rows each COPY carries
	var nbytes, rows int64
	var adjust []string       // per table with pending rows: the count of rows its lookups reject
	plain := map[int]int64{}  // per table inserted straight: its rows sent
	staged := map[int]int64{} // per table merged: its rows staged
	known := true             // whether the counts can be known (no statement table)
	type merged struct{ ins, upd int64 }
	reported := map[int]merged{} // per merged table: what its merge reported
	q.WriteString("BEGIN;")
	q.WriteString(s.guardSQL(seq))
	for p := range set.parts {
		for _, src := range []*batch{bt.direct[p], bt.pend[p]} {
			for _, idx := range src.idx {
				if !skip[idx] {
					rows++
				}
			}
		}
	}
	ctx, tr := s.traceStart(ctx, conn.Conn(), "batch", seq, n, int(rows), len(rejects))
	defer func() { tr.end(outcomeTag(out, false), err) }()
	q.WriteString(s.advanceSQL(seq, cursor, rows, int64(len(rejects))))
	for p, b := range set.parts {
		direct, pend := bt.direct[p], bt.pend[p]
		dsel := selectIdx(direct, skip)
		psel := selectIdx(pend, skip)
		if len(dsel) == 0 && len(psel) == 0 {
			continue
		}
		if b.cfg.SQL != "" {
			known = false
			// The statement path: the rows COPYed into a staging table of the
			// statement's parameter types, then the statement run once per row, in
			// order, on the server (see statementSQL).
			stage := "pgetl_sq_" + strconv.Itoa(p)
			q.WriteString("CREATE TEMP TABLE " + stage + " (" + b.sql.stageCols + ") ON COMMIT DROP;")
			c, starts, nb := b.copyData(direct, dsel, 0)
			for k := range c {
				q.WriteString("COPY " + stage + " FROM STDIN (FORMAT binary);")
				where = append(where, copyRows{part: p, start: starts[k], sel: dsel})
			}
			copies, nbytes = append(copies, c...), nbytes+nb
			q.WriteString(b.statementSQL(stage, p))
			continue
		}
		upsert := len(b.cfg.Key) > 0 && (!b.cfg.IgnoreExisting || bt.merge[p])
		if upsert {
			staged[p] = int64(len(dsel) + len(psel))
		} else {
			plain[p] = int64(len(dsel) + len(psel))
		}
		if upsert {
			q.WriteString(strings.Replace(b.sql.stageStmt, "pgetl_stage", "pgetl_stage_"+strconv.Itoa(p), 1))
		}
		if len(dsel) > 0 {
			c, starts, nb := b.copyData(direct, dsel, 0)
			stmt := b.sql.copyStmt
			switch {
			case upsert:
				stmt = strings.Replace(stmt, "pgetl_stage", "pgetl_stage_"+strconv.Itoa(p), 1)
			case len(b.cfg.Key) > 0: // IgnoreExisting, straight into the table
				stmt = "COPY " + b.table + " (" + b.cols + ") FROM STDIN (FORMAT binary);"
			}
			for k := range c {
				q.WriteString(stmt)
				where = append(where, copyRows{part: p, start: starts[k], sel: dsel})
			}
			copies, nbytes = append(copies, c...), nbytes+nb
		}
		if len(psel) > 0 {
			stage := "pgetl_lk_" + strconv.Itoa(p)
			q.WriteString(b.pendingSQL(stage, seq, set.cfg.Rejects))
			c, starts, nb := b.copyData(pend, psel, 0)
			for k := range c {
				if k > 0 { // pendingSQL holds the first COPY statement
					q.WriteString("COPY " + stage + " FROM STDIN (FORMAT binary);")
				}
				where = append(where, copyRows{part: p, pend: true, start: starts[k], sel: psel})
			}
			q.WriteString(b.resolveSQL(stage, seq, upsert, p, set.cfg.Rejects))
			copies, nbytes = append(copies, c...), nbytes+nb
			adjust = append(adjust, "(SELECT count(*) FROM "+stage+" WHERE "+b.unresolvedCond()+")")
		}
		if upsert {
			q.WriteString(countsSQL(strings.TrimSuffix(strings.Replace(b.sql.merge, "pgetl_stage", "pgetl_stage_"+strconv.Itoa(p), 1), ";"), p))
		}
	}
	if len(adjust) > 0 {
		sum := strings.Join(adjust, " + ")
		fmt.Fprintf(&q, "UPDATE %s.checkpoint SET rows = rows - (%s), rejects = rejects + (%s) WHERE job = %s AND owner = %s AND seq = %d;",
			s.schema, sum, sum, quoteLiteral(s.cfg.Job), quoteLiteral(s.owner), seq)
	}
	q.WriteString(set.rejectSQL(seq, rejects))
	q.WriteString("COMMIT")

	var report []resolved
	var unknown []Reject
	var decodeErr error
	tag, done, err := sendBatchRows(ctx, pgc, q.String(), copies, func(vals [][]byte) {
		if len(vals) == 4 && string(vals[0]) == "pgetl_n" {
			if p, ins, upd, ok := parseCounts(vals[1:]); ok {
				reported[p] = merged{ins, upd}
			}
			return
		}
		if len(vals) < 2 || string(vals[0]) != "pgetl_lk" {
			return // the fence's and other functions' results
		}
		r, unk, derr := set.decodeReport(bt, vals[1:])
		if derr != nil && decodeErr == nil {
			decodeErr = derr
		}
		report = append(report, r)
		if unk != nil {
			unknown = append(unknown, *unk)
		}
	})
	// What this attempt did, should it be the one that commits (or committed, in
	// doubt): the rows of tables inserted straight, the merges' reports, less the
	// rows rejected for an unknown key.
	unk := map[string]int64{}
	for _, r := range unknown {
		unk[r.Table]++
	}
	var cnt rowCounts
	for p, n := range plain {
		cnt.inserted += n - unk[set.parts[p].cfg.Table]
	}
	for p, n := range staged {
		r, ok := reported[p]
		if !ok {
			known = false
			continue
		}
		cnt.inserted, cnt.updated = cnt.inserted+r.ins, cnt.updated+r.upd
		cnt.unchanged += n - unk[set.parts[p].cfg.Table] - r.ins - r.upd
	}
	bt.counts, bt.counted = cnt, known
	if pg := pgErrorOf(err); pg != nil && isDataError(pg.Code) {
		if p, k, ok := statementRow(pg); ok && p < len(set.parts) && set.parts[p].cfg.SQL != "" {
			// A statement of the set failed on its k-th row.
			b := set.parts[p]
			if sel := selectIdx(bt.direct[p], skip); k >= 1 && k <= len(sel) {
				src, i := bt.direct[p], sel[k-1]
				rej := Reject{Row: src.idx[i], Cursor: src.cursors[i], SQLState: pg.Code, Message: pg.Message,
					Column: pg.ColumnName, Constraint: pg.ConstraintName, Table: b.cfg.Table, Values: b.rowJSON(src, i)}
				err = &setRowError{row: rej.Row, reject: rej, err: err}
			}
		} else if line := copyLine(pg); line > 0 && done < len(where) {
			w := where[done]
			if pos := w.start + line - 1; pos < len(w.sel) {
				src := bt.direct[w.part]
				if w.pend {
					src = bt.pend[w.part]
				}
				i := w.sel[pos]
				b := set.parts[w.part]
				rej := Reject{Row: src.idx[i], Cursor: src.cursors[i], SQLState: pg.Code, Message: pg.Message,
					Column: copyColumn(pg), Constraint: pg.ConstraintName, Table: b.cfg.Table}
				if !w.pend {
					rej.Values = b.rowJSON(src, i)
				}
				err = &setRowError{row: rej.Row, reject: rej, err: err}
			}
		}
	}
	if err == nil {
		if decodeErr != nil {
			return outcomeFailed, nil, nbytes, rows, nil, decodeErr
		}
		if tag != "COMMIT" {
			return outcomeFailed, nil, nbytes, rows, nil, fmt.Errorf("pgetl: batch ended with %q, not COMMIT", tag)
		}
		return outcomeCommitted, report, nbytes, rows, unknown, nil
	}
	if pg := pgErrorOf(err); pg != nil && pg.Severity == "ERROR" {
		if pgc.TxStatus() != 'I' {
			_ = pgc.Exec(ctx, "ROLLBACK").Close()
		}
		return outcomeFailed, nil, nbytes, rows, unknown, err
	}
	return outcomeInDoubt, nil, nbytes, rows, nil, err
}

// copyRows says which rows a COPY statement of a set batch carries.
type copyRows struct {
	part  int
	pend  bool
	start int   // position in sel of the COPY's first row
	sel   []int // the rows of the table's direct or pending batch that were sent
}

func selectIdx(b *batch, skip map[int64]bool) []int {
	sel := make([]int, 0, len(b.idx))
	for i, idx := range b.idx {
		if !skip[idx] {
			sel = append(sel, i)
		}
	}
	return sel
}

// pendingSQL creates the staging table of the rows waiting on a lookup and starts
// their (first) COPY.
func (b *BatchSession) pendingSQL(stage string, seq int64, _ RejectPolicy) string {
	var cols, from []string
	for _, c := range b.cfg.Columns {
		cols = append(cols, "t."+pgx.Identifier{c}.Sanitize())
	}
	from = append(from, b.table+" t")
	for j, lc := range b.lookups {
		d := "d" + strconv.Itoa(j)
		from = append(from, lc.table+" "+d)
		cols = append(cols, d+"."+lc.key+" AS pgetl_k"+strconv.Itoa(j))
		if lc.Mode == GetOrCreate {
			for a, ac := range lc.Source.InsertColumns {
				cols = append(cols, d+"."+pgx.Identifier{ac}.Sanitize()+" AS pgetl_a"+strconv.Itoa(j)+"_"+strconv.Itoa(a))
			}
		}
	}
	return "CREATE TEMP TABLE " + stage + " ON COMMIT DROP AS SELECT NULL::bigint AS pgetl_idx, NULL::text AS pgetl_cursor, " +
		strings.Join(cols, ", ") + " FROM " + strings.Join(from, ", ") + " WITH NO DATA;" +
		"COPY " + stage + " FROM STDIN (FORMAT binary);"
}

// unresolvedCond is the condition of a staged row some lookup left unresolved.
func (b *BatchSession) unresolvedCond() string {
	var c []string
	for _, lc := range b.lookups {
		c = append(c, pgx.Identifier{lc.Column}.Sanitize()+" IS NULL")
	}
	return strings.Join(c, " OR ")
}

// resolveSQL resolves the staged rows' lookups (creating missing keys for
// GetOrCreate), reports each row's values to the client, rejects the rows left
// unresolved (or, under RejectFail, fails with PGK01), and inserts the others into the
// table (or its upsert stage).
func (b *BatchSession) resolveSQL(stage string, seq int64, upsert bool, p int, policy RejectPolicy) string {
	var q strings.Builder
	var report []string
	for j, lc := range b.lookups {
		col := pgx.Identifier{lc.Column}.Sanitize()
		k := "pgetl_k" + strconv.Itoa(j)
		if lc.Mode == GetOrCreate {
			cols, sel := []string{lc.key}, []string{k}
			for a, ac := range lc.Source.InsertColumns {
				cols = append(cols, pgx.Identifier{ac}.Sanitize())
				sel = append(sel, "pgetl_a"+strconv.Itoa(j)+"_"+strconv.Itoa(a))
			}
			fmt.Fprintf(&q, "INSERT INTO %s (%s) SELECT DISTINCT ON (%s) %s FROM %s WHERE %s IS NULL AND %s IS NOT NULL ORDER BY %s ON CONFLICT (%s) DO NOTHING;",
				lc.table, strings.Join(cols, ", "), k, strings.Join(sel, ", "), stage, col, k, k, lc.key)
		}
		fmt.Fprintf(&q, "UPDATE %s s SET %s = d.%s FROM %s d WHERE s.%s IS NULL AND d.%s = s.%s;", stage, col, lc.val, lc.table, col, lc.key, k)
		report = append(report, col+"::text")
	}
	// The first column marks the report's rows among the message's results.
	fmt.Fprintf(&q, "SELECT 'pgetl_lk', pgetl_idx, %s FROM %s;", strings.Join(report, ", "), stage)
	cond := b.unresolvedCond()
	if policy == RejectFail {
		fmt.Fprintf(&q, "SELECT %s.expect_rows((SELECT count(*) FROM %s WHERE %s), 0);", b.s.schema, stage, cond)
	} else {
		var msg []string
		for j, lc := range b.lookups {
			msg = append(msg, fmt.Sprintf("WHEN %s IS NULL THEN %s || coalesce(pgetl_k%d::text, 'NULL')", pgx.Identifier{lc.Column}.Sanitize(),
				quoteLiteral("unknown "+lc.Source.Table+"."+lc.Source.Key+" "), j))
		}
		var colName []string
		for _, lc := range b.lookups {
			colName = append(colName, fmt.Sprintf("WHEN %s IS NULL THEN %s", pgx.Identifier{lc.Column}.Sanitize(), quoteLiteral(lc.Column)))
		}
		fmt.Fprintf(&q, "INSERT INTO %s.reject (job, seq, row_index, cursor, sqlstate, message, column_name, table_name, row) SELECT %s, %d, pgetl_idx, pgetl_cursor, '23503', CASE %s END, CASE %s END, %s, to_jsonb(s) - 'pgetl_idx' - 'pgetl_cursor' FROM %s s WHERE %s;",
			b.s.schema, quoteLiteral(b.s.cfg.Job), seq, strings.Join(msg, " "), strings.Join(colName, " "), quoteLiteral(b.cfg.Table), stage, cond)
	}
	target := b.table
	if upsert {
		target = "pgetl_stage_" + strconv.Itoa(p)
	}
	fmt.Fprintf(&q, "INSERT INTO %s (%s) SELECT %s FROM %s WHERE NOT (%s);", target, b.cols, b.cols, stage, cond)
	return q.String()
}

// decodeReport decodes one reported row: a staged row's index and its lookups'
// values (text). A row with an unresolved lookup is returned as a reject too.
func (set *BatchSet) decodeReport(bt *setBatch, vals [][]byte) (resolved, *Reject, error) {
	var r resolved
	if len(vals) < 1 {
		return r, nil, errors.New("pgetl: bad lookup report")
	}
	idx, err := strconv.ParseInt(string(vals[0]), 10, 64)
	if err != nil {
		return r, nil, fmt.Errorf("pgetl: bad lookup report: %w", err)
	}
	r.idx = idx
	b, i := set.pendingRow(bt, idx)
	if b == nil {
		return r, nil, fmt.Errorf("pgetl: lookup report names row %d, which is not in the batch", idx)
	}
	p := indexOfPart(set.parts, b)
	if len(vals) != 1+len(b.lookups) {
		return r, nil, errors.New("pgetl: bad lookup report")
	}
	r.vals = make([]any, len(b.lookups))
	var unk *Reject
	for j, lc := range b.lookups {
		if vals[1+j] == nil {
			if unk == nil {
				unk = &Reject{Row: idx, SQLState: "23503", Column: lc.Column, Table: b.cfg.Table,
					Message: fmt.Sprintf("unknown %s.%s %v", lc.Source.Table, lc.Source.Key, bt.keys[p][i][j])}
			}
			continue
		}
		ptr := reflect.New(lc.Cache.valueGoType())
		if err := b.m.Scan(lc.valOID, pgtype.TextFormatCode, vals[1+j], ptr.Interface()); err != nil {
			return r, nil, fmt.Errorf("pgetl: lookup report for %s: %w", lc.Column, err)
		}
		r.vals[j] = ptr.Elem().Interface()
	}
	if unk != nil {
		unk.Cursor = bt.pend[p].cursors[i]
	}
	return r, unk, nil
}

func indexOfPart(parts []*BatchSession, b *BatchSession) int {
	for i, p := range parts {
		if p == b {
			return i
		}
	}
	return -1
}

// pendingRow finds the table and position of pending row idx in bt.
func (set *BatchSet) pendingRow(bt *setBatch, idx int64) (*BatchSession, int) {
	for p, b := range set.parts {
		ix := bt.pend[p].idx
		i := sort.Search(len(ix), func(i int) bool { return ix[i] >= idx })
		if i < len(ix) && ix[i] == idx {
			return b, i
		}
	}
	return nil, -1
}

// rejectSQL returns the INSERT of rejects into the reject table, or "".
func (set *BatchSet) rejectSQL(seq int64, rejects []Reject) string {
	if len(rejects) == 0 {
		return ""
	}
	s := set.s
	var q strings.Builder
	q.WriteString("INSERT INTO " + s.schema + ".reject (job, seq, row_index, cursor, sqlstate, message, column_name, constraint_name, table_name, row) VALUES ")
	for i, r := range rejects {
		if i > 0 {
			q.WriteString(", ")
		}
		fmt.Fprintf(&q, "(%s, %d, %d, %s, %s, %s, %s, %s, %s, %s::jsonb)", quoteLiteral(s.cfg.Job), seq, r.Row,
			quoteLiteral(r.Cursor), quoteLiteral(r.SQLState), quoteLiteral(strings.ToValidUTF8(r.Message, "?")),
			quoteLiteral(r.Column), quoteLiteral(r.Constraint), quoteLiteral(r.Table), jsonLiteral(r.Values))
	}
	q.WriteString(";")
	return q.String()
}

// jsonLiteral quotes a reject's JSON for the reject table ("null" when empty).
func jsonLiteral(j string) string {
	if j == "" {
		j = "null"
	}
	return quoteLiteral(strings.ToValidUTF8(strings.ReplaceAll(j, "\x00", ""), "?"))
}

// knownCounts returns the counts of bt's committed attempt, or zero when they are
// not all known.
func (bt *setBatch) knownCounts() rowCounts {
	if !bt.counted {
		return rowCounts{}
	}
	return bt.counts
}

// mergePlan decides, per table with IgnoreExisting, whether bt merges (see
// mergeGate). A batch already planned (a retry) keeps its plan.
func (set *BatchSet) mergePlan(bt *setBatch) {
	if len(bt.merge) == len(set.parts) {
		return
	}
	bt.merge = make([]bool, len(set.parts))
	set.gateMu.Lock()
	defer set.gateMu.Unlock()
	for p, b := range set.parts {
		if b.cfg.IgnoreExisting && len(b.cfg.Key) > 0 {
			g := &set.gates[p]
			if g.left > 0 {
				bt.merge[p] = true
				g.left--
			}
		}
	}
}

// keyConflict reports whether pg is a unique violation of a table of bt that went
// straight in under IgnoreExisting (a key that exists): that table then merges, in
// this batch's retry and in the next ones (see mergeGate).
func (set *BatchSet) keyConflict(bt *setBatch, pg *pgconn.PgError) bool {
	if pg.Code != pgerrcode.UniqueViolation {
		return false
	}
	var straight []int
	for p, b := range set.parts {
		if b.cfg.IgnoreExisting && len(b.cfg.Key) > 0 && !bt.merge[p] {
			straight = append(straight, p)
		}
	}
	// The violation names its table (a quoted name, or a table of another schema
	// with the same name, only costs this batch a merge it did not need).
	var hit []int
	for _, p := range straight {
		t := set.parts[p].cfg.Table
		if strings.Contains(t, `"`) || t[strings.LastIndexByte(t, '.')+1:] == pg.TableName {
			hit = append(hit, p)
		}
	}
	if len(hit) == 0 {
		return false
	}
	set.gateMu.Lock()
	defer set.gateMu.Unlock()
	for _, p := range hit {
		bt.merge[p] = true
		g := &set.gates[p]
		g.run = min(max(1, 2*g.run), 64)
		g.left = max(g.left, g.run)
	}
	set.s.count("key_conflict")
	return true
}

// mergeDone halves the merge run of each table bt sent straight in.
func (set *BatchSet) mergeDone(bt *setBatch) {
	set.gateMu.Lock()
	defer set.gateMu.Unlock()
	for p, b := range set.parts {
		if b.cfg.IgnoreExisting && !bt.merge[p] {
			set.gates[p].run /= 2
		}
	}
}

// describeStatement prepares statement part i of a set: its parameters are the
// columns of the staging table its rows are COPYed into (named $1, $2, … in
// rejects and errors), typed as the server resolved them (one round trip).
func (b *BatchSession) describeStatement(ctx context.Context, i int) error {
	var types []string
	err := b.s.pool.QueryRow(ctx, "SELECT coalesce(array_agg(format_type(o, NULL) ORDER BY n), '{}') FROM unnest($1::oid[]) WITH ORDINALITY AS u(o, n)",
		b.oids).Scan(&types)
	if err != nil {
		return fmt.Errorf("pgetl: batch statement %d of the set: parameter types: %w", i+1, err)
	}
	cols := make([]string, len(types))
	b.cfg.Columns = make([]string, len(types))
	for j, t := range types {
		b.cfg.Columns[j] = "$" + strconv.Itoa(j+1)
		cols[j] = "p" + strconv.Itoa(j+1) + " " + t
	}
	b.nvals = len(types)
	b.sql.stageCols = strings.Join(cols, ", ")
	if b.cfg.Table == "" {
		b.cfg.Table = "statement " + strconv.Itoa(i+1)
	}
	return nil
}

// statementSQL runs the set's statement part p once per staged row, in the order
// the rows were added (the staging table is new, so its ctid order is the COPY's),
// with the row's values as the statement's parameters. A failing row re-raises the
// statement's error with "pgetl row <p> <k>" in the hint (k counts from 1), which
// statementRow reads: the other fields (SQLSTATE, message, detail, column,
// constraint, table) are the statement's own.
func (b *BatchSession) statementSQL(stage string, p int) string {
	using := make([]string, b.nvals)
	for j := range using {
		using[j] = "r.p" + strconv.Itoa(j+1)
	}
	args := ""
	if len(using) > 0 {
		args = " USING " + strings.Join(using, ", ")
	}
	return `DO $pgetl$DECLARE r record; k bigint := 0; st text; msg text; det text; hint text; col text; con text; tbl text; sch text;
BEGIN
	FOR r IN SELECT * FROM ` + stage + ` ORDER BY ctid LOOP
		k := k + 1;
		EXECUTE ` + quoteLiteral(b.cfg.SQL) + args + `;
	END LOOP;
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT,
		col = COLUMN_NAME, con = CONSTRAINT_NAME, tbl = TABLE_NAME, sch = SCHEMA_NAME;
	RAISE EXCEPTION USING ERRCODE = st, MESSAGE = msg, DETAIL = det, HINT = 'pgetl row ` + strconv.Itoa(p) + ` ' || k || coalesce('; ' || nullif(hint, ''), ''),
		COLUMN = col, CONSTRAINT = con, TABLE = tbl, SCHEMA = sch;
END$pgetl$;`
}

// statementRow reads the part and row statementSQL put in an error's hint.
func statementRow(pg *pgconn.PgError) (p, k int, ok bool) {
	rest, found := strings.CutPrefix(pg.Hint, "pgetl row ")
	if !found {
		return 0, 0, false
	}
	ps, rest, _ := strings.Cut(rest, " ")
	ks, _, _ := strings.Cut(rest, ";")
	p, err1 := strconv.Atoi(ps)
	k, err2 := strconv.Atoi(ks)
	return p, k, err1 == nil && err2 == nil
}
