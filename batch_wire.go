package pgetl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgproto3"
)

// copyChunkRows returns how many rows go in each COPY statement of a batch of n
// rows. In PostgreSQL 15 a COPY statement's multi-insert buffer costs the server
// time quadratic in its first ~1,000 rows (measured: ≈1.9 ms for a COPY that
// buffers 1,000 rows, ≈0.15 ms for 250), so a small batch is cheaper as several
// COPY statements of 250 rows in its one transaction; a large batch pays that cost
// once and is sent as one COPY.
func copyChunkRows(n int) int {
	if n <= 4000 {
		return 250
	}
	return n
}

// wireChunk is the most sendBatch hands to one Write: 64 KiB, as pgconn's CopyFrom
// (its CopyData messages are at most 64 KiB).
const wireChunk = 64 << 10

// wireBufs holds sendBatch's reusable chunk buffers (*[]byte of cap wireChunk).
var wireBufs = sync.Pool{New: func() any { b := make([]byte, 0, wireChunk); return &b }}

// sendBatch runs one batch on pgc in a single round trip: a simple-protocol Query
// holding sql (whose COPY … FROM STDIN statements, in order, read copies), with the
// data of every COPY written right behind it. It returns the last command tag, the
// first error the server reported, and how many COPY statements completed before
// it (to place a COPY error's line in the batch). Data for a COPY the server never
// reaches (after an error) is ignored by the server, as the protocol specifies for
// CopyData outside COPY mode.
//
// The message goes out in writes of exactly 64 KiB (the last one shorter): small
// pieces (headers, short runs of rows) are copied into a reusable chunk buffer,
// large runs of rows are written from the batch's own buffer in 64 KiB slices. So a
// batch of B bytes costs ceil(B/64 KiB) writes on any net.Conn: net.Buffers.WriteTo
// uses writev only on a bare *net.TCPConn and falls back to one write per buffer on
// a TLS or wrapped connection (21 writes for a 1,000-row batch in 4 COPYs, each a
// TLS record of its own).
//
// The write runs in its own goroutine while this one reads, as pgconn's CopyFrom
// does, so a server that sends many notices cannot deadlock with a large write.
// When the writer fails it closes the connection at once (as CopyFrom's writer
// does), so the reader fails too instead of waiting for a reply that cannot come;
// when the reader fails it closes the connection, so the writer does not wait for
// the kernel. Any transport failure leaves pgc closed; a server error (ERROR) with
// the exchange complete leaves it open, in the failed transaction, for a ROLLBACK.
//
// How the connection is taken mirrors pgconn's CopyFrom as far as pgconn's exported
// API allows:
//
//   - CopyFrom holds pgconn's lock (status busy) for the whole exchange. That lock is
//     not exported: sendBatch refuses a busy or closed pgc, and otherwise relies on
//     owning pgc (acquired from the pool, used by one goroutine); between the
//     ReceiveMessage calls pgconn sees the connection idle.
//   - CopyFrom writes through pgconn's own Frontend; sendBatch writes to pgc.Conn()
//     directly, so it first calls SyncConn (pgconn's documented precondition for
//     direct use: no buffered read, no background reader), which is free on an idle
//     connection.
//   - CopyFrom watches ctx once, with the connection's configured context watcher.
//     That watcher is not exported: sendBatch watches ctx once for the whole exchange
//     with its own ctxwatch.ContextWatcher and pgconn's DeadlineContextWatcherHandler
//     (a canceled ctx sets a past deadline on the connection; no CancelRequest is
//     sent, which a configured CancelRequestContextWatcherHandler would do), and
//     reads with ReceiveMessage(context.Background()) so that pgconn does not watch
//     ctx again for every message. As in pgconn, a batch that completed before ctx
//     ended reports its result, and an interrupted one an error wrapping ctx.Err().
//   - Messages are read with ReceiveMessage, so pgconn still tracks the transaction
//     status, parameter statuses, notices and OnPgError as for its own queries.
func sendBatch(ctx context.Context, pgc *pgconn.PgConn, sql string, copies []net.Buffers) (tag string, copiesDone int, err error) {
	return sendBatchRows(ctx, pgc, sql, copies, nil)
}

// sendBatchRows is sendBatch that also hands the values (text format) of every row
// the message's queries return to onRow, in order; onRow must not keep them.
func sendBatchRows(ctx context.Context, pgc *pgconn.PgConn, sql string, copies []net.Buffers, onRow func([][]byte)) (tag string, copiesDone int, err error) {
	res, last, err := exchange(ctx, pgc, []pipeMsg{{sql: sql, copies: copies}}, onRow)
	if err == nil {
		last = res[0]
	}
	if last.err != nil {
		// Also after a transport failure: a FATAL error (the server ending the
		// session) arrives before the connection drops, and classifies the failure.
		return last.tag, last.copiesDone, last.err
	}
	return last.tag, last.copiesDone, err
}

// copyDoneMsg is the protocol's CopyDone message.
var copyDoneMsg = []byte{'c', 0, 0, 0, 4}

// writeChunked writes bufs to w in writes of exactly wireChunk bytes but the last:
// pieces are gathered in a pooled chunk buffer, and whole wireChunk slices of a
// large piece are written from the piece itself when the chunk buffer is empty.
func writeChunked(w net.Conn, bufs net.Buffers) error {
	p := wireBufs.Get().(*[]byte)
	defer wireBufs.Put(p)
	chunk := (*p)[:0]
	for _, b := range bufs {
		for len(b) > 0 {
			if len(chunk) == 0 && len(b) >= wireChunk {
				if _, err := w.Write(b[:wireChunk]); err != nil {
					return err
				}
				b = b[wireChunk:]
				continue
			}
			n := min(len(b), wireChunk-len(chunk))
			chunk = append(chunk, b[:n]...)
			b = b[n:]
			if len(chunk) == wireChunk {
				if _, err := w.Write(chunk); err != nil {
					return err
				}
				chunk = chunk[:0]
			}
		}
	}
	if len(chunk) > 0 {
		if _, err := w.Write(chunk); err != nil {
			return err
		}
	}
	return nil
}

// closeConn closes pgc after a failed exchange, without waiting on the network for
// longer than a second.
func closeConn(pgc *pgconn.PgConn) {
	cctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = pgc.Close(cctx)
	cancel()
}

// interruptedError is a transport failure caused by the caller's context ending:
// it wraps both, so errors.Is(err, context.Canceled) holds as for pgconn's own
// timeouts.
type interruptedError struct {
	ctxErr, err error
}

func (e *interruptedError) Error() string {
	return fmt.Sprintf("pgetl: batch interrupted: %v (%v)", e.ctxErr, e.err)
}

func (e *interruptedError) Unwrap() []error { return []error{e.ctxErr, e.err} }

// pipeMsg is one simple-protocol Query of a pipeline (see sendPipeline), with the data
// of its COPY … FROM STDIN statements.
type pipeMsg struct {
	sql    string
	copies []net.Buffers
}

// pipeResult is the server's answer to one pipeMsg.
type pipeResult struct {
	tag        string          // the last command tag
	copiesDone int             // COPY statements that completed before err
	err        *pgconn.PgError // the first error the message raised, if any
}

// sendPipeline runs msgs on pgc in one round trip: the Query messages (each with its
// COPY data right behind it) are written back to back without waiting, then every
// reply is read, up to one ReadyForQuery per message. An error skips only the rest of
// its own message: the server goes on with the next one, which inside a transaction
// block fails in turn unless it starts with ROLLBACK [TO SAVEPOINT] (the isolation of
// bad rows relies on that). The exchange (writes of 64 KiB, a concurrent writer and
// reader, one context watch, closing the connection when either side fails) is
// sendBatch's; a transport failure returns an error and leaves pgc closed, server
// errors are in the results.
func sendPipeline(ctx context.Context, pgc *pgconn.PgConn, msgs []pipeMsg) ([]pipeResult, error) {
	res, last, err := exchange(ctx, pgc, msgs, nil)
	if err != nil && last.err != nil {
		// A FATAL error arrives before the connection drops: it classifies the
		// failure.
		return res, last.err
	}
	return res, err
}

// exchange is the one exchange behind sendBatch and sendPipeline (documented at
// sendBatch): it writes msgs back to back from a writer goroutine while it reads the
// replies, one ReadyForQuery per message, handing the rows of messages without an
// error so far to onRow (if set). It returns the results of the messages answered;
// after a transport failure (err, pgc closed) also the partial result of the
// message it was reading.
func exchange(ctx context.Context, pgc *pgconn.PgConn, msgs []pipeMsg, onRow func([][]byte)) (res []pipeResult, cur pipeResult, err error) {
	if pgc.IsBusy() {
		return nil, cur, errors.New("pgetl: bug: batch on a busy connection")
	}
	if pgc.IsClosed() {
		// Nothing sent: a lost connection, transient like pgconn's "conn closed".
		return nil, cur, fmt.Errorf("pgetl: batch not sent: %w", net.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return nil, cur, err
	}
	if err := pgc.SyncConn(ctx); err != nil {
		closeConn(pgc)
		return nil, cur, err
	}
	conn := pgc.Conn()

	var out net.Buffers
	for _, m := range msgs {
		q := make([]byte, 0, 5+len(m.sql)+1+5*len(m.copies))
		q = append(q, 'Q', 0, 0, 0, 0)
		q = append(q, m.sql...)
		q = append(q, 0)
		binary.BigEndian.PutUint32(q[1:], uint32(len(q)-1))
		out = append(out, q)
		for _, data := range m.copies {
			var n int
			for _, b := range data {
				n += len(b)
			}
			// q never grows past its capacity, so earlier slices of it stay valid.
			q = binary.BigEndian.AppendUint32(append(q, 'd'), uint32(n+4))
			out = append(out, q[len(q)-5:])
			out = append(out, data...)
			out = append(out, copyDoneMsg)
		}
	}

	// One watch for the whole exchange: a canceled ctx interrupts the blocked write
	// and read alike.
	watch := ctxwatch.NewContextWatcher(&pgconn.DeadlineContextWatcherHandler{Conn: conn})
	watch.Watch(ctx)
	// The first side to fail closes the connection, which fails the other side:
	// its error is the cause.
	var (
		failOnce sync.Once
		failErr  error
	)
	fail := func(err error) {
		failOnce.Do(func() {
			failErr = err
			_ = conn.Close()
		})
	}
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		if err := writeChunked(conn, out); err != nil {
			// Fatal for the connection: close it now so the reader's blocked read
			// fails, as pgconn's CopyFrom does.
			fail(err)
		}
	}()

	res = make([]pipeResult, 0, len(msgs))
	for len(res) < len(msgs) {
		m, rerr := pgc.ReceiveMessage(context.Background())
		if rerr != nil {
			// The protocol state is unknown: close, which unblocks the writer.
			fail(rerr)
			break
		}
		switch m := m.(type) {
		case *pgproto3.DataRow:
			if onRow != nil && cur.err == nil {
				onRow(m.Values)
			}
		case *pgproto3.CommandComplete:
			cur.tag = string(m.CommandTag)
			if cur.err == nil && len(cur.tag) > 5 && cur.tag[:5] == "COPY " {
				cur.copiesDone++
			}
		case *pgproto3.ErrorResponse:
			if cur.err == nil {
				cur.err = pgconn.ErrorResponseToPgError(m)
			}
		case *pgproto3.ReadyForQuery:
			res = append(res, cur)
			cur = pipeResult{}
		}
	}
	<-wdone
	err = failErr   // written before wdone closed or by this goroutine
	watch.Unwatch() // clears the deadline if ctx ended
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			err = &interruptedError{ctxErr: ctxErr, err: err}
		}
		closeConn(pgc)
	}
	return res, cur, err
}
