package pgetl

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// Defaults of [SyncConfig].
const (
	// MaxDeleteRatioDefault is the largest share of the target table a sweep
	// deletes (or marks) unless told otherwise: an empty or truncated source must
	// not wipe the table.
	MaxDeleteRatioDefault = 0.1
	// SweepRowsDefault is the number of rows a sweep deletes per transaction.
	SweepRowsDefault = 10_000
)

// ErrTooManyDeletes is wrapped by the error of [BatchSession.Sweep] when the rows
// missing from the source are more than SyncConfig.MaxDeleteRatio of the table:
// nothing was deleted.
var ErrTooManyDeletes = errors.New("pgetl: sync: too many rows missing from the source")

// SyncConfig makes an upsert batch session ([BatchConfig.Key]) a sync of its target
// table with a source that the job reads in full:
//
//   - Batch preloads a hash of every row of the table (its Columns, as the
//     server's binary COPY sends them, which is what Add encodes). A row whose
//     hash equals its key's is counted as unchanged and not sent. With a
//     single-column Key (and without OnlyChanged), new rows are COPYed into the
//     table and changed ones updated, the sync's cache serving as the KeyCache
//     (a changed row at the ctid the preload found it, if the row there still
//     holds its key, else by key; a row moved since makes its batch retry as a
//     merge); otherwise they are merged as any upsert. Hashes change only when a batch commits (in
//     doubt included). The cache takes 32 to 64 bytes per key (40 at 10M keys),
//     whatever the key's length.
//   - Each batch also commits the keys of all its rows, unchanged ones included,
//     in the sync's seen set (<CheckpointSchema>.sync_seen), so a run killed and
//     rerun remembers the rows read before its cursor.
//   - [BatchSession.Sweep], called once the whole source was read, deletes (or
//     marks) the rows of the table whose key was not seen, in bounded
//     transactions, each fenced like a batch: a sweep killed and rerun deletes
//     exactly the rows missing from the source.
//
// A sync run starts with an empty checkpoint cursor (a new job, or
// SessionConfig.Restart): the seen set of an earlier run of the job is then
// cleared. A run that resumes (cursor set) keeps it. Use a sync batch session as
// the job's only batch session; it cannot be combined with SQL, KeyCache,
// IgnoreExisting or Lookups, nor used in a [BatchSet]. Rows whose key holds a NULL
// are always sent and never swept.
type SyncConfig struct {
	// MarkColumn, if set, makes the sweep set this column to now() on missing rows
	// instead of deleting them (a soft delete, e.g. "deleted_at"); rows already
	// marked are left alone. It must be one of Columns, with nil passed to Add for
	// it, so that a row that comes back is written again with the mark cleared.
	MarkColumn string
	// MaxDeleteRatio is the largest share of the table's rows (unmarked rows,
	// with MarkColumn) that the sweep deletes, rows deleted by an earlier attempt of
	// the same run included; above it Sweep deletes nothing and returns an error
	// wrapping ErrTooManyDeletes. Defaults to MaxDeleteRatioDefault; it must be in
	// [0, 1] (1 lifts the guard).
	MaxDeleteRatio float64
	// SweepRows is how many rows one sweep transaction deletes. Defaults to
	// SweepRowsDefault.
	SweepRows int
}

// SweepResult describes what [BatchSession.Sweep] did.
type SweepResult struct {
	Table          int64 // rows of the table the sweep considered (unmarked rows, with MarkColumn)
	Deleted        int64 // rows deleted (or marked) by this call
	DeletedAlready int64 // rows the run's earlier, interrupted sweeps deleted
	Transactions   int   // transactions committed by this call
}

// rowCounts are what a committed batch did with its rows (see BatchResult.Inserted).
type rowCounts struct {
	inserted, updated, unchanged, merged, deleted int64
}

// syncState is a batch session's sync: its configuration and key cache.
type syncState struct {
	cfg     SyncConfig
	hashes  *rowHashes
	keyCols []int   // positions of the key columns in Columns, in column order (as Add encodes them)
	numCols []int   // positions of the numeric columns: their encoding is made canonical
	numKey  bool    // a key column is numeric
	scratch []byte  // syncAdd's buffer; guarded by BatchSession.mu
	state   []uint8 // syncResolve's; guarded by BatchSession.mu
	markIx  int     // position of MarkColumn in Columns, -1 without
	seenTbl string  // quoted sync_seen table
	// firstSeq is the first batch this batch session committed (0: none yet): the
	// keys of its rows are marked seen in hashes (at Add, or for new keys when
	// their batch commits), so Sweep reads back only the seen keys of earlier,
	// interrupted sessions of the run.
	// Written in commit order by the committing goroutine, read by Sweep after a
	// Flush.
	firstSeq int64
}

// syncBatch is what a batch of a sync holds besides its rows.
type syncBatch struct {
	rowKeys   []uint64 // key hash of each buffered row
	rowHashes []uint64 // row hash of each buffered row
	rowLocs   []uint64 // where the preload found each buffered row's key (packTID), 0 if unknown
	seen      []byte   // key hash of every row added, unchanged and refused ones included: 8 bytes each, big-endian (as the seen set stores them)
	unchanged int64    // rows added that matched their hash (not buffered)
	pending   int      // rows added last whose key syncResolve has not looked up yet
	seenSQL   string   // the INSERT of seenKeys, built once for seenSeq
	seenSeq   int64
	seenHead  []byte // the binary COPY of seen up to its keys, built once for seenDSeq
	seenDSeq  int64
}

func (sb *syncBatch) reset() {
	sb.rowKeys, sb.rowHashes, sb.rowLocs, sb.seen = sb.rowKeys[:0], sb.rowHashes[:0], sb.rowLocs[:0], sb.seen[:0]
	sb.unchanged, sb.pending, sb.seenSQL, sb.seenSeq, sb.seenHead, sb.seenDSeq = 0, 0, "", 0, sb.seenHead[:0], 0
}

// syncDDL creates the seen set's table. Each batch of a sync adds one row (the
// key hashes of its rows, 8 bytes each, stored uncompressed); each sweep
// transaction one row with its count of deleted rows.
func syncDDL(tbl string) string {
	return `CREATE TABLE IF NOT EXISTS ` + tbl + ` (
	job     text NOT NULL,
	seq     bigint NOT NULL,
	keys    bytea,
	deleted bigint NOT NULL DEFAULT 0,
	PRIMARY KEY (job, seq)
);
ALTER TABLE ` + tbl + ` ALTER COLUMN keys SET STORAGE EXTERNAL;`
}

// checkSync checks BatchConfig.Sync before describe, and with a single-column Key
// (and without OnlyChanged) gives the batch session the key-cache strategy, the
// cache being the sync's own: changed rows of known keys are staged and updated,
// new ones COPYed straight into the table.
func (b *BatchSession) checkSync() error {
	cfg := &b.cfg
	sc := cfg.Sync
	switch {
	case len(cfg.Key) == 0:
		return errors.New("pgetl: BatchConfig.Sync needs a Key")
	case cfg.SQL != "":
		return errors.New("pgetl: BatchConfig.Sync cannot be combined with SQL")
	case cfg.KeyCache != nil || cfg.IgnoreExisting || len(cfg.Lookups) > 0:
		return errors.New("pgetl: BatchConfig.Sync cannot be combined with KeyCache, IgnoreExisting or Lookups")
	case b.s.cfg.Incremental:
		// A sync reads its whole source every run: a run that continued after the
		// last one's cursor would see only new rows and sweep the others.
		return errors.New("pgetl: BatchConfig.Sync needs a full read of the source: not with SessionConfig.Incremental (use Restart)")
	case sc.MaxDeleteRatio < 0 || sc.MaxDeleteRatio > 1:
		return fmt.Errorf("pgetl: SyncConfig.MaxDeleteRatio must be in [0, 1], got %g", sc.MaxDeleteRatio)
	case sc.SweepRows < 0:
		return fmt.Errorf("pgetl: SyncConfig.SweepRows must not be negative, got %d", sc.SweepRows)
	}
	if len(cfg.Key) == 1 && !cfg.OnlyChanged && len(cfg.Columns) > 1 {
		cfg.KeyCache = syncKeys{b}
	}
	return nil
}

// syncKeys is the KeySet of a sync batch session: the keys its row hashes hold.
// HasKey is called by Add (for the rows sent), under the batch session's mu.
type syncKeys struct{ b *BatchSession }

// HasKey reports whether the sync's cache holds key (the key column's value).
func (k syncKeys) HasKey(key any) bool {
	b := k.b
	if b.sync == nil {
		return false
	}
	buf := make([]byte, 4, 32)
	out, err := b.encodeValue(b.oids[b.keyIx[0]], key, buf)
	if err != nil || out == nil {
		return false
	}
	binary.BigEndian.PutUint32(out, uint32(len(out)-4))
	_, held := b.sync.hashes.get(keyHash(out))
	return held
}

// AddKeys does nothing: syncCommitted records the keys of committed rows.
func (syncKeys) AddKeys([]any) {}

// setupSync checks cfg.Sync, creates the seen set's table if missing, clears the
// job's seen set if the run starts afresh, and preloads the row hashes. Called by
// Batch after describe.
func (b *BatchSession) setupSync(ctx context.Context) error {
	cfg := &b.cfg
	sc := *cfg.Sync
	if sc.MaxDeleteRatio == 0 {
		sc.MaxDeleteRatio = MaxDeleteRatioDefault
	}
	if sc.SweepRows == 0 {
		sc.SweepRows = SweepRowsDefault
	}
	st := &syncState{cfg: sc, markIx: -1, seenTbl: b.s.schema + ".sync_seen"}
	if sc.MarkColumn != "" {
		if st.markIx = indexOf(cfg.Columns, sc.MarkColumn); st.markIx < 0 {
			return fmt.Errorf("pgetl: SyncConfig.MarkColumn %q is not in Columns", sc.MarkColumn)
		}
	}
	for i := range cfg.Columns {
		isKey := indexOfInt(b.keyIx, i) >= 0
		if isKey {
			st.keyCols = append(st.keyCols, i)
		}
		if b.oids[i] == pgtype.NumericOID {
			st.numCols = append(st.numCols, i)
			st.numKey = st.numKey || isKey
		}
	}
	var exists bool
	if err := b.s.pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", st.seenTbl).Scan(&exists); err != nil {
		return fmt.Errorf("pgetl: sync: seen set table %s: %w", st.seenTbl, err)
	}
	if !exists {
		if _, err := b.s.pool.Exec(ctx, syncDDL(st.seenTbl)); err != nil {
			return fmt.Errorf("pgetl: sync: create seen set table %s: %w", st.seenTbl, err)
		}
	}
	b.s.mu.Lock()
	fresh := b.s.cp.Cursor == ""
	b.s.mu.Unlock()
	if fresh {
		// A new run: the seen set of an earlier run of the job does not count.
		if _, err := b.s.pool.Exec(ctx, "DELETE FROM "+st.seenTbl+" WHERE job = $1", b.s.cfg.Job); err != nil {
			return fmt.Errorf("pgetl: sync: clear the seen set of job %q: %w", b.s.cfg.Job, err)
		}
	}
	var err error
	if st.hashes, err = b.preloadHashes(ctx); err != nil {
		return err
	}
	b.sync = st
	return nil
}

// preloadSplitPages is the table size, in pages, from which the preload reads
// the table in parts, in parallel (PostgreSQL 14 or later, whose TID range scans
// read only their part): the server's binary output of a row costs more than the
// client's hashing of it, so one COPY keeps one server core busy and the client
// waiting. Measured at 1M rows (10,310 pages of 8 kB) with client and server on
// the same 2 cores (both busy either way): one COPY 0.34 s, two parts 0.31 s; a
// server with cores of its own gains more.
const preloadSplitPages = 1024

// preloadHashes reads every row of the target (its Columns, in binary COPY format)
// and returns their hashes by key. A large table is read in up to
// min(GOMAXPROCS, 4, the pool's MaxConns) parts of its pages, each COPY on its own
// connection, hence in its own snapshot: a row that another writer moves while the
// parts run may be read twice (the entries agree on the key; a stale ctid is
// retried as a merge) or missed (the key then looks new: its insert meets the key
// and is retried as a merge, and the sweep cannot delete it this run), as rows
// written after a single COPY's snapshot would be.
func (b *BatchSession) preloadHashes(ctx context.Context) (*rowHashes, error) {
	var n, pages int64
	var version int
	if err := b.s.pool.QueryRow(ctx, "SELECT reltuples::bigint, pg_relation_size(oid) / current_setting('block_size')::int, "+
		"current_setting('server_version_num')::int FROM pg_class WHERE oid = $1::regclass", b.table).Scan(&n, &pages, &version); err != nil {
		return nil, fmt.Errorf("pgetl: sync: size of %s: %w", b.cfg.Table, err)
	}
	t := newRowHashes(int(max(n, 0)))
	keyCols := make([]int, 0, len(b.keyIx))
	for i := range b.cfg.Columns {
		if indexOfInt(b.keyIx, i) >= 0 {
			keyCols = append(keyCols, i)
		}
	}
	parts := 1
	if pages >= preloadSplitPages && version >= 140000 {
		parts = max(1, min(runtime.GOMAXPROCS(0), 4, int(b.s.pool.Config().MaxConns)))
	}
	// The row's ctid first: where Sweep will find it (it is not hashed).
	sql := "COPY (SELECT ctid, " + b.cols + " FROM " + b.table
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, parts)
	for p := range int64(parts) {
		q := sql + ") TO STDOUT (FORMAT binary)"
		if parts > 1 {
			// The last part is open-ended: it reads pages added since.
			q = sql + fmt.Sprintf(" WHERE ctid >= '(%d,0)'", pages*p/int64(parts))
			if p < int64(parts)-1 {
				q += fmt.Sprintf(" AND ctid < '(%d,0)'", pages*(p+1)/int64(parts))
			}
			q += ") TO STDOUT (FORMAT binary)"
		}
		go func() {
			err := b.preloadPart(ctx, t, parts > 1, q, keyCols)
			if err != nil {
				cancel()
			}
			errs <- err
		}()
	}
	var err error
	for range parts {
		if e := <-errs; err == nil || errors.Is(err, context.Canceled) && e != nil {
			err = e
		}
	}
	if err != nil {
		return nil, fmt.Errorf("pgetl: sync: preload row hashes of %s: %w", b.cfg.Table, err)
	}
	return t, nil
}

// preloadPart runs sql, a COPY of ctid and Columns of the target, and puts each
// row's hashes into t (under t.mu if shared, other parts putting too).
func (b *BatchSession) preloadPart(ctx context.Context, t *rowHashes, shared bool, sql string, keyCols []int) error {
	var key []byte
	// Entries are put in groups, in a tight loop whose cache misses the CPU
	// overlaps (see syncGroup).
	var group [syncGroup]hashSlot
	g := 0
	putGroup := func() {
		if shared {
			t.mu.Lock()
			defer t.mu.Unlock()
		}
		for _, e := range group[:g] {
			t.put(e.key, e.row, e.loc)
		}
		g = 0
	}
	err := b.copyOut(ctx, sql, func(tuple []byte) error {
		if len(tuple) < 12 || binary.BigEndian.Uint32(tuple[2:]) != 6 {
			return errors.New("pgetl: unexpected ctid in the binary COPY stream")
		}
		loc := packTID(tuple[6:12])
		// tuple[10:] is a tuple of Columns but for its field count (tupleKey skips it).
		var null bool
		if len(keyCols) == 1 {
			key, null = tupleField(tuple[10:], keyCols[0]) // no copy
		} else {
			key, null = tupleKey(tuple[10:], keyCols, key[:0])
		}
		if null {
			return nil // never matched, never swept
		}
		group[g] = hashSlot{key: keyHash(key), row: rowHash(tuple[12:]), loc: loc}
		if g++; g == len(group) {
			putGroup()
		}
		return nil
	})
	putGroup()
	return err
}

// copyOut runs sql, a COPY … TO STDOUT (FORMAT binary), and hands each tuple (from
// its field count on, as Add encodes rows) to fn, which must not keep it.
func (b *BatchSession) copyOut(ctx context.Context, sql string, fn func(tuple []byte) error) error {
	conn, release, err := b.s.acquire(ctx)
	if err != nil {
		return err
	}
	defer release()
	w := &tupleWriter{fn: fn}
	if _, err := conn.Conn().PgConn().CopyTo(ctx, w, sql); err != nil {
		return err
	}
	if w.err != nil {
		return w.err
	}
	if !w.done {
		return errors.New("pgetl: binary COPY stream ended without its trailer")
	}
	return nil
}

// tupleWriter parses a binary COPY stream written to it in pieces of any size.
type tupleWriter struct {
	fn     func([]byte) error
	buf    []byte
	header bool
	done   bool
	err    error
}

func (w *tupleWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	data := p
	if len(w.buf) > 0 {
		w.buf = append(w.buf, p...)
		data = w.buf
	}
	rest, err := w.parse(data)
	if err != nil {
		w.err = err
		return 0, err
	}
	w.buf = append(w.buf[:0], rest...)
	return len(p), nil
}

// parse consumes the complete parts of data and returns the rest.
func (w *tupleWriter) parse(data []byte) ([]byte, error) {
	if !w.header {
		if len(data) < len(copyHeader) { // signature, flags, extension length
			return data, nil
		}
		if !bytes.Equal(data[:11], copyHeader[:11]) {
			return nil, errors.New("pgetl: not a binary COPY stream")
		}
		ext := int(binary.BigEndian.Uint32(data[15:19]))
		if len(data) < 19+ext {
			return data, nil
		}
		data, w.header = data[19+ext:], true
	}
	for len(data) >= 2 && !w.done {
		n := int(int16(binary.BigEndian.Uint16(data)))
		if n == -1 {
			w.done = true
			return nil, nil
		}
		p := 2
		for range n {
			if len(data) < p+4 {
				return data, nil
			}
			l := int(int32(binary.BigEndian.Uint32(data[p:])))
			p += 4
			if l > 0 {
				p += l
			}
		}
		if len(data) < p {
			return data, nil
		}
		if err := w.fn(data[:p]); err != nil {
			return nil, err
		}
		data = data[p:]
	}
	return data, nil
}

// tupleKey appends the key bytes of tuple (fields cols, each with its length, as
// encode builds a row's key) to dst; null reports a NULL among them.
func tupleKey(tuple []byte, cols []int, dst []byte) (key []byte, null bool) {
	p, c, k := 2, 0, 0
	for k < len(cols) && p+4 <= len(tuple) {
		l := int(int32(binary.BigEndian.Uint32(tuple[p:])))
		end := p + 4 + max(l, 0)
		if c == cols[k] {
			if l < 0 {
				null = true
			}
			dst = append(dst, tuple[p:end]...)
			k++
		}
		p, c = end, c+1
	}
	return dst, null
}

// tupleField returns field col of tuple with its length prefix (as encode builds a
// one-column key), without copying; null reports a NULL or a short tuple.
func tupleField(tuple []byte, col int) (field []byte, null bool) {
	p := 2
	for c := 0; p+4 <= len(tuple); c++ {
		l := int(int32(binary.BigEndian.Uint32(tuple[p:])))
		end := p + 4 + max(l, 0)
		if c == col {
			return tuple[p:min(end, len(tuple))], l < 0
		}
		p = end
	}
	return nil, true
}

// packTID packs a tid's binary form (block uint32, offset uint16) into a nonzero
// uint64.
func packTID(b []byte) uint64 {
	return (uint64(binary.BigEndian.Uint32(b))<<16 | uint64(binary.BigEndian.Uint16(b[4:]))) + 1
}

// tidArray returns the text form of an array of the tids packed in locs.
func tidArray(locs []uint64) string {
	var q strings.Builder
	q.Grow(16 * len(locs))
	q.WriteByte('{')
	for i, l := range locs {
		if i > 0 {
			q.WriteByte(',')
		}
		l--
		q.WriteString(`"(`)
		q.WriteString(strconv.FormatUint(l>>16, 10))
		q.WriteByte(',')
		q.WriteString(strconv.FormatUint(l&0xffff, 10))
		q.WriteString(`)"`)
	}
	q.WriteByte('}')
	return q.String()
}

// syncGroup is how many rows of a sync Add encodes and hashes before it looks them
// up in the key cache, together (syncResolve). The cache is a table of tens of
// megabytes, so nearly every lookup misses the CPU's caches: one at a time, each
// between two rows' encoding, a lookup waited the full memory latency (about 145 ns
// per row at 1M keys); in a tight loop over a group the CPU overlaps the misses
// (about 30 ns per row; 1M lookups took 0.29 s of CPU, now 0.06 s).
const syncGroup = 64

// syncAdd handles the row just encoded as the last of bt: it makes its numerics
// canonical, hashes its key and tuple, and records its key as seen. The row stays
// in the batch, pending, until syncResolve looks the group up. Caller must hold
// mu.
func (b *BatchSession) syncAdd(bt *batch) {
	st, sb := b.sync, &bt.sync
	last := len(bt.offs) - 1
	key := b.keyBuf // encode's, of this row; its key in bt.keys is set by syncResolve
	sb.pending++
	if len(key) == 0 { // a NULL in the key: always sent, never swept
		sb.rowKeys = append(sb.rowKeys, 0)
		sb.rowHashes = append(sb.rowHashes, 0)
		sb.rowLocs = append(sb.rowLocs, 0)
		return
	}
	start := int(bt.offs[last])
	if len(st.numCols) > 0 && !numericsCanonical(bt.buf[start:], st.numCols) {
		// pgx encodes a numeric with trailing zero digits that the server drops
		// (1234.00 as 1234|0000): hash and send the server's form. (appendFast's
		// numerics are canonical already.)
		st.scratch = canonNumerics(bt.buf[start:], st.numCols, st.scratch[:0])
		bt.buf = append(bt.buf[:start], st.scratch...)
		if st.numKey {
			key, _ = tupleKey(bt.buf[start:], st.keyCols, key[:0])
			b.keyBuf = key
		}
	}
	kh := keyHash(key)
	sb.seen = binary.BigEndian.AppendUint64(sb.seen, kh)
	sb.rowKeys = append(sb.rowKeys, kh)
	sb.rowHashes = append(sb.rowHashes, rowHash(bt.buf[start+2:]))
	sb.rowLocs = append(sb.rowLocs, 0)
}

// syncResolve looks up the pending rows of bt (the last ones added) in the key
// cache, in order: each key is marked seen; a row whose hash equals its key's is
// taken back out of the batch (unchanged); a changed row's entry is marked in
// flight, and the row learns where the preload found its key. Seen now: should
// the batch not commit, the batch session fails, and Sweep (which flushes first)
// never runs on these marks. Caller must hold mu.
func (b *BatchSession) syncResolve(bt *batch) {
	sb := &bt.sync
	n := sb.pending
	if n == 0 {
		return
	}
	sb.pending = 0
	first := len(bt.offs) - n
	state := slices.Grow(b.sync.state[:0], n)[:n] // per pending row: 0 new, 1 known, 2 unchanged
	clear(state)
	b.sync.state = state
	t := b.sync.hashes
	t.mu.Lock()
	for i := first; i < len(bt.offs); i++ {
		if kh := sb.rowKeys[i]; kh != 0 {
			held, unchanged, loc := t.check(kh, sb.rowHashes[i])
			switch {
			case unchanged:
				state[i-first] = 2
			case held:
				state[i-first], sb.rowLocs[i] = 1, loc
			}
		}
	}
	t.mu.Unlock()
	known := b.cfg.KeyCache != nil
	w, pos := first, len(bt.buf)
	if first < len(bt.offs) {
		pos = int(bt.offs[first])
	}
	for i := first; i < len(bt.offs); i++ {
		if state[i-first] == 2 {
			sb.unchanged++
			continue
		}
		start, end := int(bt.offs[i]), bt.end(i)
		if w != i {
			copy(bt.buf[pos:], bt.buf[start:end])
			bt.offs[w], bt.idx[w], bt.cursors[w] = int32(pos), bt.idx[i], bt.cursors[i]
			sb.rowKeys[w], sb.rowHashes[w], sb.rowLocs[w] = sb.rowKeys[i], sb.rowHashes[i], sb.rowLocs[i]
		}
		bt.keys[w] = ""
		if sb.rowKeys[w] != 0 {
			k, _ := tupleKey(bt.buf[pos:pos+end-start], b.sync.keyCols, b.keyBuf[:0])
			bt.keys[w], b.keyBuf = string(k), k
		}
		if known {
			bt.known[w] = state[i-first] == 1
		}
		pos += end - start
		w++
	}
	clear(bt.keys[w:])
	clear(bt.cursors[w:])
	bt.buf, bt.offs, bt.keys, bt.idx, bt.cursors = bt.buf[:pos], bt.offs[:w], bt.keys[:w], bt.idx[:w], bt.cursors[:w]
	sb.rowKeys, sb.rowHashes, sb.rowLocs = sb.rowKeys[:w], sb.rowHashes[:w], sb.rowLocs[:w]
	if known {
		bt.known = bt.known[:w]
	}
}

// syncCopyData returns the binary COPY streams of rows sel of bt (known keys of a
// sync) for b.sql.copyTID: each tuple with the ctid its key's row had at the
// preload first (NULL if unknown), and the position in sel of each stream's first
// row, as copyData.
func (b *BatchSession) syncCopyData(bt *batch, sel []int) ([]net.Buffers, []int, int64) {
	chunk := copyChunkRows(len(sel))
	var copies []net.Buffers
	var starts []int
	var n int64
	for pos := 0; pos < len(sel) || copies == nil; pos += chunk {
		part := sel[pos:min(pos+chunk, len(sel))]
		d := append([]byte(nil), copyHeader...)
		for _, i := range part {
			row := bt.buf[bt.offs[i]:bt.end(i)]
			d = binary.BigEndian.AppendUint16(d, binary.BigEndian.Uint16(row)+1)
			if loc := bt.sync.rowLocs[i]; loc == 0 {
				d = binary.BigEndian.AppendUint32(d, 0xFFFFFFFF)
			} else {
				loc--
				d = binary.BigEndian.AppendUint32(d, 6)
				d = binary.BigEndian.AppendUint32(d, uint32(loc>>16))
				d = binary.BigEndian.AppendUint16(d, uint16(loc))
			}
			d = append(d, row[2:]...)
		}
		d = append(d, copyTrailer...)
		copies = append(copies, net.Buffers{d})
		starts = append(starts, pos)
		n += int64(len(d))
	}
	return copies, starts, n
}

// numericsCanonical reports whether the numeric values of columns cols of tuple
// are in the server's form already (see canonNumerics): no leading or trailing zero
// digits, zero with weight 0 and a positive sign.
func numericsCanonical(tuple []byte, cols []int) bool {
	p, k := 2, 0
	for c := 0; p+4 <= len(tuple) && k < len(cols); c++ {
		l := int(int32(binary.BigEndian.Uint32(tuple[p:])))
		end := p + 4 + max(l, 0)
		if cols[k] == c {
			k++
			if l >= 8 && end <= len(tuple) {
				v := tuple[p+4 : end]
				nd := int(binary.BigEndian.Uint16(v))
				if binary.BigEndian.Uint16(v[4:]) != 0xC000 && len(v) == 8+2*nd { // not NaN, well formed
					if nd == 0 {
						if binary.BigEndian.Uint16(v[2:]) != 0 || binary.BigEndian.Uint16(v[4:]) != 0 {
							return false
						}
					} else if v[8] == 0 && v[9] == 0 || v[6+2*nd] == 0 && v[7+2*nd] == 0 {
						return false
					}
				}
			}
		}
		p = end
	}
	return true
}

// canonNumerics appends tuple to dst with the numeric values of columns cols in
// the form the server sends them: no leading or trailing zero digits (base 10,000),
// zero with weight 0 and a positive sign.
func canonNumerics(tuple []byte, cols []int, dst []byte) []byte {
	dst = append(dst, tuple[:2]...)
	p, k := 2, 0
	for c := 0; p+4 <= len(tuple); c++ {
		l := int(int32(binary.BigEndian.Uint32(tuple[p:])))
		end := p + 4 + max(l, 0)
		if k < len(cols) && cols[k] == c {
			k++
			if l >= 8 {
				v := tuple[p+4 : end]
				nd := int(binary.BigEndian.Uint16(v))
				weight := int16(binary.BigEndian.Uint16(v[2:]))
				sign, dscale := binary.BigEndian.Uint16(v[4:]), binary.BigEndian.Uint16(v[6:])
				if sign != 0xC000 && len(v) == 8+2*nd { // not NaN, well formed
					digits := v[8:]
					for nd > 0 && digits[0] == 0 && digits[1] == 0 {
						digits, nd, weight = digits[2:], nd-1, weight-1
					}
					for nd > 0 && digits[2*nd-2] == 0 && digits[2*nd-1] == 0 {
						nd--
					}
					if nd == 0 {
						weight, sign = 0, 0
					}
					dst = binary.BigEndian.AppendUint32(dst, uint32(8+2*nd))
					dst = binary.BigEndian.AppendUint16(dst, uint16(nd))
					dst = binary.BigEndian.AppendUint16(dst, uint16(weight))
					dst = binary.BigEndian.AppendUint16(dst, sign)
					dst = binary.BigEndian.AppendUint16(dst, dscale)
					dst = append(dst, digits[:2*nd]...)
					p = end
					continue
				}
			}
		}
		dst = append(dst, tuple[p:end]...)
		p = end
	}
	return dst
}

// syncUnchangedWeight is how many unchanged rows of a sync weigh as much as one
// row sent, in a batch's size against CommitRows: an unchanged row costs the batch
// only its 8-byte key hash, so a re-sync that changes little commits a few large
// batches rather than many whose fixed costs (a transaction, a commit's WAL flush)
// would be most of its work. CommitInterval still bounds the time between commits.
const syncUnchangedWeight = 8

// fill returns how full bt is, in rows, against the batch size. Caller must hold
// mu.
func (b *BatchSession) fill(bt *batch) int64 {
	if b.sync == nil {
		return bt.seen
	}
	u := bt.sync.unchanged
	return bt.seen - u + (u+syncUnchangedWeight-1)/syncUnchangedWeight
}

// syncRefused records the key of a row Add refused (a value its column cannot
// take) as seen, if the key's values encode: the row is in the source, so the
// sweep must not delete it. Caller must hold mu.
func (b *BatchSession) syncRefused(bt *batch, values []any) {
	var key []byte
	for _, i := range b.sync.keyCols {
		sp := len(key)
		key = append(key, 0, 0, 0, 0)
		out, err := b.encodeValue(b.oids[i], values[i], key)
		if err != nil || out == nil {
			return
		}
		key = out
		binary.BigEndian.PutUint32(key[sp:], uint32(len(key)-sp-4))
	}
	kh := keyHash(key)
	bt.sync.seen = binary.BigEndian.AppendUint64(bt.sync.seen, kh)
	t := b.sync.hashes
	t.mu.Lock()
	t.markSeen(kh)
	t.mu.Unlock()
}

// seenSQL returns the statement that adds bt's seen keys to the seen set, in the
// transaction of batch seq, after its fence ("" without a sync).
func (b *BatchSession) seenSQL(bt *batch, seq int64) string {
	if b.sync == nil {
		return ""
	}
	sb := &bt.sync
	if sb.seenSQL == "" || sb.seenSeq != seq {
		var q strings.Builder
		q.Grow(len(b.sync.seenTbl) + 80 + 2*len(sb.seen))
		q.WriteString("INSERT INTO " + b.sync.seenTbl + " (job, seq, keys) VALUES (" + quoteLiteral(b.s.cfg.Job) + ", " +
			strconv.FormatInt(seq, 10) + ", '\\x")
		q.WriteString(hex.EncodeToString(sb.seen))
		q.WriteString("'::bytea);")
		sb.seenSQL, sb.seenSeq = q.String(), seq
	}
	return sb.seenSQL
}

// seenCopy returns the COPY statement and data that add bt's seen keys to the seen
// set in the transaction of batch seq (the batch path's form of seenSQL: binary,
// no parsing of a literal).
func (b *BatchSession) seenCopy(bt *batch, seq int64) (string, net.Buffers) {
	sb := &bt.sync
	if len(sb.seenHead) == 0 || sb.seenDSeq != seq {
		job := b.s.cfg.Job
		d := append(sb.seenHead[:0], copyHeader...)
		d = binary.BigEndian.AppendUint16(d, 3)
		d = binary.BigEndian.AppendUint32(d, uint32(len(job)))
		d = append(d, job...)
		d = binary.BigEndian.AppendUint32(d, 8)
		d = binary.BigEndian.AppendUint64(d, uint64(seq))
		sb.seenHead, sb.seenDSeq = binary.BigEndian.AppendUint32(d, uint32(len(sb.seen))), seq
	}
	// The keys go as they are, not copied.
	return "COPY " + b.sync.seenTbl + " (job, seq, keys) FROM STDIN (FORMAT binary);", net.Buffers{sb.seenHead, sb.seen, copyTrailer}
}

// syncCommitted updates the row hashes with rows sel of bt, which committed, and
// returns the batch's counts; rows is what the batch committed (sel and the rows
// merged into a later row of their key). Called in commit order.
func (b *BatchSession) syncCommitted(seq int64, bt *batch, sel []int, rows int64) rowCounts {
	if b.sync == nil {
		return rowCounts{}
	}
	sb := &bt.sync
	c := rowCounts{unchanged: sb.unchanged, merged: rows - int64(len(sel))}
	t := b.sync.hashes
	t.mu.Lock()
	defer t.mu.Unlock()
	if b.sync.firstSeq == 0 {
		b.sync.firstSeq = seq
	}
	for _, i := range sel {
		if sb.rowKeys[i] == 0 {
			c.inserted++ // a NULL key never conflicts
			continue
		}
		if t.set(sb.rowKeys[i], sb.rowHashes[i]|rowSeen) { // new keys are seen too
			c.updated++
		} else {
			c.inserted++
		}
	}
	return c
}

// recordCommit accounts for a committed batch: the sync's hashes and counts, the
// checkpoint and the batch's result, the key cache. Called in commit order.
func (b *BatchSession) recordCommit(seq int64, bt *batch, cursor *string, sel []int, rows int64, rejects []Reject, sent int64, t0 time.Time) {
	c := b.syncCommitted(seq, bt, sel, rows)
	if b.sync == nil {
		c = b.plainCounts(bt, sel, rows)
	}
	b.s.batchCommitted(seq, cursor, rows, rejects, sent, t0, b.cfg.OnCommitFunc, c)
	b.publishKeys(bt, sel)
}

// Sweep ends a sync ([BatchConfig.Sync]) whose source was read in full: it commits
// the buffered rows, then deletes the rows of the table whose key the run did not
// see (or sets SyncConfig.MarkColumn on them), SyncConfig.SweepRows per
// transaction, each transaction fenced and counted like a batch. If the rows to
// delete, with those an earlier interrupted sweep of the run deleted, are more than
// SyncConfig.MaxDeleteRatio of the table, it deletes nothing and returns an error
// wrapping ErrTooManyDeletes. A sweep that fails or is killed can be run again (by
// a rerun of the job, which reads no row past its checkpoint): it deletes the rows
// still missing, never a row the source holds. Call it once, then Close.
func (b *BatchSession) Sweep(ctx context.Context) (SweepResult, error) {
	st := b.sync
	if st == nil {
		return SweepResult{}, errors.New("pgetl: Sweep needs BatchConfig.Sync")
	}
	// The last batch commits while the sweep finds what to delete: the key of every
	// row added is marked seen once its group is resolved, before its batch is
	// handed off. Only the deletes must follow the commit.
	b.mu.Lock()
	if b.err == nil && b.cur != nil {
		b.syncResolve(b.cur)
	}
	b.mu.Unlock()
	flushed := make(chan error, 1)
	go func() { flushed <- b.Flush(ctx) }() // waited for below, on every path
	pl, err := b.sweepRead(ctx)
	if ferr := <-flushed; ferr != nil {
		return pl.res, ferr
	}
	if err != nil {
		return pl.res, err
	}
	if !pl.deferred {
		// A row the last batch wrote may have been read while it committed, before
		// its key was recorded (the key cache learns new keys at commit): check
		// the rows found again, now that it has.
		pl.recheck(st.hashes, len(st.keyCols), st.cfg.SweepRows)
	}
	if st.markIx < 0 {
		pl.res.Table = int64(st.hashes.len()) // with the keys the last batch inserted
		if pl.deferred && !pl.overGuard(st.cfg) {
			if err := b.sweepFetch(ctx, pl, pl.unfetched); err != nil {
				return pl.res, err
			}
		}
	}
	res, nMissing, keyList, job := pl.res, pl.nMissing, b.sweepKeys(""), b.s.cfg.Job
	keySel := strings.Join(keyList, ", ")
	total := res.Table + res.DeletedAlready
	if pl.overGuard(st.cfg) {
		return res, fmt.Errorf("%w: %d of the %d rows of %s are not in the source (%.1f%%; %d deleted before), more than MaxDeleteRatio %g allows; nothing was deleted (if the source really lost them, raise SyncConfig.MaxDeleteRatio)",
			ErrTooManyDeletes, nMissing+res.DeletedAlready, total, b.cfg.Table,
			100*float64(nMissing+res.DeletedAlready)/float64(max(total, 1)), res.DeletedAlready, st.cfg.MaxDeleteRatio)
	}

	// A row is deleted where it was found and only if it still holds its key: a row
	// moved since (another writer updated it) is left for the next sync.
	stage := "CREATE TEMP TABLE pgetl_sweep ON COMMIT DROP AS SELECT ctid AS pgetl_tid, " + keySel + " FROM " + b.table + " WITH NO DATA"
	match := []string{"t.ctid = s.pgetl_tid"}
	for _, k := range keyList {
		match = append(match, "t."+k+" = s."+k)
	}
	apply := "DELETE FROM " + b.table + " t USING pgetl_sweep s WHERE " + strings.Join(match, " AND ")
	if st.markIx >= 0 {
		m := pgx.Identifier{st.cfg.MarkColumn}.Sanitize()
		apply = "UPDATE " + b.table + " t SET " + m + " = now() FROM pgetl_sweep s WHERE " + strings.Join(match, " AND ") + " AND t." + m + " IS NULL"
	}
	for _, data := range pl.missing {
		var n int64
		err := b.s.Tx(ctx, func(tx pgx.Tx) error {
			pgc := tx.Conn().PgConn()
			if _, err := tx.Exec(ctx, "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "+stage); err != nil {
				return err
			}
			stream := append(append(append([]byte(nil), copyHeader...), data...), copyTrailer...)
			if _, err := pgc.CopyFrom(ctx, bytes.NewReader(stream), "COPY pgetl_sweep FROM STDIN (FORMAT binary)"); err != nil {
				return err
			}
			tag, err := tx.Exec(ctx, apply)
			if err != nil {
				return err
			}
			n = tag.RowsAffected()
			// The fence made the checkpoint's seq this transaction's.
			_, err = tx.Exec(ctx, "INSERT INTO "+st.seenTbl+" (job, seq, deleted) SELECT job, seq, $2 FROM "+b.s.schema+
				".checkpoint WHERE job = $1", job, n)
			return err
		})
		if err != nil {
			return res, fmt.Errorf("pgetl: sweep of %s (%d rows deleted so far): %w", b.cfg.Table, res.Deleted, err)
		}
		res.Deleted += n
		res.Transactions++
		b.s.mu.Lock()
		b.s.stat.sync.deleted += n
		seq, cursor := b.s.cp.Seq, b.s.cp.Cursor
		b.s.mu.Unlock()
		if f := b.cfg.OnCommitFunc; f != nil {
			f(BatchResult{Job: job, Seq: seq, Deleted: n, Cursor: cursor})
		}
	}
	return res, nil
}

// sweepPlan is what Sweep found to delete.
type sweepPlan struct {
	res       SweepResult // Table and DeletedAlready
	missing   [][]byte    // binary COPY tuples (ctid, key columns) of the rows to delete, in chunks of SweepRows
	nMissing  int64       // rows to delete (counted also where the guard left them unfetched)
	unfetched []uint64    // where the preload found the rows to delete, if the guard left their keys unfetched
	deferred  bool        // the guard left them unfetched
	chunk     []byte
	inChunk   int
	kb        []byte
	keyFields []int // the key's fields in a tuple: after the ctid
}

// overGuard reports whether deleting the rows found, with those an earlier
// interrupted sweep of the run deleted, goes past SyncConfig.MaxDeleteRatio.
func (pl *sweepPlan) overGuard(sc SyncConfig) bool {
	return sc.MaxDeleteRatio < 1 && float64(pl.nMissing+pl.res.DeletedAlready) > sc.MaxDeleteRatio*float64(pl.res.Table+pl.res.DeletedAlready)
}

// keep adds tuple (ctid and key columns) to the rows to delete if t does not hold
// its key as seen.
func (pl *sweepPlan) keep(t *rowHashes, nkeys, chunkRows int, tuple []byte) {
	for len(pl.keyFields) < nkeys {
		pl.keyFields = append(pl.keyFields, len(pl.keyFields)+1)
	}
	var null bool
	if pl.kb, null = tupleKey(tuple, pl.keyFields, pl.kb[:0]); null {
		return // a NULL in the key: never swept
	}
	if row, held := t.get(keyHash(pl.kb)); held && row&rowSeen != 0 {
		return
	}
	pl.nMissing++
	pl.chunk = append(pl.chunk, tuple...)
	if pl.inChunk++; pl.inChunk == chunkRows {
		pl.missing, pl.chunk, pl.inChunk = append(pl.missing, pl.chunk), nil, 0
	}
}

// sweepRead finds the rows of the table whose key the run did not see: those the
// preload found (or, with a MarkColumn, the unmarked rows of the table) whose key
// neither this batch session nor an interrupted one of the run saw. Its Table is
// the table's size before the last batch commits.
func (b *BatchSession) sweepRead(ctx context.Context) (*sweepPlan, error) {
	pl := &sweepPlan{}
	st := b.sync
	job := b.s.cfg.Job
	// The seen set: every key the run's committed batches held. Those of this
	// batch session are marked already; read those of killed sessions before it,
	// and the counts of earlier sweeps.
	t := st.hashes
	t.mu.RLock()
	first := st.firstSeq
	t.mu.RUnlock()
	rows, err := b.s.pool.Query(ctx, "SELECT keys, deleted FROM "+st.seenTbl+
		" WHERE job = $1 AND (keys IS NULL OR seq < $2 OR $2 = 0)", job, first)
	if err != nil {
		return pl, fmt.Errorf("pgetl: sweep: read the seen set of job %q: %w", job, err)
	}
	t.mu.Lock()
	var keys []byte
	var deleted int64
	_, err = pgx.ForEachRow(rows, []any{&keys, &deleted}, func() error {
		for p := 0; p+8 <= len(keys); p += 8 {
			t.markSeen(binary.BigEndian.Uint64(keys[p:]))
		}
		pl.res.DeletedAlready += deleted
		return nil
	})
	t.mu.Unlock()
	if err != nil {
		return pl, fmt.Errorf("pgetl: sweep: read the seen set of job %q: %w", job, err)
	}
	if st.markIx >= 0 {
		err = b.copyOut(ctx, "COPY (SELECT ctid, "+strings.Join(b.sweepKeys(""), ", ")+" FROM "+b.table+
			" WHERE "+pgx.Identifier{st.cfg.MarkColumn}.Sanitize()+" IS NULL) TO STDOUT (FORMAT binary)", func(tuple []byte) error {
			pl.res.Table++
			pl.keep(t, len(st.keyCols), st.cfg.SweepRows, tuple)
			return nil
		})
		if err != nil {
			return pl, fmt.Errorf("pgetl: sweep: read the keys of %s: %w", b.cfg.Table, err)
		}
		pl.flushChunk()
		return pl, nil
	}
	locs, n := t.unseen()
	pl.res.Table, pl.nMissing = int64(t.len()), int64(n)
	if pl.overGuard(st.cfg) {
		// Refused, unless the keys the last batch inserts make the table large
		// enough: Sweep decides once it committed.
		pl.unfetched, pl.deferred = locs, true
		return pl, nil
	}
	return pl, b.sweepFetch(ctx, pl, locs)
}

// sweepFetch reads the keys of the rows the preload found at locs (their keys
// unseen) into pl, by ctid (a nested loop of TID scans over the list: ctid = ANY
// of a literal array is planned as a scan of the whole table), not by reading the
// table again. A fetched row whose key was seen (the place was reused) is skipped;
// a row moved since the preload (another writer updated it) is left for the next
// sync.
func (b *BatchSession) sweepFetch(ctx context.Context, pl *sweepPlan, locs []uint64) error {
	st := b.sync
	pl.nMissing, pl.unfetched, pl.deferred = 0, nil, false
	for p := 0; p < len(locs); p += st.cfg.SweepRows {
		err := b.copyOut(ctx, "COPY (SELECT t.ctid, "+strings.Join(b.sweepKeys("t."), ", ")+" FROM unnest('"+tidArray(locs[p:min(p+st.cfg.SweepRows, len(locs))])+
			"'::tid[]) AS l(tid) JOIN "+b.table+" t ON t.ctid = l.tid) TO STDOUT (FORMAT binary)", func(tuple []byte) error {
			pl.keep(st.hashes, len(st.keyCols), st.cfg.SweepRows, tuple)
			return nil
		})
		if err != nil {
			return fmt.Errorf("pgetl: sweep: read the keys of the rows of %s to delete: %w", b.cfg.Table, err)
		}
	}
	pl.flushChunk()
	return nil
}

// recheck keeps, of the rows found to delete, those whose key t still does not
// hold as seen.
func (pl *sweepPlan) recheck(t *rowHashes, nkeys, chunkRows int) {
	found := pl.missing
	pl.missing, pl.chunk, pl.inChunk, pl.nMissing = nil, nil, 0, 0
	for _, c := range found {
		for len(c) >= 2 {
			n := tupleLen(c)
			pl.keep(t, nkeys, chunkRows, c[:n])
			c = c[n:]
		}
	}
	pl.flushChunk()
}

// tupleLen returns the length of the binary COPY tuple that data starts with.
func tupleLen(data []byte) int {
	p := 2
	for range int(binary.BigEndian.Uint16(data)) {
		p += 4 + max(int(int32(binary.BigEndian.Uint32(data[p:]))), 0)
	}
	return p
}

func (pl *sweepPlan) flushChunk() {
	if pl.inChunk > 0 {
		pl.missing, pl.chunk, pl.inChunk = append(pl.missing, pl.chunk), nil, 0
	}
}

// sweepKeys returns the key columns, quoted, each after prefix.
func (b *BatchSession) sweepKeys(prefix string) []string {
	keys := make([]string, len(b.sync.keyCols))
	for k, i := range b.sync.keyCols {
		keys[k] = prefix + pgx.Identifier{b.cfg.Columns[i]}.Sanitize()
	}
	return keys
}

func (c *rowCounts) add(o rowCounts) {
	c.inserted += o.inserted
	c.updated += o.updated
	c.unchanged += o.unchanged
	c.merged += o.merged
	c.deleted += o.deleted
}

// Inserted returns the rows the session's batches inserted (see [BatchResult] for
// where the split is known).
func (st Stat) Inserted() int64 { return st.c.sync.inserted }

// Updated returns the rows the session's batches updated.
func (st Stat) Updated() int64 { return st.c.sync.updated }

// Unchanged returns the rows the session's upserts left as they were: not sent by
// a sync, or left alone by a merge.
func (st Stat) Unchanged() int64 { return st.c.sync.unchanged }

// Merged returns the rows followed in their batch by a row of the same key, which
// won.
func (st Stat) Merged() int64 { return st.c.sync.merged }

// Deleted returns the rows deleted (or marked) by [BatchSession.Sweep].
func (st Stat) Deleted() int64 { return st.c.sync.deleted }

// SyncCache returns the number of keys the sync's key cache holds and the bytes
// it takes (0, 0 without BatchConfig.Sync).
func (b *BatchSession) SyncCache() (keys int, bytes int64) {
	if b.sync == nil {
		return 0, 0
	}
	return b.sync.hashes.len(), b.sync.hashes.bytes()
}

// plainCounts returns the counts of a committed batch that is not a sync's: rows
// inserted, updated, left unchanged by the merge (DO NOTHING, or OnlyChanged and
// equal) and merged into a later row of their key. It is all zero when the
// committed attempt's split is unknown: the statement path, a batch whose bad rows
// were isolated, an upsert whose commit was in doubt and whose report was lost.
func (b *BatchSession) plainCounts(bt *batch, sel []int, rows int64) rowCounts {
	switch {
	case b.cfg.SQL != "":
		return rowCounts{}
	case len(b.cfg.Key) == 0:
		return rowCounts{inserted: int64(len(sel))}
	case !bt.counted:
		return rowCounts{}
	}
	c := bt.counts
	c.merged = rows - int64(len(sel))
	c.unchanged = int64(len(sel)) - c.inserted - c.updated
	return c
}
