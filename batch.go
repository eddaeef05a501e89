package pgetl

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgtype"
)

// Defaults of [BatchConfig].
const (
	// CommitRowsDefault is the number of rows after which a batch is committed,
	// chosen by benchmark (BenchmarkBatchInsert, products rows, 2 cores): the fixed
	// cost of a batch (a COPY statement's start-up, about 2 ms of server time in
	// PostgreSQL 15, the WAL flush of its commit, the checkpoint row) is then a few
	// percent of the COPY of its rows (ratio to one-transaction CopyFrom: 0.84–0.90
	// at 10,000 rows, 0.91–0.94 at 20,000, 0.95 at 50,000). A batch of such rows is
	// about 4 MB; CommitBytes bounds wider rows and CommitInterval slow sources.
	CommitRowsDefault = 50000
	// CommitBytesDefault bounds the encoded bytes of a batch (memory for wide rows).
	CommitBytesDefault = 16 << 20
	// CommitBytesMax bounds CommitBytes: a batch is sent as one message, and the
	// server takes messages up to 1 GiB.
	CommitBytesMax = 256 << 20
	// CommitIntervalDefault is how often buffered rows are committed at least, even
	// when the source is slow: progress is saved and the connection is exercised.
	CommitIntervalDefault = 5 * time.Second
	// InFlightDefault is the number of batches committing at once (see
	// BatchConfig.InFlight).
	InFlightDefault = 2
)

// slowStartRows is the size of a batch session's first batch; the next ones double
// up to CommitRows.
const slowStartRows = 500

// RejectPolicy says what a batch does with a row the server refuses (SQLSTATE classes
// 22 and 23, 42804) or that cannot be encoded for its column.
type RejectPolicy int

const (
	// RejectFail commits the rows before the bad row (with the checkpoint) and stops
	// with a *BatchError naming the row. This is the default.
	RejectFail RejectPolicy = iota
	// RejectToTable writes the bad row to the reject table (<CheckpointSchema>.reject)
	// in the same transaction as the batch's good rows and checkpoint, and goes on.
	RejectToTable
)

// BatchConfig configures a [BatchSession].
type BatchConfig struct {
	// Table is the target table, optionally schema-qualified ("sales.orders"), or
	// an already quoted name such as pgx.Identifier{"Sales", "my.orders"}.Sanitize()
	// (any name holding a double quote is used as is). Required unless SQL is set.
	Table string
	// Columns are the target columns, in the order of the values passed to Add.
	Columns []string
	// Key, if set, makes the batch an upsert on these columns (a subset of Columns
	// with a unique index): rows whose key exists are updated, others inserted. Rows
	// are COPYed into a staging table dropped at commit, then merged with one
	// INSERT … ON CONFLICT (Key) DO UPDATE. Within one batch, the last row of a key
	// wins.
	Key []string
	// KeyCache, with a single-column Key, switches the upsert to its second
	// strategy: rows whose key the cache holds are staged and updated with one
	// UPDATE … FROM (nested loops over the key's index); the others are COPYed
	// straight into the table, which is cheaper than INSERT … ON CONFLICT. If the
	// cache is wrong for a batch (a key it takes for new exists: a unique violation
	// on the key's index; or a key it holds is missing: fewer rows updated than
	// known), the batch is rolled back and retried as a merge, so a stale cache costs
	// one retry, never rows. Keys a batch inserted are added to the cache after it
	// commits. A [Cache] of K to struct{}, preloaded from the table's key column, is
	// a KeySet. It cannot be combined with OnlyChanged.
	KeyCache KeySet
	// OnlyChanged, with Key, updates an existing row only if some column differs
	// (… WHERE target IS DISTINCT FROM source), so re-running a sync does not rewrite
	// unchanged rows.
	OnlyChanged bool
	// SQL, if set, selects the statement path for targets COPY cannot express: SQL
	// runs once per row with the row's values as its arguments ($1, $2, …), all rows
	// of a batch pipelined in one round trip. Columns, if given, name the arguments
	// in errors.
	SQL string

	// CommitRows commits a batch once it holds this many rows. Defaults to
	// CommitRowsDefault, reached after a slow start (the first batch holds 500 rows,
	// each next one twice as many, or more: a batch that reaches its step while
	// every batch in flight is still committing keeps filling until one is done, so
	// a long link does not cost a round trip per step); an explicit value applies
	// from the first batch.
	CommitRows int
	// CommitBytes commits a batch once the bytes it holds reach this many: its
	// encoded rows (on the statement path, the encoded size of the values it keeps)
	// and the rows Add refused under RejectToTable. Defaults to CommitBytesDefault;
	// at most CommitBytesMax.
	CommitBytes int
	// CommitInterval commits buffered rows at least this often, also while the source
	// is idle. Defaults to CommitIntervalDefault; negative disables it.
	CommitInterval time.Duration
	// InFlight is how many batches may be committing at once, each on its own
	// pooled connection: batch n+1 is sent while n commits, its fence waits on the
	// server for n's COMMIT, so batches still commit in order and exactly once. It
	// hides a long link's round trips. A fence whose batch n has not reached the
	// server after 5 s (lock_timeout if shorter: n is being retried, or a pooler's
	// PAUSE holds it) gives up, and n+1 is replayed after n. Defaults to
	// InFlightDefault; 1 commits one batch at a time.
	InFlight int

	// Rejects is the bad-row policy. Defaults to RejectFail.
	Rejects RejectPolicy
	// MaxRejects stops the job (ErrTooManyRejects) once more rows than this were
	// rejected since the job started. Rows the server refuses count when their
	// batch commits; rows Add refuses count at once: the Add of the refused row
	// that exceeds the limit commits the rows before it (with their rejects and
	// the checkpoint, as RejectFail does) and returns a *BatchError wrapping
	// ErrTooManyRejects, which every later call returns. 0 means no absolute
	// limit.
	MaxRejects int64
	// MaxRejectRatio stops the job, as MaxRejects does, once rejected rows exceed
	// this fraction of the rows seen (checked after the first 1,000 rows). 0 means
	// no limit.
	MaxRejectRatio float64

	// OnCommitFunc, if set, is called after each batch commits, from the goroutine
	// that committed it (not the one calling Add), while the session's next commit
	// waits: it must not block for long, nor call the Session's Tx or Finish.
	OnCommitFunc func(BatchResult)

	// IgnoreExisting, with Key, leaves rows whose key exists as they are (INSERT …
	// ON CONFLICT (Key) DO NOTHING): a header row that every detail row of a source
	// record carries is written once, whichever batches its details land in.
	IgnoreExisting bool
	// Lookups resolve columns from natural keys (dimension lookups, get-or-create)
	// inside the batch's transaction; see [LookupColumn]. Only with Session.Batches.
	Lookups []LookupColumn

	// Sync, with Key, makes the batch session a sync of its table: unchanged rows
	// are not sent, and BatchSession.Sweep deletes the rows the source no longer
	// holds; see [SyncConfig]. Only with Session.Batch.
	Sync *SyncConfig
}

// KeySet is the set of keys that exist in an upsert's target table, as seen by
// [BatchConfig.KeyCache].
type KeySet interface {
	// HasKey reports whether key (the key column's value as passed to Add) exists.
	HasKey(key any) bool
	// AddKeys records keys that a committed batch inserted.
	AddKeys(keys []any)
}

// BatchResult describes a committed batch.
type BatchResult struct {
	Job      string        // the job's name
	Seq      int64         // the batch's sequence number
	Rows     int64         // rows committed (for an upsert: inserted or updated, or merged into a later row of the same key)
	Rejects  int64         // rows rejected
	Bytes    int64         // encoded bytes sent
	Cursor   string        // the checkpoint's cursor after this batch
	Duration time.Duration // from the first attempt to the commit, retries included
	Attempts int           // attempts made (1 without retries)
	InDoubt  bool          // an attempt's outcome was in doubt and found committed

	// What the batch did with its rows. Unchanged rows are those an upsert left as
	// they were: not sent at all by a sync (BatchConfig.Sync), or sent and left
	// alone by the merge (IgnoreExisting, OnlyChanged, a Key that is all the
	// Columns). Rows is Inserted + Updated + Merged, plus the Unchanged rows a merge
	// left alone (a sync's unchanged rows are not sent, and not in Rows). A plain insert's rows are all
	// Inserted; an upsert's split is reported by its merge (or known from its
	// KeyCache or sync hashes). The split is left at zero where pgetl does not learn
	// it: the statement path, a batch whose bad rows were isolated, an upsert whose
	// commit was in doubt and whose report was lost, a BatchSet batch with a
	// statement table. For a transaction of BatchSession.Sweep, Deleted.
	Inserted  int64 // rows whose key was new
	Updated   int64 // rows that changed an existing row
	Unchanged int64 // rows equal to (IgnoreExisting: kept as) their key's row
	Merged    int64 // rows followed in the batch by a row of the same key, which won
	Deleted   int64 // rows deleted (or marked) by a sweep
}

// Reject describes a row rejected under RejectToTable, as written to the reject
// table.
type Reject struct {
	Row        int64  // index of the row within the job
	Cursor     string // its cursor
	SQLState   string // why: the server's SQLSTATE (22P02 for a value Add could not encode)
	Message    string // the error message
	Column     string // the column, when known
	Constraint string // the violated constraint, when the server named one
	Values     string // the row as a JSON array
	Table      string // the table the row was meant for (a BatchSet's tables)
}

// BatchSession buffers rows and commits them in batches through its [Session]. Add
// encodes each row at once into the binary COPY format, so a value its column cannot
// take is reported by Add, with its row and column (the statement path checks the
// values the same way and keeps a copy of them). A full batch is committed by a
// goroutine of the BatchSession while the caller goes on adding rows to the next one;
// at most one batch is in flight and batches commit in order. No connection and no
// transaction is held between flushes. Memory is bounded by the batch: a batch is
// full at CommitRows rows or CommitBytes bytes, the rows Add refused included.
//
// A BatchSession is not safe for concurrent use by several goroutines (like
// [pgx.Conn]), except for Close and Stat: Close (or Session.Close, which calls it)
// may run while another goroutine is in Add or Flush. From the moment Close begins,
// Add and Flush return ErrClosed (or their own result, if they got there first);
// the rows Add accepted before are committed by Close, or abandoned if Close's ctx
// ends first, as its error then says. Nothing panics and no goroutine is left.
type BatchSession struct {
	s       *Session
	cfg     BatchConfig
	table   string // quoted
	cols    string // quoted, comma-separated
	oids    []uint32
	m       *pgtype.Map
	scratch []byte // statement path: encoding check
	keyBuf  []byte // encode: the key of the row being encoded
	keyIx   []int  // positions of Key in Columns
	sql     struct {
		copyStmt, copyNew, merge, stageStmt string
		stageCols                           string // a set's statement part: its staging table's columns
		mergeCount                          string // merge, reporting the rows it inserted and updated (see countsSQL)
		update                              string // with a key cache: known rows; append their count and ");"
		copyTID                             string // a sync's COPY of known rows with their ctid (syncCopyData)
	}
	keyIndexes map[string]bool // names of the unique indexes on Key
	lookups    []lookupCol     // resolved BatchConfig.Lookups
	nvals      int             // values Add takes: Columns, then the lookups' attributes
	part       bool            // a table of a BatchSet: the set commits it
	sync       *syncState      // BatchConfig.Sync, else nil

	// handoff is a semaphore (capacity 1), held while a batch is swapped out and
	// handed to the flusher, so batches reach it in the order they were filled. A
	// channel rather than a mutex so that Close can give up waiting when its ctx
	// ends.
	handoff chan struct{}

	mu     sync.Mutex // guards the fields below
	cur    *batch
	err    error // sticky: the first failure; every later call returns it
	closed bool  // Close has begun: Add and Flush return ErrClosed
	limit  int   // rows of the batch being filled: ramps up to CommitRows (slow start)
	// The reject count that MaxRejects and MaxRejectRatio check at Add: the
	// Session's committed rejects and rows seen (its checkpoint's Rejects and
	// Rows+Rejects) as of this batch session's last commit, plus the refused rows
	// and rows seen of the batches handed to the flusher and not committed yet,
	// plus the current batch's. The flusher moves a batch's counts from pending to
	// base in one step, so no row is counted twice or missed.
	rejBase, seenBase     int64
	pendRejects, pendSeen int64

	closeOnce sync.Once
	closeErr  error

	flusher *flusher
	free    chan *batch        // committed batches, for reuse
	pipe    *pipeline          // batches in flight (InFlight > 1), nil with one at a time
	bg      context.Context    // the batch session's own context: background commits; canceled by Close
	stop    context.CancelFunc // cancels bg
}

type batch struct {
	buf     []byte   // binary COPY tuples (no header/trailer)
	offs    []int32  // start of each row in buf
	idx     []int64  // job-wide index of each row
	cursors []string // cursor of each row
	keys    []string // upsert: the encoded key of each row
	keyVals []any    // upsert with a key cache: the key of each row
	known   []bool   // upsert with a key cache: whether the row's key exists
	stale   bool     // upsert with a key cache: the cache was wrong for this batch; merge it
	vals    [][]any  // statement path: the values of each row
	rejects []Reject // rows rejected by Add (encode failures)
	last    *string  // cursor of the last row added (rejected or not): &lastCur, or nil
	lastCur string
	seen    int64    // rows added, rejected included
	record  []func() // what committed, to account for once the batches before it are
	extra   int      // bytes held outside buf: the statement path's values, rejects
	sync    syncBatch
	// counts is what the committed attempt did, as its merge reported it (an
	// upsert without a key cache), and counted says that it reported.
	counts  rowCounts
	counted bool
}

func (bt *batch) reset() {
	clear(bt.vals) // drop the references, not only the length
	clear(bt.keyVals)
	bt.buf, bt.offs, bt.idx, bt.cursors = bt.buf[:0], bt.offs[:0], bt.idx[:0], bt.cursors[:0]
	bt.keys, bt.vals, bt.rejects, bt.last, bt.seen, bt.extra = bt.keys[:0], bt.vals[:0], nil, nil, 0, 0
	bt.keyVals, bt.known, bt.stale, bt.record = bt.keyVals[:0], bt.known[:0], false, nil
	bt.sync.reset()
	bt.counts, bt.counted = rowCounts{}, false
}

func (bt *batch) rows() int { return len(bt.idx) }

// end returns the end offset of row i in buf.
func (bt *batch) end(i int) int {
	if i+1 < len(bt.offs) {
		return int(bt.offs[i+1])
	}
	return len(bt.buf)
}

type flushReq struct {
	ctx  context.Context
	bt   *batch // nil: a barrier
	done chan error
}

func (c *BatchConfig) setDefaults() error {
	if c.SQL == "" && c.Table == "" {
		return errors.New("pgetl: BatchConfig.Table (or SQL) is required")
	}
	if c.SQL == "" && len(c.Columns) == 0 {
		return errors.New("pgetl: BatchConfig.Columns must name at least one column")
	}
	if c.SQL != "" && len(c.Key) > 0 {
		return errors.New("pgetl: BatchConfig.Key cannot be combined with SQL")
	}
	if c.CommitRows == 0 {
		c.CommitRows = CommitRowsDefault
	}
	if c.CommitRows < 1 {
		return fmt.Errorf("pgetl: BatchConfig.CommitRows must be at least 1, got %d", c.CommitRows)
	}
	if c.CommitBytes == 0 {
		c.CommitBytes = CommitBytesDefault
	}
	if c.CommitBytes < 1 || c.CommitBytes > CommitBytesMax {
		return fmt.Errorf("pgetl: BatchConfig.CommitBytes must be between 1 and %d, got %d", CommitBytesMax, c.CommitBytes)
	}
	if c.CommitInterval == 0 {
		c.CommitInterval = CommitIntervalDefault
	}
	if c.MaxRejects < 0 || c.MaxRejectRatio < 0 || c.MaxRejectRatio > 1 {
		return errors.New("pgetl: BatchConfig.MaxRejects must not be negative and MaxRejectRatio must be in [0, 1]")
	}
	if c.Rejects != RejectFail && c.Rejects != RejectToTable {
		return fmt.Errorf("pgetl: BatchConfig.Rejects: unknown policy %d", c.Rejects)
	}
	return nil
}

// Batch starts a batch session on s for cfg. It checks the target now: a table,
// column, key or statement that does not exist is reported here, not at the first
// flush hours later. ctx bounds only this call.
func (s *Session) Batch(ctx context.Context, cfg BatchConfig) (*BatchSession, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	cfg.Columns = append([]string(nil), cfg.Columns...)
	cfg.Key = append([]string(nil), cfg.Key...)
	slowStart := cfg.CommitRows == 0
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	b := &BatchSession{s: s, cfg: cfg, m: pgtype.NewMap(), handoff: make(chan struct{}, 1), free: make(chan *batch, 2)}
	inFlight := cfg.InFlight
	if inFlight == 0 {
		inFlight = InFlightDefault
	}
	if inFlight < 1 {
		return nil, fmt.Errorf("pgetl: BatchConfig.InFlight must be at least 1, got %d", inFlight)
	}
	if inFlight > 1 {
		b.pipe = newPipeline(s, inFlight)
		b.free = make(chan *batch, inFlight+1)
	}
	if cfg.Sync != nil {
		if err := b.checkSync(); err != nil {
			return nil, err
		}
	}
	if err := b.describe(ctx); err != nil {
		return nil, err
	}
	if cfg.Sync != nil {
		if err := b.setupSync(ctx); err != nil {
			return nil, err
		}
	}
	b.cur = &batch{}
	// Slow start, with the default CommitRows: the first batches are small and
	// double up to CommitRows, so the server starts working after a few hundred rows
	// rather than a whole batch (while the first batch is encoded nothing else
	// happens).
	b.limit = b.cfg.CommitRows
	if slowStart { // an explicit CommitRows applies from the first batch
		b.limit = min(b.cfg.CommitRows, slowStartRows)
	}
	b.bg, b.stop = context.WithCancel(context.WithoutCancel(ctx))
	b.flusher = newFlusher(b)
	b.flusher.Start()
	// Register the batch session only now that it is whole: from here Session.Close
	// may close it, from another goroutine.
	s.mu.Lock()
	if s.closed || s.closing {
		s.mu.Unlock()
		b.flusher.Stop()
		b.stop()
		return nil, ErrClosed
	}
	b.rejBase, b.seenBase = s.cp.Rejects, s.cp.Rows+s.cp.Rejects
	if s.batches == nil {
		s.batches = map[*BatchSession]struct{}{}
	}
	s.batches[b] = struct{}{}
	s.mu.Unlock()
	return b, nil
}

// Add buffers one row. cursor is the row's position in the source (page token, file
// offset, last id): the checkpoint's cursor after the row's batch commits, so a job
// restarted after a crash skips rows up to it. values are in the order of
// BatchConfig.Columns; Add keeps none of them (the COPY path encodes them, the
// statement path copies them), so the caller may reuse a buffer once Add returns.
// Add returns a *BatchError, without buffering the row, when a value cannot be
// encoded for its column (under RejectToTable the row is rejected instead, and
// counts toward the batch's size, MaxRejects and MaxRejectRatio at once),
// ErrClosed after Close has begun, and the error of an earlier failed flush.
func (b *BatchSession) Add(ctx context.Context, cursor string, values ...any) error {
	b.mu.Lock()
	if err := b.stateErr(); err != nil {
		b.mu.Unlock()
		return err
	}
	bt := b.cur
	// Every row passed to Add has a job-wide index, refused ones too; the session
	// hands them out, so its batch sessions never share one.
	idx := b.s.nextRow.Add(1) - 1
	if len(values) != len(b.oids) {
		b.mu.Unlock()
		return &BatchError{Job: b.s.cfg.Job, Row: idx, Cursor: cursor,
			Err: fmt.Errorf("pgetl: got %d values for %d columns", len(values), len(b.oids))}
	}
	if strings.IndexByte(cursor, 0) >= 0 || !utf8.ValidString(cursor) {
		b.mu.Unlock()
		return &BatchError{Job: b.s.cfg.Job, Row: idx, Cursor: cursor, Err: errors.New("pgetl: cursor must be valid UTF-8 without NUL bytes")}
	}
	var col int
	var err error
	if b.cfg.SQL != "" {
		// Encode once to check the values (the statement's own encoding happens at
		// flush), so a value its parameter cannot take is reported here. Keep a copy:
		// the caller may reuse a []byte (or any slice, map or pointer) for the next
		// row.
		size := 0
		for i, v := range values {
			if b.scratch, err = b.encodeValue(b.oids[i], v, b.scratch[:0]); err != nil {
				col = i
				break
			}
			size += len(b.scratch)
		}
		if err == nil {
			bt.vals = append(bt.vals, ownValues(values))
			bt.extra += size + valueOverhead*len(values)
		}
	} else {
		col, err = b.encode(bt, values)
	}
	if err != nil {
		berr := &BatchError{Job: b.s.cfg.Job, Row: idx, Cursor: cursor, Column: b.column(col),
			Value: truncate(fmt.Sprint(values[col]), 64), Err: err}
		if b.cfg.Rejects != RejectToTable {
			b.mu.Unlock()
			return berr
		}
		if total, seen, over := b.overRejects(bt); over {
			b.mu.Unlock()
			return b.tooManyRejects(ctx, berr, total, seen)
		}
		if b.sync != nil {
			b.syncRefused(bt, values)
		}
		rej := Reject{Row: idx, Cursor: cursor, SQLState: "22P02", Message: err.Error(), Column: berr.Column, Values: valuesJSON(values)}
		bt.rejects = append(bt.rejects, rej)
		bt.extra += rejectOverhead + len(rej.Cursor) + len(rej.Message) + len(rej.Column) + len(rej.Values)
	} else if b.sync != nil {
		// Pending until its group is looked up: unchanged rows then leave the batch.
		b.syncAdd(bt)
		bt.idx = append(bt.idx, idx)
		bt.cursors = append(bt.cursors, cursor)
		if b.cfg.KeyCache != nil {
			bt.known = append(bt.known, false) // set by syncResolve
		}
		if bt.sync.pending == syncGroup {
			b.syncResolve(bt)
		}
	} else {
		bt.idx = append(bt.idx, idx)
		bt.cursors = append(bt.cursors, cursor)
		if kc := b.cfg.KeyCache; kc != nil {
			k := values[b.keyIx[0]]
			bt.keyVals = append(bt.keyVals, ownValue(k)) // handed to the cache after commit
			bt.known = append(bt.known, kc.HasKey(k))
		}
	}
	// The row is buffered or rejected: its cursor is accounted for, and it takes
	// its place in the batch either way, so a batch of refused rows fills up and
	// commits (their rejects and the checkpoint) like any other.
	bt.seen++
	bt.lastCur = cursor
	bt.last = &bt.lastCur // not &cursor: that would allocate each row
	overBytes := len(bt.buf)+bt.extra >= b.cfg.CommitBytes
	full := b.fill(bt) >= int64(b.limit) || overBytes
	if full && b.sync != nil && bt.sync.pending > 0 {
		b.syncResolve(bt) // its unchanged rows weigh less
		overBytes = len(bt.buf)+bt.extra >= b.cfg.CommitBytes
		full = b.fill(bt) >= int64(b.limit) || overBytes
	}
	if full && !overBytes && b.limit < b.cfg.CommitRows && b.saturated() {
		// Slow start while every batch slot is taken: a batch handed off now would
		// only wait for a slot (and Add with it), so each doubling step would cost a
		// round trip on a long link. Keep filling it, up to CommitRows, until a slot
		// frees: the batch then holds what the source produced meanwhile.
		full = b.fill(bt) >= int64(b.cfg.CommitRows)
	}
	if full && b.limit < b.cfg.CommitRows {
		b.limit = min(2*max(b.limit, int(b.fill(bt))), b.cfg.CommitRows)
	}
	b.mu.Unlock()
	if !full {
		return nil
	}
	return b.dispatch(ctx, false)
}

// saturated reports whether a batch handed off now would wait: every slot of the
// pipeline is taken (InFlight batches in flight, or the flusher waiting for a
// slot), or, one batch at a time, the flusher is committing one.
func (b *BatchSession) saturated() bool {
	if b.pipe != nil {
		return len(b.pipe.slots) == cap(b.pipe.slots)
	}
	return b.flusher.busy.Load()
}

// Estimates of the memory a batch holds besides the bytes it counts: per value the
// statement path keeps (an interface), per reject (the Reject's fields).
const (
	valueOverhead  = 16
	rejectOverhead = 128
)

// overRejects reports whether one more row refused by Add takes the job over
// MaxRejects or MaxRejectRatio, and the counts it found: the rejects committed, those
// of the batches in flight and of bt, and this row; the rows seen likewise. Caller
// must hold mu.
func (b *BatchSession) overRejects(bt *batch) (total, seen int64, over bool) {
	if b.cfg.MaxRejects == 0 && b.cfg.MaxRejectRatio == 0 {
		return 0, 0, false
	}
	total = b.rejBase + b.pendRejects + int64(len(bt.rejects)) + 1
	seen = b.seenBase + b.pendSeen + bt.seen + 1
	over = b.cfg.MaxRejects > 0 && total > b.cfg.MaxRejects
	if b.cfg.MaxRejectRatio > 0 && seen >= 1000 && float64(total) > b.cfg.MaxRejectRatio*float64(seen) {
		over = true
	}
	return total, seen, over
}

// tooManyRejects stops the batch session at the row of berr, which Add refused and
// which is one reject too many: it commits the rows before it (with their rejects
// and the checkpoint, so a rerun resumes at this row, as RejectFail does), then
// makes berr, wrapping ErrTooManyRejects, the session's sticky error.
func (b *BatchSession) tooManyRejects(ctx context.Context, berr *BatchError, total, seen int64) error {
	ferr := b.dispatch(ctx, true)
	berr.Err = fmt.Errorf("%w: %d rejected of %d seen (MaxRejects %d, MaxRejectRatio %g): %w",
		ErrTooManyRejects, total, seen, b.cfg.MaxRejects, b.cfg.MaxRejectRatio, berr.Err)
	berr.Committed = ferr == nil
	if ferr != nil {
		berr.Err = fmt.Errorf("%w (the rows before it were not committed: %w)", berr.Err, ferr)
	}
	b.fail(berr)
	return berr
}

// stateErr returns why the session cannot take rows. Caller must hold mu.
func (b *BatchSession) stateErr() error {
	if b.closed {
		return ErrClosed
	}
	return b.err
}

func (b *BatchSession) column(i int) string {
	if i >= 0 && i < len(b.cfg.Columns) {
		return b.cfg.Columns[i]
	}
	if i >= 0 {
		return fmt.Sprintf("$%d", i+1)
	}
	return ""
}

// Flush commits the buffered rows and waits until every batch handed off before it
// has committed (or failed). It returns ErrClosed once Close has begun.
func (b *BatchSession) Flush(ctx context.Context) error {
	return b.dispatch(ctx, true)
}

// dispatch hands the current batch to the flusher (Add, with a full batch); with
// wait (Flush), it waits for the result of every batch handed off so far.
func (b *BatchSession) dispatch(ctx context.Context, wait bool) error {
	b.mu.Lock()
	err, closed := b.dispatchErr(wait), b.closed
	b.mu.Unlock()
	if err != nil || closed {
		return err
	}
	if err := b.acquire(ctx); err != nil {
		b.fail(err)
		return err
	}
	b.mu.Lock()
	if err := b.dispatchErr(wait); err != nil || b.closed {
		b.mu.Unlock()
		b.release()
		return err
	}
	bt := b.swap()
	b.mu.Unlock()
	// A batch handed off by Add commits in the background, under the batch
	// session's own context (canceled by Close): the ctx of the Add that filled it
	// bounds only the hand-off. Flush waits, so its ctx bounds the commit.
	req := flushReq{ctx: b.bg, bt: bt}
	if wait {
		req.ctx, req.done = ctx, make(chan error, 1)
	}
	err = b.flusher.hand(ctx, req)
	b.release()
	if err != nil {
		b.fail(err) // the batch is lost
		return err
	}
	if !wait {
		return nil
	}
	return b.wait(ctx, req)
}

// dispatchErr returns why dispatch cannot hand off a batch: ErrClosed for Flush
// once Close has begun, the sticky error. For Add after Close began it returns nil:
// Close took the batch, the row of that Add with it, and commits it. Caller must
// hold mu.
func (b *BatchSession) dispatchErr(wait bool) error {
	if b.closed && !wait {
		return nil
	}
	return b.stateErr()
}

// wait returns the result of req, handed to the flusher. If ctx ends first, it
// cancels the batch session's background commits too (one queued before req would
// hold it up) and returns the result, which then is quick.
func (b *BatchSession) wait(ctx context.Context, req flushReq) error {
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		b.stop()
		return <-req.done
	}
}

// acquire takes the hand-off semaphore, or returns ctx's error.
func (b *BatchSession) acquire(ctx context.Context) error {
	select {
	case b.handoff <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// tryAcquire takes the hand-off semaphore if it is free.
func (b *BatchSession) tryAcquire() bool {
	select {
	case b.handoff <- struct{}{}:
		return true
	default:
		return false
	}
}

func (b *BatchSession) release() { <-b.handoff }

// swap takes the current batch if it holds anything and starts a new one; the
// batch's reject counts move to pending (see overRejects). Caller must hold mu and
// the hand-off semaphore.
func (b *BatchSession) swap() *batch {
	if b.cur.seen == 0 {
		return nil
	}
	bt := b.cur
	if b.sync != nil {
		b.syncResolve(bt)
	}
	b.pendRejects += int64(len(bt.rejects))
	b.pendSeen += bt.seen
	// Size the next batch for b.limit rows of the size seen so far, so it does not
	// grow by doubling (COPY path; the statement path keeps values, not bytes).
	rows, size := b.limit, len(bt.buf)
	seen := 0
	if b.sync != nil {
		// A sync's batch keeps only its changed and new rows: size it after the
		// last one (twice during the slow start), and its seen keys likewise.
		mul, div := 9, 8
		if b.limit < b.cfg.CommitRows {
			mul, div = 2, 1
		}
		rows, seen = bt.rows()*mul/div+syncGroup, len(bt.sync.seen)*mul/div
	}
	if n := bt.rows(); n > 0 {
		size = min(len(bt.buf)/n*rows*9/8, b.cfg.CommitBytes+len(bt.buf)/n)
	}
	select {
	case nb := <-b.free:
		nb.reset()
		b.cur = nb
	default:
		b.cur = &batch{}
	}
	if cap(b.cur.buf) < size {
		b.cur.buf = make([]byte, 0, size)
	}
	if cap(b.cur.offs) < rows && b.cfg.SQL == "" {
		b.cur.offs = make([]int32, 0, rows)
	}
	if cap(b.cur.sync.seen) < seen {
		b.cur.sync.seen = make([]byte, 0, seen)
	}
	return bt
}

// fail records the first failure; every later call returns it.
func (b *BatchSession) fail(err error) {
	b.mu.Lock()
	if b.err == nil {
		b.err = err
	}
	b.mu.Unlock()
}

// settle records that a batch holding rejects refused rows of seen rows committed:
// its counts leave pending and the base takes the Session's checkpoint, which now
// holds them (and the rejects the server found in it), in one step under mu.
func (b *BatchSession) settle(rejects, seen int64) {
	s := b.s
	s.mu.Lock()
	rej, rows := s.cp.Rejects, s.cp.Rows
	s.mu.Unlock()
	b.mu.Lock()
	b.rejBase, b.seenBase = rej, rows+rej
	b.pendRejects -= rejects
	b.pendSeen -= seen
	b.mu.Unlock()
}

// Close commits the buffered rows, waits for every batch in flight, and stops the
// flusher. It returns the first error of the session's batches, if any, or ctx's
// error if ctx ended before the buffered rows committed (they are then abandoned:
// the checkpoint stays before them). Close is idempotent and safe for concurrent
// use, also with Add and Flush in another goroutine: once it has begun they
// return ErrClosed. Every call returns the result of the first.
func (b *BatchSession) Close(ctx context.Context) error {
	b.closeOnce.Do(func() { b.closeErr = b.close(ctx) })
	return b.closeErr
}

func (b *BatchSession) close(ctx context.Context) error {
	// Take the hand-off, so that the last batch goes after any batch an Add is
	// handing off now, then refuse Add and Flush from here on.
	err := ctx.Err()
	acquired := false
	if err == nil {
		err = b.acquire(ctx)
		acquired = err == nil
	}
	b.mu.Lock()
	b.closed = true
	if err == nil {
		err = b.err
	}
	var bt *batch
	if err == nil {
		bt = b.swap()
	}
	b.mu.Unlock()
	if err == nil {
		// The last batch (bt may be nil: then a barrier for the batches in flight).
		req := flushReq{ctx: ctx, bt: bt, done: make(chan error, 1)}
		err = b.flusher.hand(ctx, req)
		b.release()
		acquired = false
		if err == nil {
			err = b.wait(ctx, req)
		}
	}
	if acquired {
		b.release()
	}
	// Nothing is left to commit, or it is abandoned: cancel what may still run (a
	// Flush's commit in another goroutine, if ctx ended) and stop the flusher.
	b.stop()
	b.flusher.Stop()
	b.s.mu.Lock()
	delete(b.s.batches, b)
	b.s.mu.Unlock()
	return err
}

// Stat returns the counters of the batch session's Session.
func (b *BatchSession) Stat() Stat { return b.s.Stat() }

// flusher is a batch session's background service: from Start until Stop it
// commits the batches handed to it, one at a time and in the order they were
// handed off, and the buffered rows once they are older than CommitInterval. The
// hand-off channel is never closed: a hand-off after Stop returns ErrClosed, it
// cannot panic. Tests wait on Done and Committed instead of polling.
type flusher struct {
	b         *BatchSession
	queue     chan flushReq // unbuffered: a hand-off completes when the loop takes it
	stop      chan struct{} // closed by Stop
	done      chan struct{} // closed when the loop has returned
	committed chan struct{} // signaled (capacity 1, never blocking) after each batch the loop commits
	busy      atomic.Bool   // the loop is committing a batch (read by saturated)
	once      sync.Once
}

func newFlusher(b *BatchSession) *flusher {
	return &flusher{b: b, queue: make(chan flushReq), stop: make(chan struct{}), done: make(chan struct{}),
		committed: make(chan struct{}, 1)}
}

// Start starts the loop.
func (f *flusher) Start() { go f.run() }

// Stop stops the loop and waits for it: a request the loop took is answered first.
// It is idempotent.
func (f *flusher) Stop() {
	f.once.Do(func() { close(f.stop) })
	<-f.done
}

// Done is closed once the loop has returned.
func (f *flusher) Done() <-chan struct{} { return f.done }

// Committed receives a signal after a batch committed (at most one is pending).
func (f *flusher) Committed() <-chan struct{} { return f.committed }

// hand passes req to the loop. It returns ErrClosed if the flusher is stopped, and
// ctx's error if ctx ends first.
func (f *flusher) hand(ctx context.Context, req flushReq) error {
	select {
	case f.queue <- req:
		return nil
	case <-f.stop:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *flusher) run() {
	defer close(f.done)
	b := f.b
	if b.pipe != nil {
		defer b.pipe.wait() // the batches still in flight end before the flusher does
	}
	var tick <-chan time.Time
	if b.cfg.CommitInterval > 0 {
		t := time.NewTicker(max(b.cfg.CommitInterval/4, time.Millisecond))
		defer t.Stop()
		tick = t.C
	}
	lastCommit := time.Now()
	for {
		select {
		case <-f.stop:
			return
		case req := <-f.queue:
			var err error
			if req.bt != nil {
				f.busy.Store(true)
				_, err = f.commitNext(req.ctx, req.bt, req.done != nil)
				f.busy.Store(false)
				lastCommit = time.Now()
			} else if req.done != nil && b.pipe != nil {
				b.pipe.wait() // a barrier: every batch handed off is accounted for
			}
			if req.done != nil {
				b.mu.Lock()
				if err == nil {
					err = b.err
				}
				b.mu.Unlock()
				req.done <- err
			}
		case <-tick:
			if time.Since(lastCommit) < b.cfg.CommitInterval || !b.tryAcquire() {
				continue
			}
			b.mu.Lock()
			var bt *batch
			if b.err == nil && !b.closed {
				bt = b.swap()
			}
			b.mu.Unlock()
			b.release()
			lastCommit = time.Now()
			if bt != nil {
				f.busy.Store(true)
				_, _ = f.commitNext(b.bg, bt, false)
				f.busy.Store(false)
			}
		}
	}
}

// commitNext commits bt, one batch at a time, or (InFlight > 1) submits it to commit
// while the batches before it are in flight; with wait it returns once bt and every
// batch before it are accounted for.
func (f *flusher) commitNext(ctx context.Context, bt *batch, wait bool) (<-chan struct{}, error) {
	b := f.b
	// Read before the commit: once committed, bt goes back to the free list.
	rejects, seen := int64(len(bt.rejects)), bt.seen
	settled := func() {
		b.settle(rejects, seen)
		select {
		case f.committed <- struct{}{}:
		default:
		}
	}
	if b.pipe == nil {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		defer context.AfterFunc(b.bg, cancel)()
		if err := b.commit(ctx, bt); err != nil {
			return nil, err
		}
		settled()
		return nil, nil
	}
	done := b.pipe.submit(ctx, b.ready, func(ctx context.Context, seq int64) (func(), error) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		defer context.AfterFunc(b.bg, cancel)()
		err := b.commitUnit(ctx, bt, seq)
		if len(bt.record) == 0 {
			return nil, err
		}
		return func() {
			for _, r := range bt.record {
				r()
			}
			if err == nil {
				settled()
				b.recycle(bt)
			}
		}, err
	}, b.fail)
	if !wait {
		return done, nil
	}
	<-done
	b.mu.Lock()
	defer b.mu.Unlock()
	return done, b.err
}
