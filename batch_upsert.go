package pgetl

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// tableIdent quotes a possibly schema-qualified table name ("sales.orders"); a name
// that holds a double quote is taken as already quoted SQL (pgx.Identifier's
// Sanitize), for names that contain dots or capitals.
func tableIdent(name string) string {
	if strings.Contains(name, `"`) {
		return name
	}
	return pgx.Identifier(strings.Split(name, ".")).Sanitize()
}

// describe resolves the column types and checks the target, in one round trip: an
// insert prepares "SELECT columns FROM table" as the unnamed statement (so it works
// behind PgBouncer) for its column types; an upsert sends one simple-protocol
// message that creates the staging table, reads the column types from it, reads the
// key's unique indexes (with a key cache) and EXPLAINs the merge, inside a
// transaction it rolls back (see describeUpsert).
func (b *BatchSession) describe(ctx context.Context) error {
	cfg := &b.cfg
	conn, err := b.s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("pgetl: batch: %w", err)
	}
	defer conn.Release()
	pgc := conn.Conn().PgConn()
	if cfg.SQL != "" {
		sd, err := pgc.Prepare(ctx, "", cfg.SQL, nil)
		if err != nil {
			return fmt.Errorf("pgetl: batch statement %q: %w", cfg.SQL, err)
		}
		b.oids = sd.ParamOIDs
		return nil
	}
	quoted := make([]string, len(cfg.Columns))
	for i, c := range cfg.Columns {
		quoted[i] = pgx.Identifier{c}.Sanitize()
	}
	b.table, b.cols = tableIdent(cfg.Table), strings.Join(quoted, ", ")
	var fields []pgconn.FieldDescription
	var keyIndexes []string
	if len(cfg.Key) == 0 {
		b.sql.copyStmt = "COPY " + b.table + " (" + b.cols + ") FROM STDIN (FORMAT binary);"
		sd, err := pgc.Prepare(ctx, "", "SELECT "+b.cols+" FROM "+b.table, nil)
		if err != nil {
			return fmt.Errorf("pgetl: batch target %s (%s): %w", cfg.Table, strings.Join(cfg.Columns, ", "), err)
		}
		fields = sd.Fields
	} else {
		if err := b.upsertSQL(quoted); err != nil {
			return err
		}
		if fields, keyIndexes, err = b.describeUpsert(ctx, conn.Conn()); err != nil {
			return err
		}
	}
	for _, f := range fields {
		if _, ok := b.m.TypeForOID(f.DataTypeOID); !ok {
			var name string
			if err := conn.QueryRow(ctx, "SELECT format_type($1::oid, NULL)", f.DataTypeOID).Scan(&name); err != nil {
				return fmt.Errorf("pgetl: batch: type of column %s: %w", f.Name, err)
			}
			t, err := conn.Conn().LoadType(ctx, name)
			if err != nil {
				return fmt.Errorf("pgetl: batch: type %s of column %s: %w", name, f.Name, err)
			}
			b.m.RegisterType(t)
		}
		b.oids = append(b.oids, f.DataTypeOID)
	}
	b.nvals = len(cfg.Columns)
	if err := b.describeLookups(ctx, conn.Conn()); err != nil {
		return err
	}
	if cfg.KeyCache != nil {
		if err := b.checkKeyType(); err != nil {
			return err
		}
		b.keyIndexes = map[string]bool{}
		for _, n := range keyIndexes {
			b.keyIndexes[n] = true
		}
	}
	return nil
}

// upsertSQL checks an upsert's Key and KeyCache against Columns and builds its
// statements (no I/O).
func (b *BatchSession) upsertSQL(quoted []string) error {
	cfg := &b.cfg
	isKey := map[string]bool{}
	for _, k := range cfg.Key {
		i := indexOf(cfg.Columns, k)
		if i < 0 {
			return fmt.Errorf("pgetl: batch: key column %q is not in Columns", k)
		}
		b.keyIx = append(b.keyIx, i)
		isKey[k] = true
	}
	var set, cmpT, cmpS []string
	for i, c := range cfg.Columns {
		if !isKey[c] {
			set = append(set, quoted[i]+" = EXCLUDED."+quoted[i])
			cmpT = append(cmpT, "t."+quoted[i])
			cmpS = append(cmpS, "EXCLUDED."+quoted[i])
		}
	}
	keys := make([]string, len(cfg.Key))
	for i, k := range cfg.Key {
		keys[i] = pgx.Identifier{k}.Sanitize()
	}
	merge := "INSERT INTO " + b.table + " AS t (" + b.cols + ") SELECT " + b.cols + " FROM pgetl_stage ON CONFLICT (" + strings.Join(keys, ", ") + ")"
	if len(set) == 0 || cfg.IgnoreExisting {
		merge += " DO NOTHING"
	} else {
		merge += " DO UPDATE SET " + strings.Join(set, ", ")
		if cfg.OnlyChanged {
			merge += " WHERE (" + strings.Join(cmpT, ", ") + ") IS DISTINCT FROM (" + strings.Join(cmpS, ", ") + ")"
		}
	}
	b.sql.stageStmt = "CREATE TEMP TABLE pgetl_stage ON COMMIT DROP AS SELECT " + b.cols + " FROM " + b.table + " WITH NO DATA;"
	b.sql.copyStmt = "COPY pgetl_stage (" + b.cols + ") FROM STDIN (FORMAT binary);"
	b.sql.merge = merge + ";"
	b.sql.mergeCount = countsSQL(merge, -1)
	if cfg.KeyCache == nil {
		return nil
	}
	if len(cfg.Key) != 1 {
		return errors.New("pgetl: BatchConfig.KeyCache needs a single-column Key")
	}
	if cfg.OnlyChanged || len(set) == 0 || cfg.IgnoreExisting {
		return errors.New("pgetl: BatchConfig.KeyCache cannot be combined with OnlyChanged, IgnoreExisting or a Key that is all the Columns")
	}
	k := keys[0]
	var upd []string
	for _, c := range set {
		upd = append(upd, strings.Replace(c, "EXCLUDED.", "s.", 1))
	}
	// Nested loops over the key's index: a hash join would read the whole table
	// for every batch. expect_rows fails the batch (PGK01) if a key the cache
	// holds is missing from the table, and the batch is then retried as a merge.
	b.sql.update = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; WITH u AS (UPDATE " + b.table +
		" AS t SET " + strings.Join(upd, ", ") + " FROM pgetl_stage s WHERE t." + k + " = s." + k + " RETURNING 1) SELECT " +
		b.s.schema + ".expect_rows((SELECT count(*) FROM u), "
	if cfg.Sync != nil {
		// A sync stages its known rows with the ctid the preload found them at
		// (pgetl_tid, NULL if unknown): those are updated there (a TID scan, no
		// lookup in the key's index), if the row there still holds the key; the
		// others by key. A row moved since (its ctid stale) leaves the count short:
		// PGK01, and the batch is retried as a merge.
		b.sql.stageStmt = "CREATE TEMP TABLE pgetl_stage ON COMMIT DROP AS SELECT ctid AS pgetl_tid, " + b.cols + " FROM " + b.table + " WITH NO DATA;"
		b.sql.copyTID = "COPY pgetl_stage (pgetl_tid, " + b.cols + ") FROM STDIN (FORMAT binary);"
		set := " AS t SET " + strings.Join(upd, ", ") + " FROM pgetl_stage s WHERE "
		b.sql.update = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; WITH u AS (UPDATE " + b.table +
			set + "s.pgetl_tid IS NOT NULL AND t.ctid = s.pgetl_tid AND t." + k + " = s." + k + " RETURNING 1), v AS (UPDATE " + b.table +
			set + "s.pgetl_tid IS NULL AND t." + k + " = s." + k + " RETURNING 1) SELECT " +
			b.s.schema + ".expect_rows((SELECT count(*) FROM u) + (SELECT count(*) FROM v), "
	}
	b.sql.copyNew = "COPY " + b.table + " (" + b.cols + ") FROM STDIN (FORMAT binary);"
	return nil
}

// describeUpsert checks an upsert's target in one simple-protocol message, inside a
// transaction it rolls back: it creates the staging table (as every batch does),
// reads the column types from it (a column's type as the table has it; for a domain
// the server reports the base type, as it does for the table), with a key cache
// reads the names of the unique indexes on the key (a unique violation on one of
// them means the cache was stale), and EXPLAINs the merge, which plans it without
// running it: it checks that a unique index matches Key now rather than at the
// first flush. The statements after a failed one are skipped; the error names the
// step that failed.
func (b *BatchSession) describeUpsert(ctx context.Context, conn *pgx.Conn) (fields []pgconn.FieldDescription, keyIndexes []string, err error) {
	cfg := &b.cfg
	const stepTypes = 2 // after BEGIN and the staging table
	stepIndexes, stepExplain := -1, 3
	q := "BEGIN; " + b.sql.stageStmt + " SELECT " + b.cols + " FROM pgetl_stage LIMIT 0; "
	if cfg.KeyCache != nil {
		stepIndexes, stepExplain = 3, 4
		q += `SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
			WHERE i.indrelid = ` + quoteLiteral(b.table) + `::regclass AND i.indisunique AND i.indnatts = 1
			AND (SELECT attname FROM pg_attribute WHERE attrelid = i.indrelid AND attnum = i.indkey[0]) = ` + quoteLiteral(cfg.Key[0]) + "; "
	}
	q += "EXPLAIN (COSTS OFF) " + strings.TrimSuffix(b.sql.merge, ";") + "; ROLLBACK"
	mrr := conn.PgConn().Exec(ctx, q)
	step := 0 // the statement whose result is read next: the one that failed, if one did
	for mrr.NextResult() {
		rr := mrr.ResultReader()
		switch step {
		case stepTypes:
			fields = append(fields, rr.FieldDescriptions()...)
		case stepIndexes:
			for rr.NextRow() {
				keyIndexes = append(keyIndexes, string(rr.Values()[0]))
			}
		}
		if _, err := rr.Close(); err != nil {
			break
		}
		step++
	}
	if err = mrr.Close(); err == nil {
		return fields, keyIndexes, nil
	}
	if conn.PgConn().TxStatus() != 'I' {
		_, _ = conn.Exec(ctx, "ROLLBACK")
	}
	switch {
	case step <= stepTypes:
		return nil, nil, fmt.Errorf("pgetl: batch target %s (%s): %w", cfg.Table, strings.Join(cfg.Columns, ", "), err)
	case step == stepIndexes:
		return nil, nil, fmt.Errorf("pgetl: batch: unique indexes of %s: %w", cfg.Table, err)
	case step == stepExplain:
		return nil, nil, fmt.Errorf("pgetl: batch upsert on %s key (%s): %w", cfg.Table, strings.Join(cfg.Key, ", "), err)
	}
	return nil, nil, fmt.Errorf("pgetl: batch upsert on %s: %w", cfg.Table, err)
}

func indexOf(xs []string, x string) int {
	for i, y := range xs {
		if y == x {
			return i
		}
	}
	return -1
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
	if _, sync := kc.(syncKeys); kc == nil || sync {
		return // a sync's keys are recorded by syncCommitted
	}
	var keys []any
	has := keySetContains(kc) // not a lookup: Add counted this row's
	for _, i := range sel {
		if k := bt.keyVals[i]; !has(k) {
			keys = append(keys, k)
		}
	}
	if len(keys) > 0 {
		b.cfg.KeyCache.AddKeys(keys)
	}
}

// checkKeyType checks, for a KeyCache that knows the Go type of its keys (a
// [Cache]), that the type is the key column's: the values passed to Add for the key
// are looked up in the cache as they are, so keys of another type would never be
// found and every batch would be retried as a merge. Strings may key any text-like
// column.
func (b *BatchSession) checkKeyType() error {
	kt, ok := b.cfg.KeyCache.(interface{ keyGoType() reflect.Type })
	if !ok {
		return nil
	}
	goType := kt.keyGoType()
	oid := b.oids[b.keyIx[0]]
	col, _ := b.m.TypeForOID(oid)
	if t, ok := b.m.TypeForValue(reflect.Zero(goType).Interface()); ok && t.OID == oid {
		return nil
	}
	if goType.Kind() == reflect.String && col != nil {
		if _, ok := col.Codec.(pgtype.TextCodec); ok {
			return nil
		}
	}
	name := fmt.Sprint(oid)
	if col != nil {
		name = col.Name
	}
	return fmt.Errorf("pgetl: BatchConfig.KeyCache holds keys of Go type %s, which do not match key column %q of type %s: use a Cache whose key type is the column's (and pass keys of that type to Add)",
		goType, b.cfg.Key[0], name)
}

// countsSQL wraps merge (an INSERT … ON CONFLICT into "t") so that it reports how
// many rows it inserted and how many it updated: a row the statement inserted has
// xmax 0, one it updated carries the statement's own lock in xmax. The report is a
// row 'pgetl_n', part, inserted, updated (part: a set's table, -1 for a
// BatchSession). Rows it left alone (DO NOTHING, or OnlyChanged and equal) are not
// returned: the caller knows how many it staged.
func countsSQL(merge string, part int) string {
	return "WITH pgetl_m AS (" + merge + " RETURNING t.xmax = 0 AS ins) SELECT 'pgetl_n', " + strconv.Itoa(part) +
		", count(*) FILTER (WHERE ins), count(*) FILTER (WHERE NOT ins) FROM pgetl_m;"
}

// parseCounts reads a countsSQL report row (without its 'pgetl_n' mark): the part,
// inserted and updated.
func parseCounts(vals [][]byte) (part int, inserted, updated int64, ok bool) {
	if len(vals) != 3 {
		return 0, 0, 0, false
	}
	p, err1 := strconv.Atoi(string(vals[0]))
	ins, err2 := strconv.ParseInt(string(vals[1]), 10, 64)
	upd, err3 := strconv.ParseInt(string(vals[2]), 10, 64)
	return p, ins, upd, err1 == nil && err2 == nil && err3 == nil
}
