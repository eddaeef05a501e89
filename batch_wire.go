package pgetl

import (
	"context"
	"encoding/binary"
	"net"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
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

// sendBatch runs one batch on pgc in a single round trip: a simple-protocol Query
// holding sql (whose COPY … FROM STDIN statements, in order, read copies), with the
// data of every COPY written right behind it in one vectored write. It returns the
// last command tag, the first error the server reported, and how many COPY
// statements completed before it (to place a COPY error's line in the batch). Data for a COPY the
// server never reaches (after an error) is ignored by the server, as the protocol
// specifies for CopyData outside COPY mode.
//
// The write runs in its own goroutine while this one reads, as pgconn's CopyFrom
// does, so a server that sends many notices cannot deadlock with a large write.
// A transport failure closes the connection.
func sendBatch(ctx context.Context, pgc *pgconn.PgConn, sql string, copies []net.Buffers) (tag string, copiesDone int, err error) {
	conn := pgc.Conn()
	msg := make(net.Buffers, 0, 2+4*len(copies))
	q := make([]byte, 0, 5+len(sql)+1+5*2*len(copies))
	q = append(q, 'Q', 0, 0, 0, 0)
	q = append(q, sql...)
	q = append(q, 0)
	binary.BigEndian.PutUint32(q[1:], uint32(len(q)-1))
	msg = append(msg, q)
	for _, data := range copies {
		var n int
		for _, b := range data {
			n += len(b)
		}
		hdr := binary.BigEndian.AppendUint32([]byte{'d'}, uint32(n+4))
		msg = append(msg, hdr)
		msg = append(msg, data...)
		msg = append(msg, []byte{'c', 0, 0, 0, 4})
	}

	// A canceled ctx interrupts a blocked write the way pgconn interrupts reads.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetWriteDeadline(time.Unix(1, 0)) })
	werr := make(chan error, 1)
	go func() {
		_, err := msg.WriteTo(conn)
		werr <- err
	}()

	var pgErr error
	for {
		m, rerr := pgc.ReceiveMessage(ctx)
		if rerr != nil {
			err = rerr
			break
		}
		switch m := m.(type) {
		case *pgproto3.CommandComplete:
			tag = string(m.CommandTag)
			if pgErr == nil && len(tag) > 5 && tag[:5] == "COPY " {
				copiesDone++
			}
		case *pgproto3.ErrorResponse:
			if pgErr == nil {
				pgErr = pgconn.ErrorResponseToPgError(m)
			}
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	if err != nil {
		// Unblock the writer, then close: the protocol state is unknown.
		_ = conn.SetDeadline(time.Unix(1, 0))
	}
	if e := <-werr; e != nil && err == nil {
		err = e
	}
	if !stop() && err == nil {
		// ctx ended as the batch finished: the write deadline may be set, so the
		// connection must not be reused.
		err = ctx.Err()
	}
	if err != nil {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = pgc.Close(cctx)
		cancel()
		if pgErr != nil {
			// A FATAL error (the server ending the session) arrives before the
			// connection drops: report it, it classifies the failure.
			return tag, copiesDone, pgErr
		}
		return tag, copiesDone, err
	}
	if pgErr != nil {
		return tag, copiesDone, pgErr
	}
	return tag, copiesDone, nil
}
