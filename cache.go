package pgetl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"maps"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/pgetl/pgetl/internal/keystore"
)

// CacheMaxBytesDefault is the default [CacheConfig.MaxBytes]: 256 MiB, about 7 million
// short string keys with int64 values.
const CacheMaxBytesDefault int64 = 256 << 20

// LookupPageSizeDefault is the default [Lookup.PageSize].
const LookupPageSizeDefault = 10_000

// cacheShards is the number of independently locked parts of a Cache. Sharding keeps
// readers of one part from waiting for a writer of another, and bounds the pause of a
// table resize to 1/cacheShards of the cache.
const cacheShards = 32

// CacheConfig configures a [Cache]. The zero value is valid.
type CacheConfig struct {
	// MaxBytes bounds the memory of the cache's entries. When an entry would take the
	// cache beyond it, the entry is not admitted: entries already cached stay, the new
	// key is simply not cached ([CacheStat.Rejected] counts it), so later lookups of it
	// miss and go to the database. Answers are never wrong, only slower. The bytes
	// are the capacities the cache allocated (exact for string keys; for other key
	// types an estimate of twice the key and value size per entry). The transient
	// copy made while one of the cache's 32 shards grows is not counted.
	// 0 means the default; negative is an error. Defaults to CacheMaxBytesDefault.
	MaxBytes int64
}

// Querier runs a query. [*pgxpool.Pool], [*pgx.Conn] and [pgx.Tx] satisfy it.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Lookup names the table a [Cache] mirrors: its key column, whose values are the
// cache's keys, and its value column (typically the surrogate key).
type Lookup struct {
	// Table is the table, optionally schema-qualified ("public.products"); pgetl
	// quotes each part, as it does BatchConfig.Table (a name holding a double quote is
	// taken as already quoted, e.g. pgx.Identifier{"Sales", "my.items"}.Sanitize()).
	// Required.
	Table string
	// Key is the key column (a plain column name, quoted by pgetl). GetOrCreate needs a
	// unique index or constraint on it (it uses ON CONFLICT (Key)); Preload needs an
	// index on it to be fast. Required.
	Key string
	// Value is the value column (a plain column name, quoted by pgetl), e.g. the
	// table's id. Required, except by Preload into a key set (a Cache of K to
	// struct{}), which reads only the keys.
	Value string
	// KeyType is the SQL type in which keys are sent as an array (keys travel as
	// $1::KeyType[]); it is an SQL type name, written into the SQL as is. Defaults to "text" for keys whose underlying type is string, "int8"
	// for int, int64 and uint32, "int4" for int32, "int2" for int16, int8 and uint8,
	// "uuid" for [16]byte; other key types must set it.
	KeyType string
	// PageSize is the number of rows each Preload query reads. 0 means the default;
	// negative is an error. Defaults to LookupPageSizeDefault.
	PageSize int
	// Where, if set, is an SQL condition restricting the rows Preload reads (an SQL
	// expression, written into the SQL as is, without placeholders: never build it
	// from untrusted input). GetOrCreate ignores it.
	Where string
	// InsertColumns are further columns that GetOrCreateFunc fills for the rows it
	// creates (e.g. a NOT NULL name). GetOrCreate, which inserts the key only, ignores
	// them.
	InsertColumns []string
}

func (l Lookup) validate(method string) error {
	switch {
	case l.Table == "":
		return fmt.Errorf("pgetl: Cache.%s: Lookup.Table is required", method)
	case l.Key == "":
		return fmt.Errorf("pgetl: Cache.%s: Lookup.Key is required", method)
	case l.Value == "" && method != "Preload":
		return fmt.Errorf("pgetl: Cache.%s: Lookup.Value is required", method)
	case l.PageSize < 0:
		return fmt.Errorf("pgetl: Cache.%s: Lookup.PageSize must not be negative", method)
	}
	return nil
}

// Cache is a key → value lookup (SKU → product id, natural key → surrogate key) that
// outlives transactions: it is shared by the batches of a session and survives their
// commits, so that a job does not ask the database again for what it already knows.
//
// The cache is transactional. [Cache.GetOrCreate] runs inside a transaction of
// [Session.Tx] (or of a batch flush): the entries it resolves are staged and become
// visible to [Cache.Get] only once that transaction's COMMIT is confirmed. A
// transaction that rolls back, or an attempt that is retried, leaves the cache exactly
// as it was, so a cached id always refers to a committed row (no foreign-key
// violations from ids of rows that were rolled back). [Cache.Put] and
// [Cache.Preload] store values directly: use them for rows known to be committed.
//
// It is bounded by [CacheConfig.MaxBytes] and compact: for keys whose underlying type
// is string, entries live in open-addressing tables with 8-byte slots, each key packed
// with its value in one byte arena (measured: 39 bytes per key at 1M keys like
// "SKU-0001234" with int64 values, 35 at 10M, where a map[string]int64 takes 72 and
// 61); other key types use Go maps.
//
// All methods are safe for concurrent use; lookups take a read lock on one of 32
// shards, so readers proceed while a writer publishes to another shard and wait only
// for the (short) publication to their own.
type Cache[K comparable, V any] struct {
	seed   maphash.Seed
	budget *keystore.Budget
	// str reports that K's underlying type is string: strs is used, else maps.
	str     bool
	strs    [cacheShards]strShard[V]
	maps    [cacheShards]mapShard[K, V]
	keyType string // default Lookup.KeyType for K

	// stagesMu guards stages and is held while staged entries are published, so that
	// Invalidate and Reset are ordered with publications. Lock order: stagesMu, then a
	// shard's mu.
	stagesMu sync.Mutex
	stages   map[commitHooks]*cacheStage[K, V] // guarded by stagesMu

	rejected     atomic.Int64
	preloadRows  atomic.Int64
	preloadPages atomic.Int64
	created      atomic.Int64
	published    atomic.Int64
}

// cacheStage holds the entries a transaction resolved, to publish on its commit.
type cacheStage[K comparable, V any] struct {
	m map[K]V // guarded by Cache.stagesMu; nil once published or dropped
}

type strShard[V any] struct {
	mu           sync.RWMutex
	t            *keystore.Table[V] // guarded by mu
	hits, misses atomic.Int64
	_            [64]byte // keep shards on separate cache lines
}

type mapShard[K comparable, V any] struct {
	mu           sync.RWMutex
	m            map[K]V // guarded by mu
	hits, misses atomic.Int64
	_            [64]byte
}

// NewCache returns an empty cache.
func NewCache[K comparable, V any](cfg CacheConfig) (*Cache[K, V], error) {
	if cfg.MaxBytes < 0 {
		return nil, errors.New("pgetl: CacheConfig.MaxBytes must not be negative")
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = CacheMaxBytesDefault
	}
	kt := reflect.TypeFor[K]()
	c := &Cache[K, V]{
		seed:    maphash.MakeSeed(),
		budget:  keystore.NewBudget(cfg.MaxBytes),
		str:     kt.Kind() == reflect.String,
		keyType: defaultKeyType(kt),
		stages:  make(map[commitHooks]*cacheStage[K, V]),
	}
	for i := range cacheShards {
		if c.str {
			c.strs[i].t = keystore.NewTable[V](c.budget)
		} else {
			c.maps[i].m = make(map[K]V)
		}
	}
	return c, nil
}

func defaultKeyType(t reflect.Type) string {
	switch t.Kind() {
	case reflect.String:
		return "text"
	case reflect.Int, reflect.Int64, reflect.Uint32:
		return "int8"
	case reflect.Int32:
		return "int4"
	case reflect.Int16, reflect.Int8, reflect.Uint8:
		return "int2"
	case reflect.Array:
		if t.Len() == 16 && t.Elem().Kind() == reflect.Uint8 {
			return "uuid"
		}
	}
	return ""
}

// keyString returns k as a string. Only for K whose underlying type is string.
func keyString[K comparable](k *K) string { return *(*string)(unsafe.Pointer(k)) }

// mapEntryBytes estimates the memory of one entry of a Go map of K to V.
func mapEntryBytes[K comparable, V any]() int64 {
	var k K
	var v V
	return 2 * int64(unsafe.Sizeof(k)+unsafe.Sizeof(v)+1)
}

// Get returns the value cached for k. It never queries the database: a miss means
// "not cached" (never looked up, created by a transaction not yet committed, not
// admitted under the memory budget, or invalidated), not "absent from the table".
func (c *Cache[K, V]) Get(k K) (V, bool) {
	if c.str {
		s := keyString(&k)
		h := maphash.String(c.seed, s)
		sh := &c.strs[h>>59]
		sh.mu.RLock()
		v, ok := sh.t.Get(h, s)
		sh.mu.RUnlock()
		if ok {
			sh.hits.Add(1)
		} else {
			sh.misses.Add(1)
		}
		return v, ok
	}
	sh := &c.maps[maphash.Comparable(c.seed, k)>>59]
	sh.mu.RLock()
	v, ok := sh.m[k]
	sh.mu.RUnlock()
	if ok {
		sh.hits.Add(1)
	} else {
		sh.misses.Add(1)
	}
	return v, ok
}

// Put caches k → v, visible to readers at once. Use it only for values known to be
// committed (a preload from your own query, a row read outside any transaction of the
// job); for rows created inside a transaction use [Cache.GetOrCreate], which publishes
// only after the commit. A new key the memory budget cannot hold is not admitted
// ([CacheStat.Rejected]); the value of a key already cached is always replaced.
func (c *Cache[K, V]) Put(k K, v V) {
	if !c.put(k, v) {
		c.rejected.Add(1)
	}
}

func (c *Cache[K, V]) put(k K, v V) bool {
	if c.str {
		s := keyString(&k)
		h := maphash.String(c.seed, s)
		sh := &c.strs[h>>59]
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return sh.t.Put(h, s, v, c.budget)
	}
	sh := &c.maps[maphash.Comparable(c.seed, k)>>59]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if _, ok := sh.m[k]; !ok && !c.budget.Reserve(mapEntryBytes[K, V]()) {
		return false
	}
	sh.m[k] = v
	return true
}

// Invalidate removes keys from the cache, and from the entries staged by transactions
// not yet committed, so that their next lookup goes to the database. Use it for keys
// the job knows were changed or deleted elsewhere.
func (c *Cache[K, V]) Invalidate(keys ...K) {
	c.stagesMu.Lock()
	defer c.stagesMu.Unlock()
	for _, st := range c.stages {
		for _, k := range keys {
			delete(st.m, k)
		}
	}
	for _, k := range keys {
		c.delete(k)
	}
}

// Caller must hold stagesMu.
func (c *Cache[K, V]) delete(k K) {
	if c.str {
		s := keyString(&k)
		h := maphash.String(c.seed, s)
		sh := &c.strs[h>>59]
		sh.mu.Lock()
		sh.t.Delete(h, s, c.budget)
		sh.mu.Unlock()
		return
	}
	sh := &c.maps[maphash.Comparable(c.seed, k)>>59]
	sh.mu.Lock()
	if _, ok := sh.m[k]; ok {
		delete(sh.m, k)
		c.budget.Adjust(-mapEntryBytes[K, V]())
	}
	sh.mu.Unlock()
}

// Reset empties the cache and the entries staged by transactions not yet committed
// (those transactions still commit; their entries are just not cached) and frees the
// memory. Counters in [CacheStat] are cumulative and not reset.
func (c *Cache[K, V]) Reset() {
	c.stagesMu.Lock()
	defer c.stagesMu.Unlock()
	for _, st := range c.stages {
		clear(st.m)
	}
	for i := range cacheShards {
		if c.str {
			sh := &c.strs[i]
			sh.mu.Lock()
			sh.t.Release(c.budget)
			sh.t = keystore.NewTable[V](c.budget)
			sh.mu.Unlock()
			continue
		}
		sh := &c.maps[i]
		sh.mu.Lock()
		c.budget.Adjust(-int64(len(sh.m)) * mapEntryBytes[K, V]())
		sh.m = make(map[K]V)
		sh.mu.Unlock()
	}
}

// CacheStat is a snapshot of a [Cache]'s size and counters, from [Cache.Stat].
type CacheStat struct {
	len, bytes, maxBytes           int64
	hits, misses, rejected         int64
	preloadRows, preloadPages      int64
	created, published             int64
	stagedTransactions, stagedKeys int64
}

// Len returns the number of cached (published) entries.
func (s CacheStat) Len() int64 { return s.len }

// Bytes returns the memory the entries take, as accounted against
// [CacheConfig.MaxBytes] (staged entries, which are few and short-lived, are not
// counted).
func (s CacheStat) Bytes() int64 { return s.bytes }

// MaxBytes returns the memory budget.
func (s CacheStat) MaxBytes() int64 { return s.maxBytes }

// BytesPerKey returns Bytes divided by Len (0 for an empty cache).
func (s CacheStat) BytesPerKey() float64 {
	if s.len == 0 {
		return 0
	}
	return float64(s.bytes) / float64(s.len)
}

// Hits returns the number of lookups (by Get and GetOrCreate) answered by the cache.
func (s CacheStat) Hits() int64 { return s.hits }

// Misses returns the number of lookups (by Get and GetOrCreate) the cache could not
// answer.
func (s CacheStat) Misses() int64 { return s.misses }

// Rejected returns the number of entries not admitted because the cache was at its
// memory budget. Non-zero means MaxBytes is too small for the working set: lookups of
// these keys keep going to the database.
func (s CacheStat) Rejected() int64 { return s.rejected }

// PreloadedRows returns the number of rows read by Preload.
func (s CacheStat) PreloadedRows() int64 { return s.preloadRows }

// PreloadedPages returns the number of queries (pages) Preload ran.
func (s CacheStat) PreloadedPages() int64 { return s.preloadPages }

// Created returns the number of rows GetOrCreate inserted into the database
// (counting attempts that were later rolled back).
func (s CacheStat) Created() int64 { return s.created }

// Published returns the number of staged entries published after their
// transaction's commit.
func (s CacheStat) Published() int64 { return s.published }

// StagedTransactions returns the number of transactions with staged entries, waiting
// for their commit or rollback.
func (s CacheStat) StagedTransactions() int64 { return s.stagedTransactions }

// StagedKeys returns the number of entries staged by those transactions.
func (s CacheStat) StagedKeys() int64 { return s.stagedKeys }

// Stat returns a snapshot of the cache's size and counters.
func (c *Cache[K, V]) Stat() CacheStat {
	s := CacheStat{
		maxBytes:     c.budget.Max(),
		rejected:     c.rejected.Load(),
		preloadRows:  c.preloadRows.Load(),
		preloadPages: c.preloadPages.Load(),
		created:      c.created.Load(),
		published:    c.published.Load(),
	}
	for i := range cacheShards {
		if c.str {
			sh := &c.strs[i]
			sh.mu.RLock()
			s.len += int64(sh.t.Len())
			sh.mu.RUnlock()
			s.hits += sh.hits.Load()
			s.misses += sh.misses.Load()
			continue
		}
		sh := &c.maps[i]
		sh.mu.RLock()
		s.len += int64(len(sh.m))
		sh.mu.RUnlock()
		s.hits += sh.hits.Load()
		s.misses += sh.misses.Load()
	}
	s.bytes = c.budget.Used()
	c.stagesMu.Lock()
	s.stagedTransactions = int64(len(c.stages))
	for _, st := range c.stages {
		s.stagedKeys += int64(len(st.m))
	}
	c.stagesMu.Unlock()
	return s
}

// Preload fills the cache from src: every row's Key → Value (restricted by
// src.Where). It reads by keyset pagination, each page its own short query
//
//	SELECT key, value FROM table WHERE key > $last ORDER BY key LIMIT $page
//
// so no cursor, snapshot or connection is held between pages (run on a pool, each
// page may use another connection) and a huge table never sits in memory at once.
// Each page is one round trip: it runs in [pgx.QueryExecModeExec] (no prepared
// statement; parameters and results in text form, which every type pgx knows
// decodes as it does the binary form, date and time values given the server's
// default DateStyle ISO), also on a connection that would prepare it.
// Rows changed while it runs may be read in either state; rows inserted behind the
// current page are missed (later lookups of them miss and go to the database). Preload
// stops early, without error, when the memory budget is exhausted
// ([CacheStat.Rejected] is then non-zero). Progress is in [CacheStat.PreloadedRows]
// and [CacheStat.PreloadedPages].
func (c *Cache[K, V]) Preload(ctx context.Context, db Querier, src Lookup) error {
	if err := src.validate("Preload"); err != nil {
		return err
	}
	pageSize := src.PageSize
	if pageSize == 0 {
		pageSize = LookupPageSizeDefault
	}
	key, val := pgx.Identifier{src.Key}.Sanitize(), pgx.Identifier{src.Value}.Sanitize()
	if src.Value == "" {
		val = "NULL" // a key set: the values stay V's zero value
	}
	cond := key + " IS NOT NULL"
	if src.Where != "" {
		cond = "(" + src.Where + ") AND " + cond
	}
	first := fmt.Sprintf("SELECT %s, %s FROM %s WHERE %s ORDER BY %s LIMIT $1", key, val, tableIdent(src.Table), cond, key)
	next := fmt.Sprintf("SELECT %s, %s FROM %s WHERE %s AND %s > $2 ORDER BY %s LIMIT $1", key, val, tableIdent(src.Table), cond, key, key)
	var last K
	var keyOID uint32 // the key column's type, from the first page
	var types *pgtype.Map
	for page := 0; ; page++ {
		var rows pgx.Rows
		var err error
		if page == 0 {
			rows, err = db.Query(ctx, first, pgx.QueryExecModeExec, pageSize)
		} else if txt, ok := keyText(&types, keyOID, last); ok {
			// The last key in its column's text form, which the server parses as
			// the key's type ($2 is untyped in QueryExecModeExec).
			rows, err = db.Query(ctx, next, pgx.QueryExecModeExec, pageSize, txt)
		} else {
			// A key type a fresh type map cannot encode (an enum…): the default
			// mode, where the server describes $2 first.
			rows, err = db.Query(ctx, next, pageSize, last)
		}
		if err != nil {
			return fmt.Errorf("pgetl: Cache.Preload from %s: %w", src.Table, err)
		}
		if fds := rows.FieldDescriptions(); page == 0 && len(fds) > 0 {
			keyOID = fds[0].DataTypeOID
		}
		n, full := 0, false
		for rows.Next() {
			var k K
			var v V
			var vp any = &v
			if src.Value == "" {
				vp = nil // pgx skips a nil destination
			}
			if err := rows.Scan(&k, vp); err != nil {
				rows.Close()
				return fmt.Errorf("pgetl: Cache.Preload from %s: %w", src.Table, err)
			}
			last = k
			n++
			if !c.put(k, v) {
				c.rejected.Add(1)
				full = true
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("pgetl: Cache.Preload from %s: %w", src.Table, err)
		}
		c.preloadPages.Add(1)
		c.preloadRows.Add(int64(n))
		if n < pageSize || full {
			return nil
		}
	}
}

// keyText returns k in the text form of the type oid, for Preload's next page; types
// is made on first use.
func keyText[K any](types **pgtype.Map, oid uint32, k K) (string, bool) {
	if oid == 0 {
		return "", false
	}
	if *types == nil {
		*types = pgtype.NewMap()
	}
	if _, ok := (*types).TypeForOID(oid); !ok {
		return "", false
	}
	b, err := (*types).Encode(oid, pgtype.TextFormatCode, k, nil)
	if err != nil || b == nil {
		return "", false
	}
	return string(b), true
}

// GetOrCreate returns the values of keys (in their order, duplicates allowed) from the
// table src, creating the rows of keys that do not exist yet, inside tx, which must be
// the transaction [Session.Tx] (or a batch flush) hands out.
//
// Keys found in the cache (published, or staged earlier in tx) cost nothing. All the
// others are resolved in one round trip:
//
//	WITH ins AS (
//	    INSERT INTO table (key) SELECT k FROM unnest($1::text[]) AS u(k) ORDER BY k
//	    ON CONFLICT (key) DO NOTHING RETURNING key, value)
//	SELECT key, value FROM ins
//	UNION ALL SELECT key, value FROM table WHERE key = ANY($1::text[])
//
// Existing rows are read, not rewritten (ON CONFLICT DO UPDATE would write a new row
// version of every existing key). Keys are inserted in sorted order, so two sessions
// creating overlapping keys lock them in the same order and do not deadlock each
// other within the statement. A key that a concurrent transaction committed after
// the statement's snapshot is skipped by DO NOTHING yet invisible to the SELECT; such
// keys are read by a second query (rare: only under that race). Under REPEATABLE READ
// or SERIALIZABLE that race is a serialization failure (40001) instead, which
// [Session.Tx] retries.
//
// The resolved entries are staged: they become visible to [Cache.Get] (and to other
// transactions' GetOrCreate) only after tx commits; if tx rolls back or its attempt is
// retried, they are dropped. If tx does not come from [Session.Tx], GetOrCreate
// returns an error and does nothing.
//
// The table needs a unique index or constraint on src.Key, and its other columns
// defaults (or NULL allowed); see [Cache.GetOrCreateFunc] to fill more columns.
func (c *Cache[K, V]) GetOrCreate(ctx context.Context, tx pgx.Tx, src Lookup, keys []K) ([]V, error) {
	return c.getOrCreate(ctx, tx, src, keys, nil, "GetOrCreate")
}

// GetOrCreateFunc is [Cache.GetOrCreate] for tables whose new rows need more than the
// key: for each key to be created, insert returns the values of src.InsertColumns, in
// order. The rows travel as one JSON array read with jsonb_populate_recordset(NULL::
// table, $1), so the values must have a JSON form PostgreSQL reads as the column's
// type (strings, numbers, booleans, time.Time, nil), and so must the keys.
func (c *Cache[K, V]) GetOrCreateFunc(ctx context.Context, tx pgx.Tx, src Lookup, keys []K,
	insert func(key K) []any) ([]V, error) {
	if insert == nil {
		return nil, errors.New("pgetl: Cache.GetOrCreateFunc: insert func is nil")
	}
	return c.getOrCreate(ctx, tx, src, keys, insert, "GetOrCreateFunc")
}

func (c *Cache[K, V]) getOrCreate(ctx context.Context, tx pgx.Tx, src Lookup, keys []K,
	insert func(K) []any, method string) ([]V, error) {
	if err := src.validate(method); err != nil {
		return nil, err
	}
	ht, ok := tx.(commitHooks)
	if !ok {
		return nil, fmt.Errorf("pgetl: Cache.%s needs the transaction of Session.Tx (entries are published only after its commit)", method)
	}
	keyType := src.KeyType
	if keyType == "" {
		keyType = c.keyType
	}
	if keyType == "" && insert == nil {
		var k K
		return nil, fmt.Errorf("pgetl: Cache.%s: Lookup.KeyType must be set for keys of type %T", method, k)
	}
	if insert != nil && len(src.InsertColumns) == 0 {
		return nil, fmt.Errorf("pgetl: Cache.%s: Lookup.InsertColumns is empty", method)
	}

	found := make(map[K]V, len(keys))
	var missing []K
	c.stagesMu.Lock()
	st := c.stages[ht]
	c.stagesMu.Unlock()
	for _, k := range keys {
		if _, ok := found[k]; ok {
			continue
		}
		if st != nil {
			c.stagesMu.Lock()
			v, ok := st.m[k]
			c.stagesMu.Unlock()
			if ok {
				found[k] = v
				continue
			}
		}
		if v, ok := c.Get(k); ok {
			found[k] = v
			continue
		}
		found[k] = *new(V) // placeholder, marks k as seen
		missing = append(missing, k)
	}

	if len(missing) > 0 {
		got, err := c.create(ctx, tx, src, keyType, missing, insert, method)
		if err != nil {
			return nil, err
		}
		c.stage(ht, got)
		for k, v := range got {
			found[k] = v
		}
	}
	out := make([]V, len(keys))
	for i, k := range keys {
		out[i] = found[k]
	}
	return out, nil
}

// create runs the get-or-create statement for missing (distinct keys) and returns
// every key's value.
func (c *Cache[K, V]) create(ctx context.Context, tx pgx.Tx, src Lookup, keyType string, missing []K,
	insert func(K) []any, method string) (map[K]V, error) {
	key, val := pgx.Identifier{src.Key}.Sanitize(), pgx.Identifier{src.Value}.Sanitize()
	if src.Value == "" {
		val = "NULL" // a key set: the values stay V's zero value
	}
	var sql string
	var arg any = missing
	if insert == nil {
		sql = fmt.Sprintf(`WITH ins AS (
	INSERT INTO %[1]s AS t (%[2]s) SELECT k FROM unnest($1::%[4]s[]) AS u(k) ORDER BY k
	ON CONFLICT (%[2]s) DO NOTHING RETURNING t.%[2]s, t.%[3]s)
SELECT %[2]s, %[3]s, true FROM ins
UNION ALL SELECT t.%[2]s, t.%[3]s, false FROM %[1]s AS t WHERE t.%[2]s = ANY($1::%[4]s[])`,
			tableIdent(src.Table), key, val, keyType)
	} else {
		cols := make([]string, len(src.InsertColumns))
		rows := make([]map[string]any, len(missing))
		for i, k := range missing {
			vals := insert(k)
			if len(vals) != len(src.InsertColumns) {
				return nil, fmt.Errorf("pgetl: Cache.%s: insert returned %d values for %d InsertColumns",
					method, len(vals), len(src.InsertColumns))
			}
			row := make(map[string]any, len(vals)+1)
			row[src.Key] = k
			for j, col := range src.InsertColumns {
				row[col] = vals[j]
			}
			rows[i] = row
		}
		for j, col := range src.InsertColumns {
			cols[j] = pgx.Identifier{col}.Sanitize()
		}
		js, err := json.Marshal(rows)
		if err != nil {
			return nil, fmt.Errorf("pgetl: Cache.%s: encode new rows: %w", method, err)
		}
		arg = string(js)
		sql = fmt.Sprintf(`WITH input AS (SELECT * FROM jsonb_populate_recordset(NULL::%[1]s, $1::jsonb)),
ins AS (
	INSERT INTO %[1]s AS t (%[2]s, %[4]s) SELECT %[2]s, %[4]s FROM input ORDER BY %[2]s
	ON CONFLICT (%[2]s) DO NOTHING RETURNING t.%[2]s, t.%[3]s)
SELECT %[2]s, %[3]s, true FROM ins
UNION ALL SELECT t.%[2]s, t.%[3]s, false FROM %[1]s AS t WHERE t.%[2]s IN (SELECT %[2]s FROM input)`,
			tableIdent(src.Table), key, val, strings.Join(cols, ", "))
	}
	got := make(map[K]V, len(missing))
	var created int64
	rows, err := tx.Query(ctx, sql, arg)
	if err != nil {
		return nil, fmt.Errorf("pgetl: Cache.%s in %s: %w", method, src.Table, err)
	}
	for rows.Next() {
		var k K
		var v V
		var isNew bool
		if err := rows.Scan(&k, &v, &isNew); err != nil {
			rows.Close()
			return nil, fmt.Errorf("pgetl: Cache.%s in %s: %w", method, src.Table, err)
		}
		if isNew {
			created++
		}
		// A row deleted concurrently after the snapshot can come back both old
		// (SELECT) and re-created (ins): the created one is the one that exists.
		if _, dup := got[k]; !dup || isNew {
			got[k] = v
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgetl: Cache.%s in %s: %w", method, src.Table, err)
	}
	c.created.Add(created)
	if len(got) == len(missing) {
		return got, nil
	}
	// Keys another transaction committed after this statement's snapshot: read them
	// with a new snapshot (READ COMMITTED).
	var rest []K
	for _, k := range missing {
		if _, ok := got[k]; !ok {
			rest = append(rest, k)
		}
	}
	var restArg any = rest
	restSQL := fmt.Sprintf("SELECT %s, %s FROM %s WHERE %s = ANY($1::%s[])", key, val, tableIdent(src.Table), key, keyType)
	if keyType == "" { // GetOrCreateFunc with a key type only JSON can carry
		objs := make([]map[string]any, len(rest))
		for i, k := range rest {
			objs[i] = map[string]any{src.Key: k}
		}
		js, err := json.Marshal(objs)
		if err != nil {
			return nil, fmt.Errorf("pgetl: Cache.%s: encode keys: %w", method, err)
		}
		restArg = string(js)
		restSQL = fmt.Sprintf("SELECT t.%[2]s, t.%[3]s FROM %[1]s AS t WHERE t.%[2]s IN (SELECT %[2]s FROM jsonb_populate_recordset(NULL::%[1]s, $1::jsonb))",
			tableIdent(src.Table), key, val)
	}
	rows, err = tx.Query(ctx, restSQL, restArg)
	if err != nil {
		return nil, fmt.Errorf("pgetl: Cache.%s in %s: %w", method, src.Table, err)
	}
	for rows.Next() {
		var k K
		var v V
		if err := rows.Scan(&k, &v); err != nil {
			rows.Close()
			return nil, fmt.Errorf("pgetl: Cache.%s in %s: %w", method, src.Table, err)
		}
		got[k] = v
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgetl: Cache.%s in %s: %w", method, src.Table, err)
	}
	for _, k := range rest {
		if _, ok := got[k]; !ok {
			return nil, fmt.Errorf("pgetl: Cache.%s in %s: key %v neither inserted nor found (deleted concurrently?)",
				method, src.Table, k)
		}
	}
	return got, nil
}

// stage adds got to the entries staged for ht, registering the publication on its
// first use.
func (c *Cache[K, V]) stage(ht commitHooks, got map[K]V) {
	// A transaction type that is not comparable cannot key the map: its calls each
	// stage on their own (later calls in the same transaction then just do not see
	// the earlier calls' entries before the commit).
	comparable := reflect.TypeOf(ht).Comparable()
	c.stagesMu.Lock()
	var st *cacheStage[K, V]
	if comparable {
		st = c.stages[ht]
	}
	if st != nil {
		for k, v := range got {
			st.m[k] = v
		}
		c.stagesMu.Unlock()
		return
	}
	st = &cacheStage[K, V]{m: maps.Clone(got)}
	if comparable {
		c.stages[ht] = st
	}
	c.stagesMu.Unlock()
	ht.onCommit(func() { c.publish(ht, st, comparable) })
	ht.onRollback(func() { c.drop(ht, st, comparable) })
}

// publish makes st's entries visible, after its transaction committed.
func (c *Cache[K, V]) publish(ht commitHooks, st *cacheStage[K, V], keyed bool) {
	c.stagesMu.Lock()
	defer c.stagesMu.Unlock()
	if keyed && c.stages[ht] == st {
		delete(c.stages, ht)
	}
	for k, v := range st.m {
		if !c.put(k, v) {
			c.rejected.Add(1)
		}
	}
	c.published.Add(int64(len(st.m)))
	st.m = nil
}

// drop forgets st's entries, after its transaction rolled back or was abandoned.
func (c *Cache[K, V]) drop(ht commitHooks, st *cacheStage[K, V], keyed bool) {
	c.stagesMu.Lock()
	defer c.stagesMu.Unlock()
	if keyed && c.stages[ht] == st {
		delete(c.stages, ht)
	}
	st.m = nil
}

// HasKey reports whether the cache holds key (of type K), so a Cache of K to
// struct{} serves as a [KeySet] for [BatchConfig.KeyCache].
func (c *Cache[K, V]) HasKey(key any) bool {
	k, ok := key.(K)
	if !ok {
		return false
	}
	_, ok = c.Get(k)
	return ok
}

// keyGoType returns K: a batch checks it against its key column at Batch.
func (c *Cache[K, V]) keyGoType() reflect.Type { return reflect.TypeFor[K]() }

// AddKeys puts keys (of type K) with V's zero value; as a [KeySet], a batch calls it
// with the keys it inserted, after its commit. Use it on a Cache of K to struct{}:
// for another V the zero value would stand for the key's real value.
func (c *Cache[K, V]) AddKeys(keys []any) {
	var zero V
	for _, key := range keys {
		if k, ok := key.(K); ok {
			c.Put(k, zero)
		}
	}
}
