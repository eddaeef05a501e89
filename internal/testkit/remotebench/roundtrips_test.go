package remotebench_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/testkit/faultproxy"
	"github.com/pgetl/pgetl/internal/workload"
	"github.com/stretchr/testify/require"
)

// turnCounter counts the request→reply turns of a pool's connections: each time a
// connection reads data after it wrote some, the client waited for the server once.
// On a link of round trip rtt, a call costs about turns × rtt (turns on different
// connections at the same time overlap).
type turnCounter struct {
	turns atomic.Int64
	dials atomic.Int64
}

// countingConn is a net.Conn whose turns are counted.
type countingConn struct {
	net.Conn
	c     *turnCounter
	wrote atomic.Bool // written since the last read that returned data
}

// Write implements io.Writer.
func (cc *countingConn) Write(p []byte) (int, error) {
	n, err := cc.Conn.Write(p)
	if n > 0 {
		cc.wrote.Store(true)
	}
	return n, err
}

// Read implements io.Reader.
func (cc *countingConn) Read(p []byte) (int, error) {
	n, err := cc.Conn.Read(p)
	if n > 0 && cc.wrote.Swap(false) {
		cc.c.turns.Add(1)
	}
	return n, err
}

// countingPool returns a pgetl pool (pgetl.ParseConfig's defaults) on connString
// whose connections count their turns in c. pgxpool's liveness ping of a connection
// idle for over a second (one more turn for the acquire that does it) is turned
// off, so that the counts do not depend on timing.
func countingPool(t *testing.T, connString string, c *turnCounter) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgetl.ParseConfig(connString)
	require.NoError(t, err)
	dial := cfg.ConnConfig.DialFunc
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		c.dials.Add(1)
		return &countingConn{Conn: conn, c: c}, nil
	}
	cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
	pool, err := pgetl.NewPoolWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// step is one call's cost: its turns, of which connection set-up.
type step struct {
	name         string
	turns, dials int64
	took         time.Duration
}

// TestRoundTrips counts the request→reply turns of the calls a job makes outside
// its batches (and of one batch), through a proxy adding 5 ms per round trip, on a
// fresh pool as a job's process starts with. The counts are asserted exactly: a
// change that adds a turn fails here; one that removes a turn updates want.
func TestRoundTrips(t *testing.T) {
	const rtt = 5 * time.Millisecond
	ctx := context.Background()
	db := pgtest.New(t)
	db.Exec(t, workload.CreateSQL(db.Ident(workload.Table), false))
	db.Exec(t, `CREATE TABLE skus (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, sku text NOT NULL UNIQUE)`)
	db.Exec(t, `INSERT INTO skus (sku) SELECT 'SKU-' || lpad(i::text, 7, '0') FROM generate_series(1, 100) i`)
	px := faultproxy.NewProxy(t, faults.TCPAddr(t, db.URL))
	px.RoundTrip(t, rtt)
	var c turnCounter
	var steps []step
	measure := func(name string, f func() error) {
		t.Helper()
		t0, d0, start := c.turns.Load(), c.dials.Load(), time.Now()
		require.NoError(t, f(), name)
		steps = append(steps, step{name: name, turns: c.turns.Load() - t0, dials: c.dials.Load() - d0, took: time.Since(start)})
	}

	// Connection set-up alone, on a pool of its own: what each dial below costs.
	connPool := countingPool(t, px.URL(db.URL), &c)
	measure("connect (startup, authentication)", func() error {
		conn, err := connPool.Acquire(ctx)
		if err == nil {
			conn.Release()
		}
		return err
	})
	connectTurns := steps[0].turns
	connPool.Close()

	pool := countingPool(t, px.URL(db.URL), &c)
	// A schema's first session creates the checkpoint objects: its claim fails
	// (no claim function), setup runs the DDL, the claim runs again.
	measure("NewSession, the schema's first (creates the objects)", func() error {
		first, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "roundtrips-setup", CheckpointSchema: db.Schema})
		if err != nil {
			return err
		}
		return first.Close(ctx)
	})
	// Every later session: the objects exist, as for every job but a schema's first.
	var s *pgetl.Session
	measure("NewSession", func() (err error) {
		s, err = pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "roundtrips", CheckpointSchema: db.Schema})
		return err
	})
	t.Cleanup(func() { _ = s.Close(ctx) })

	table := db.Qualified(workload.Table)
	addRows := func(bs *pgetl.BatchSession, from, to, v int64) error {
		for i := from; i <= to; i++ {
			if err := bs.Add(ctx, strconv.FormatInt(i, 10), workload.Row(i, v).Values()...); err != nil {
				return err
			}
		}
		return nil
	}
	var ins *pgetl.BatchSession
	measure("Session.Batch, insert (describe)", func() (err error) {
		ins, err = s.Batch(ctx, pgetl.BatchConfig{Table: table, Columns: workload.Columns})
		return err
	})
	measure("insert, first 1,000 rows (slow start: 2 batches)", func() error {
		if err := addRows(ins, 1, 1000, 1); err != nil {
			return err
		}
		return ins.Flush(ctx)
	})
	measure("insert, next 1,000 rows (1 batch)", func() error {
		if err := addRows(ins, 1001, 2000, 1); err != nil {
			return err
		}
		return ins.Flush(ctx)
	})
	measure("BatchSession.Close, nothing buffered", func() error { return ins.Close(ctx) })

	var ups *pgetl.BatchSession
	measure("Session.Batch, upsert (describe)", func() (err error) {
		ups, err = s.Batch(ctx, pgetl.BatchConfig{Table: table, Columns: workload.Columns, Key: []string{"sku"}})
		return err
	})
	measure("upsert, first 1,000 rows (2 batches, half exist)", func() error {
		if err := addRows(ups, 1501, 2500, 2); err != nil {
			return err
		}
		return ups.Flush(ctx)
	})
	measure("upsert, next 1,000 rows (1 batch, half exist)", func() error {
		if err := addRows(ups, 1001, 1500, 2); err != nil {
			return err
		}
		if err := addRows(ups, 2501, 3000, 2); err != nil {
			return err
		}
		return ups.Flush(ctx)
	})
	measure("BatchSession.Close, nothing buffered (upsert)", func() error { return ups.Close(ctx) })

	keys, err := pgetl.NewCache[string, int64](pgetl.CacheConfig{})
	require.NoError(t, err)
	measure("Cache.Preload, 100 rows", func() error {
		return keys.Preload(ctx, pool, pgetl.Lookup{Table: db.Qualified("skus"), Key: "sku", Value: "id"})
	})
	require.EqualValues(t, 100, keys.Stat().Len())
	paged, err := pgetl.NewCache[string, int64](pgetl.CacheConfig{})
	require.NoError(t, err)
	measure("Cache.Preload, 100 rows in 4 pages", func() error {
		return paged.Preload(ctx, pool, pgetl.Lookup{Table: db.Qualified("skus"), Key: "sku", Value: "id", PageSize: 30})
	})
	require.EqualValues(t, 100, paged.Stat().Len())
	require.EqualValues(t, 4, paged.Stat().PreloadedPages())
	measure("Session.Tx, nothing in it", func() error {
		return s.Tx(ctx, func(pgx.Tx) error { return nil })
	})
	measure("Session.Finish", func() error { return s.Finish(ctx) })
	measure("Session.Close", func() error { return s.Close(ctx) })
	// The job's next run (SessionConfig.Incremental): the same one claim.
	measure("NewSession, the next incremental run", func() error {
		next, err := pgetl.NewSession(ctx, pool, pgetl.SessionConfig{Job: "roundtrips", CheckpointSchema: db.Schema, Incremental: true})
		if err != nil {
			return err
		}
		cp, err := next.Checkpoint(ctx)
		if err == nil && (cp.Run != 2 || cp.Cursor != "3000") {
			err = fmt.Errorf("next run: got run %d after cursor %q, want run 2 after 3000", cp.Run, cp.Cursor)
		}
		return errors.Join(err, next.Close(ctx))
	})

	var cnt int64
	require.NoError(t, db.Pool.QueryRow(ctx, "SELECT count(*) FROM products").Scan(&cnt))
	require.EqualValues(t, 3000, cnt)

	// The counts of today, without connection set-up (connectTurns per dial). Lower
	// them when a change saves a turn. A batch is one turn (its statements and data
	// in one message). The one-off statements (NewSession's claim, which also checks
	// the version of the checkpoint objects, Finish, Close's release of the claim,
	// each Preload page) are one each: they run in QueryExecModeExec (parse, bind,
	// execute in one message) rather than pgx's default QueryExecModeCacheStatement,
	// which prepares a statement the first time a connection runs it (Parse and
	// Describe, one turn more). A schema's first session is three (the claim that
	// finds no objects, setup's DDL, the claim again) plus its Close's one. An
	// insert's describe is the target's Prepare; an upsert's is one simple-protocol
	// message (staging table, its column types, EXPLAIN of the merge). A Tx sends
	// BEGIN, its guards and its fence as one message, then COMMIT. Before issue
	// 17's round-trip work: NewSession 4, upsert describe 2, Preload 2 (a next page
	// 2 on a connection's first), Tx 3, Finish 2, Close 2.
	want := map[string]int64{
		"connect (startup, authentication)":                    1,
		"NewSession, the schema's first (creates the objects)": 4,
		"NewSession":                                       1,
		"Session.Batch, insert (describe)":                 1,
		"insert, first 1,000 rows (slow start: 2 batches)": 2,
		"insert, next 1,000 rows (1 batch)":                1,
		"BatchSession.Close, nothing buffered":             0,
		"Session.Batch, upsert (describe)":                 1,
		"upsert, first 1,000 rows (2 batches, half exist)": 2,
		"upsert, next 1,000 rows (1 batch, half exist)":    1,
		"BatchSession.Close, nothing buffered (upsert)":    0,
		"Cache.Preload, 100 rows":                          1,
		"Cache.Preload, 100 rows in 4 pages":               4, // one per page, the next pages' too
		"Session.Tx, nothing in it":                        2, // BEGIN, guards and fence in one; COMMIT
		"Session.Finish":                                   1,
		"Session.Close":                                    1,
		"NewSession, the next incremental run":             2, // its claim, and its Close
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "request→reply turns through a proxy adding %v per round trip (fresh pool; connection set-up = %d turn per connection opened):\n", rtt, connectTurns)
	got := map[string]int64{}
	for _, st := range steps {
		own := st.turns
		if st.name != steps[0].name {
			own -= st.dials * connectTurns
		}
		got[st.name] = own
		fmt.Fprintf(&sb, "  %-50s %2d turns", st.name, own)
		if st.dials > 0 && st.name != steps[0].name {
			fmt.Fprintf(&sb, " + %d connection(s) opened", st.dials)
		}
		fmt.Fprintf(&sb, "  (%v ≈ %.1f rtt)\n", st.took.Round(100*time.Microsecond), float64(st.took)/float64(rtt))
	}
	t.Log(sb.String())
	require.Equal(t, want, got, "round trips per call changed: a regression, or update want")
}
