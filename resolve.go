package pgetl

import (
	"context"
	"strconv"
	"strings"
	"time"
)

// appName is the application_name of the transaction committing batch seq:
// "pgetl <job>#<seq>.<owner token>", unique per session and batch, and at most 63
// bytes (NAMEDATALEN-1) so the server keeps it whole. It lets pg_stat_activity show
// the job and batch, and lets in-doubt resolution find exactly that transaction's
// backend, also behind a pooler whose backend pids the client cannot know.
//
// Bytes outside printable ASCII become '?': the server would rewrite them anyway,
// and the name must read back exactly as sent.
func (s *Session) appName(seq int64) string {
	suffix := "#" + strconv.FormatInt(seq, 10) + "." + s.owner[:6]
	name := "pgetl " + strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, s.cfg.Job)
	if len(name)+len(suffix) > 63 {
		name = name[:63-len(suffix)]
	}
	return name + suffix
}

// resolve decides whether batch seq committed after its connection failed around
// COMMIT, or after the caller gave up waiting. It ends the batch's backend if it is
// still there (found by the batch's unique application_name; a backend that is
// ended before its COMMIT rolls back), then reads the checkpoint row with FOR
// UPDATE, which waits for any transaction still holding it: the answer is final, not
// a guess. Should the old message still reach the server later, the checkpoint fence
// makes it fail rather than commit a second time.
func (s *Session) resolve(ctx context.Context, seq int64) (committed bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Guards.IdleInTransactionTimeout+10*time.Second)
	defer cancel()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Release()
	ctx, tr := s.traceStart(ctx, conn.Conn(), "resolve in-doubt", seq, -1, -1, -1)
	defer func() { tr.end(resolvedTag(committed), err) }()
	app := s.appName(seq)
	_, _ = conn.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE application_name = $1 AND pid <> pg_backend_pid()`, app)
	// pg_terminate_backend only signals: wait (bounded) until the backend is gone.
	for i := 0; i < 100; i++ {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&n); err != nil || n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	row, err := readCheckpoint(ctx, conn, s.schema, s.cfg.Job, true)
	if err != nil {
		return false, err
	}
	if row.Owner != s.owner {
		// Another session owns the job now: its progress says nothing about this
		// batch.
		return false, s.fence()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if row.Seq < s.cp.Seq {
		return false, s.checkpointLost(row)
	}
	return row.Seq >= seq, nil
}
