package pgetl

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// LookupMode says what a lookup column does with a natural key its dimension table
// does not hold.
type LookupMode int

const (
	// LookupOnly rejects a row whose key the dimension lacks (SQLSTATE 23503, "unknown
	// key"), under the batch's reject policy: RejectFail stops the job at it,
	// RejectToTable writes it to the reject table.
	LookupOnly LookupMode = iota
	// GetOrCreate creates the missing dimension row from the key and the row's
	// attribute values (Lookup.InsertColumns), with INSERT … ON CONFLICT DO NOTHING,
	// so jobs creating the same keys concurrently neither fail nor duplicate them.
	GetOrCreate
)

// LookupColumn resolves a column of a batch from a natural key: the batch's rows
// carry the key (an e-mail, a SKU), the table receives the dimension's value for it
// (the customer's or product's id).
//
// A key the cache holds is resolved at Add, which then encodes the id like any
// value. A row with a key the cache lacks waits in the batch; the batch's own
// transaction resolves its keys in the same round trip as its rows: the waiting rows
// are COPYed into a staging table with their keys, the missing dimension rows are
// created (GetOrCreate), the ids are read by a join with the dimension (which also
// finds keys other jobs created meanwhile), and the rows are inserted from the
// staging table; the resolved keys and ids come back in the same reply and are put
// into the cache only after the batch commits (or is found committed).
type LookupColumn struct {
	// Column is the column of BatchConfig.Columns that receives the dimension's Value.
	// Add takes the natural key in its place. Required.
	Column string
	// Source is the dimension: its Table, its Key column (the natural key, with a
	// unique index), its Value column (what Column receives), and for GetOrCreate the
	// InsertColumns filled when a key is created. Their values follow the Columns'
	// values in Add, in the order of BatchConfig.Lookups and of their InsertColumns.
	Source Lookup
	// Cache holds the keys already resolved: a *Cache[K, V] whose K is the natural
	// key's Go type (as passed to Add) and V the Value's. Preload it to start warm.
	// Required.
	Cache LookupCache
	// Mode is LookupOnly (the default) or GetOrCreate.
	Mode LookupMode
}

// LookupCache is a [Cache] used by a [LookupColumn]; *Cache[K, V] implements it.
type LookupCache interface {
	lookup(key any) (any, bool)
	store(key, value any)
	keyGoType() reflect.Type
	valueGoType() reflect.Type
}

func (c *Cache[K, V]) lookup(key any) (any, bool) {
	k, ok := key.(K)
	if !ok {
		return nil, false
	}
	v, ok := c.Get(k)
	return v, ok
}

func (c *Cache[K, V]) store(key, value any) {
	k, ok := key.(K)
	v, ok2 := value.(V)
	if ok && ok2 {
		c.Put(k, v)
	}
}

func (c *Cache[K, V]) valueGoType() reflect.Type { return reflect.TypeFor[V]() }

// lookupCol is a LookupColumn resolved against the database at Batch.
type lookupCol struct {
	LookupColumn
	col      int      // position in Columns
	attrs    int      // position of its first attribute value in Add's values
	keyOID   uint32   // the dimension's key type
	valOID   uint32   // the dimension's value type
	attrOIDs []uint32 // the InsertColumns' types
	table    string   // quoted dimension table
	key, val string   // quoted key and value columns
}

// describeLookups checks and resolves cfg.Lookups. Caller: describe, on conn.
func (b *BatchSession) describeLookups(ctx context.Context, conn *pgx.Conn) error {
	cfg := &b.cfg
	if len(cfg.Lookups) == 0 {
		return nil
	}
	if !b.part {
		return errors.New("pgetl: BatchConfig.Lookups needs Session.Batches (a batch set, even of one table)")
	}
	if cfg.SQL != "" || cfg.KeyCache != nil {
		return errors.New("pgetl: BatchConfig.Lookups cannot be combined with SQL or KeyCache")
	}
	if len(cfg.Key) > 0 && !cfg.IgnoreExisting {
		return errors.New("pgetl: BatchConfig.Lookups with a Key needs IgnoreExisting (a row resolved in the batch's transaction cannot take part in the last-row-wins merge)")
	}
	attrs := len(cfg.Columns)
	for _, l := range cfg.Lookups {
		if err := l.Source.validate("Lookups"); err != nil {
			return err
		}
		c := indexOf(cfg.Columns, l.Column)
		if c < 0 {
			return fmt.Errorf("pgetl: BatchConfig.Lookups: column %q is not in Columns", l.Column)
		}
		if l.Cache == nil {
			return fmt.Errorf("pgetl: BatchConfig.Lookups: column %q has no Cache", l.Column)
		}
		if l.Mode != LookupOnly && l.Mode != GetOrCreate {
			return fmt.Errorf("pgetl: BatchConfig.Lookups: column %q: unknown mode %d", l.Column, l.Mode)
		}
		lc := lookupCol{LookupColumn: l, col: c, attrs: attrs, table: tableIdent(l.Source.Table),
			key: pgx.Identifier{l.Source.Key}.Sanitize(), val: pgx.Identifier{l.Source.Value}.Sanitize()}
		if l.Mode == GetOrCreate {
			attrs += len(l.Source.InsertColumns)
		}
		cols := []string{lc.key, lc.val}
		if l.Mode == GetOrCreate {
			for _, a := range l.Source.InsertColumns {
				cols = append(cols, pgx.Identifier{a}.Sanitize())
			}
		}
		sd, err := conn.PgConn().Prepare(ctx, "", "SELECT "+strings.Join(cols, ", ")+" FROM "+lc.table, nil)
		if err != nil {
			return fmt.Errorf("pgetl: BatchConfig.Lookups: column %q: dimension %s: %w", l.Column, l.Source.Table, err)
		}
		for i, f := range sd.Fields {
			if err := b.registerType(ctx, conn, f.DataTypeOID, string(f.Name)); err != nil {
				return err
			}
			switch i {
			case 0:
				lc.keyOID = f.DataTypeOID
			case 1:
				lc.valOID = f.DataTypeOID
			default:
				lc.attrOIDs = append(lc.attrOIDs, f.DataTypeOID)
			}
		}
		if lc.valOID != b.oids[c] {
			return fmt.Errorf("pgetl: BatchConfig.Lookups: column %q is of another type than %s.%s", l.Column, l.Source.Table, l.Source.Value)
		}
		for _, check := range []struct {
			t   reflect.Type
			oid uint32
			of  string
		}{{l.Cache.keyGoType(), lc.keyOID, "keys"}, {l.Cache.valueGoType(), lc.valOID, "values"}} {
			if !goTypeFits(b.m, check.t, check.oid) {
				return fmt.Errorf("pgetl: BatchConfig.Lookups: column %q: the Cache's %s are %s, which do not match %s", l.Column, check.of, check.t, l.Source.Table)
			}
		}
		b.lookups = append(b.lookups, lc)
	}
	b.nvals = attrs
	return nil
}

// registerType makes sure b.m knows type oid (an enum, a domain…).
func (b *BatchSession) registerType(ctx context.Context, conn *pgx.Conn, oid uint32, col string) error {
	if _, ok := b.m.TypeForOID(oid); ok {
		return nil
	}
	var name string
	if err := conn.QueryRow(ctx, "SELECT format_type($1::oid, NULL)", oid).Scan(&name); err != nil {
		return fmt.Errorf("pgetl: batch: type of column %s: %w", col, err)
	}
	t, err := conn.LoadType(ctx, name)
	if err != nil {
		return fmt.Errorf("pgetl: batch: type %s of column %s: %w", name, col, err)
	}
	b.m.RegisterType(t)
	return nil
}

// goTypeFits reports whether Go values of type t are what pgx reads from and writes
// to a column of type oid (strings fit every text-like type).
func goTypeFits(m *pgtype.Map, t reflect.Type, oid uint32) bool {
	if pt, ok := m.TypeForValue(reflect.Zero(t).Interface()); ok && pt.OID == oid {
		return true
	}
	if col, ok := m.TypeForOID(oid); ok && t.Kind() == reflect.String {
		_, text := col.Codec.(pgtype.TextCodec)
		return text
	}
	return false
}

// resolve replaces, in values (a copy of Add's), each lookup column's key by its
// cached value. It reports whether every key was a hit.
func (b *BatchSession) resolveHits(values []any) (vals []any, keys []any, hit bool) {
	vals = append([]any(nil), values[:len(b.cfg.Columns)]...)
	keys = make([]any, len(b.lookups))
	hit = true
	for j, lc := range b.lookups {
		k := values[lc.col]
		keys[j] = k
		if k == nil {
			hit = false
			continue
		}
		if v, ok := lc.Cache.lookup(k); ok {
			vals[lc.col] = v
		} else {
			vals[lc.col] = nil
			hit = false
		}
	}
	return vals, keys, hit
}
