package pgetl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
)

// countingConn counts the Write calls and bytes that reach a net.Conn. Installed
// with pgconn's AfterNetConnect it sits on top of TLS, so it sees the writes
// sendBatch makes; installed with DialFunc it sees what reaches the socket (TLS
// records).
type countingConn struct {
	net.Conn
	writes, bytes atomic.Int64
	// beforeWrite, when set, runs before each Write with the bytes written so far;
	// an error fails that Write without touching the connection.
	beforeWrite func(written int64) error
}

func (c *countingConn) Write(p []byte) (int, error) {
	if c.beforeWrite != nil {
		if err := c.beforeWrite(c.bytes.Load()); err != nil {
			return 0, err
		}
	}
	c.writes.Add(1)
	n, err := c.Conn.Write(p)
	c.bytes.Add(int64(n))
	return n, err
}

func (c *countingConn) reset() { c.writes.Store(0); c.bytes.Store(0) }

// wireConn connects to connString with a countingConn above TLS (top) and one on
// the socket (sock). Its application_name starts with the test's schema, so
// pgtest's cleanup ends its backend.
func wireConn(t *testing.T, db *pgtest.DB, connString string) (pgc *pgconn.PgConn, top, sock *countingConn) {
	t.Helper()
	cfg, err := pgconn.ParseConfig(connString)
	require.NoError(t, err)
	cfg.RuntimeParams["application_name"] = db.Schema + "_wire"
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		sock = &countingConn{Conn: c}
		return sock, nil
	}
	cfg.AfterNetConnect = func(ctx context.Context, cfg *pgconn.Config, c net.Conn) (net.Conn, error) {
		top = &countingConn{Conn: c}
		return top, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pgc, err = pgconn.ConnectConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = pgc.Close(context.Background()) })
	return pgc, top, sock
}

// wireRow is row id of the wire table (id bigint, name text) in COPY binary format.
func wireRow(id int64) []byte {
	name := fmt.Sprintf("row %d %s", id, strings.Repeat("x", 40))
	b := binary.BigEndian.AppendUint16(nil, 2)
	b = binary.BigEndian.AppendUint32(b, 8)
	b = binary.BigEndian.AppendUint64(b, uint64(id))
	b = binary.BigEndian.AppendUint32(b, uint32(len(name)))
	return append(b, name...)
}

// wireCopies returns rows 1..n as COPY streams of at most per rows each: one
// buffer for all of a stream's rows, or (fragmented) one buffer per row, as a
// batch with rejects between its rows has.
func wireCopies(n, per int, fragmented bool) []net.Buffers {
	var copies []net.Buffers
	for first := 1; first <= n; first += per {
		bufs := net.Buffers{copyHeader}
		var run []byte
		for id := first; id < first+per && id <= n; id++ {
			if fragmented {
				bufs = append(bufs, wireRow(int64(id)))
			} else {
				run = append(run, wireRow(int64(id))...)
			}
		}
		if !fragmented {
			bufs = append(bufs, run)
		}
		copies = append(copies, append(bufs, copyTrailer))
	}
	return copies
}

func wireSQL(table string, copies int) string {
	return "BEGIN;" + strings.Repeat("COPY "+table+" (id, name) FROM STDIN (FORMAT binary);", copies) + "COMMIT"
}

// TestSendBatchWrites checks that sendBatch writes a batch in chunks of 64 KiB on
// every transport, TLS and PgBouncer included: at most ceil(bytes/64 KiB)+1 Write
// calls, where net.Buffers.WriteTo made one per buffer on a TLS or wrapped
// connection (21 for 1,000 rows in four COPYs, one per row for a fragmented batch).
func TestSendBatchWrites(t *testing.T) {
	t.Parallel()
	pgtest.RunTransports(t, func(t *testing.T, tr pgtest.Transport) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE wire (id bigint PRIMARY KEY, name text NOT NULL)")
		table := db.Ident("wire")
		for _, tc := range []struct {
			name       string
			rows, per  int
			fragmented bool
		}{
			{"1000_rows_4_copies", 1000, 250, false},
			{"1000_rows_fragmented", 1000, 250, true},
			{"20000_rows_1_copy", 20000, 20000, false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := context.Background()
				db.Exec(t, "TRUNCATE wire")
				pgc, top, sock := wireConn(t, db, tr.URL)
				copies := wireCopies(tc.rows, tc.per, tc.fragmented)
				top.reset()
				sock.reset()
				tag, done, err := sendBatch(ctx, pgc, wireSQL(table, len(copies)), copies)
				require.NoError(t, err)
				require.Equal(t, "COMMIT", tag)
				require.Equal(t, len(copies), done)
				n := int64(tc.rows)
				require.Equal(t, n, db.Int(t, "SELECT count(*) FROM wire"))
				require.Equal(t, n*(n+1)/2, db.Int(t, "SELECT sum(id)::bigint FROM wire"))

				writes, bytes := top.writes.Load(), top.bytes.Load()
				limit := (bytes+wireChunk-1)/wireChunk + 1
				t.Logf("%s: %d bytes in %d writes (limit %d), %d socket writes", tr.Name, bytes, writes, limit, sock.writes.Load())
				require.LessOrEqual(t, writes, limit, "writes for %d bytes", bytes)
				require.False(t, pgc.IsClosed())
				require.Equal(t, byte('I'), pgc.TxStatus())
			})
		}
	})
}

// TestSendBatchWriterFails checks that a failed write ends the exchange at once: the
// writer closes the connection, so the reader does not wait for a server that is
// waiting for the rest of the batch, and the write's error is reported. The server
// then rolls the batch back.
func TestSendBatchWriterFails(t *testing.T) {
	t.Parallel()
	pgtest.RunTransports(t, func(t *testing.T, tr pgtest.Transport) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE wire (id bigint PRIMARY KEY, name text NOT NULL)")
		pgc, top, _ := wireConn(t, db, tr.URL)
		errInjected := &net.OpError{Op: "write", Net: "tcp", Err: syscall.ECONNRESET}
		top.beforeWrite = func(written int64) error {
			if written >= 2*wireChunk {
				return errInjected
			}
			return nil
		}
		copies := wireCopies(20000, 20000, false)
		// The deadline only bounds a failure of this test: the exchange must end
		// long before it, by the writer closing the connection.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		_, _, err := sendBatch(ctx, pgc, wireSQL(db.Ident("wire"), len(copies)), copies)
		// The cause is the writer's error, or (under TLS the server may see the
		// truncated stream first) the server's own report of the lost client, a
		// connection exception: either way a lost connection, retried.
		var pg *pgconn.PgError
		if !errors.Is(err, syscall.ECONNRESET) {
			require.ErrorAs(t, err, &pg, "the writer's error or the server's report of it: %v", err)
			require.True(t, strings.HasPrefix(pg.Code, "08"), "a connection exception: %v", err)
		}
		require.NoError(t, ctx.Err(), "sendBatch waited for the deadline")
		require.True(t, pgc.IsClosed())
		require.True(t, IsTransient(err))

		// The server sees the connection end and rolls back: poll for the backend
		// to go.
		for deadline := time.Now().Add(time.Minute); ; {
			if db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", db.Schema+"_wire") == 0 {
				break
			}
			require.True(t, time.Now().Before(deadline), "the batch's backend is still there")
			time.Sleep(20 * time.Millisecond)
		}
		require.Equal(t, int64(0), db.Int(t, "SELECT count(*) FROM wire"))
	})
}

// TestSendBatchCanceled cancels the context in the middle of a batch's writes: the
// exchange ends with an error wrapping context.Canceled, the connection is closed
// and the writer goroutine has ended (goleak in TestMain). The batch starts with a
// long pg_sleep, so no reply can end the exchange before the cancellation does.
func TestSendBatchCanceled(t *testing.T) {
	t.Parallel()
	pgtest.RunTransports(t, func(t *testing.T, tr pgtest.Transport) {
		t.Parallel()
		db := pgtest.New(t)
		db.Exec(t, "CREATE TABLE wire (id bigint PRIMARY KEY, name text NOT NULL)")
		pgc, top, _ := wireConn(t, db, tr.URL)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var once sync.Once
		top.beforeWrite = func(written int64) error {
			if written >= wireChunk {
				once.Do(cancel)
			}
			return nil
		}
		copies := wireCopies(20000, 20000, false)
		_, _, err := sendBatch(ctx, pgc, "SELECT pg_sleep(60);"+wireSQL(db.Ident("wire"), len(copies)), copies)
		require.ErrorIs(t, err, context.Canceled)
		require.True(t, pgc.IsClosed())
		require.False(t, IsTransient(err), "a canceled batch is not retried")
		require.Equal(t, int64(0), db.Int(t, "SELECT count(*) FROM wire"))
	})
}
