package pgetl

import (
	"context"
	"errors"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Tx runs fn in a short transaction on a connection acquired for it: BEGIN, the
// guards (SET LOCAL) and the checkpoint's fence (so the session's fencing and
// in-doubt resolution cover custom work too) in one round trip, fn, COMMIT,
// release. After a transient failure the transaction is rolled back and fn is
// called again on a fresh connection, so fn must do all its work through tx and
// must not keep effects of a failed attempt. fn must not call tx.Commit or
// tx.Rollback: return nil to commit, an error to roll back (that error is returned
// as is).
//
// The fence runs before fn, so when a COMMIT whose outcome was unknown did go
// through, the replay stops at the fence and fn is not run again. It also means fn
// runs after the transaction's first query: to choose an isolation level, use
// TxWithOptions (SET TRANSACTION ISOLATION LEVEL inside fn fails with 25001).
func (s *Session) Tx(ctx context.Context, fn func(pgx.Tx) error) error {
	return s.TxWithOptions(ctx, pgx.TxOptions{}, fn)
}

// TxWithOptions is Tx with the transaction's options (isolation level, access mode,
// deferrable), as pgx's BeginTx takes them; a BeginQuery replaces the BEGIN of the
// message that also sends the guards and the fence.
func (s *Session) TxWithOptions(ctx context.Context, opts pgx.TxOptions, fn func(pgx.Tx) error) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.drain() // batches in flight commit first
	if err := s.usable(); err != nil {
		return err
	}
	if err := s.sync(ctx); err != nil {
		return err
	}
	seq := s.nextSeq()
	var (
		fnErr   error
		last    *sessionTx    // the last attempt's transaction
		lastOut commitOutcome // and its outcome
		doubt   []*sessionTx  // attempts whose COMMIT may have run: their hooks wait for the verdict
	)
	err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
		if last != nil {
			if lastOut == outcomeInDoubt {
				doubt = append(doubt, last)
			} else {
				last.runRollback() // did not commit
			}
		}
		out, stx, err, ferr := s.txAttempt(ctx, seq, n, opts, fn)
		last, lastOut, fnErr = stx, out, ferr
		return out, err
	})
	if err == nil && fnErr == nil {
		s.txCommitted(seq)
		// The attempt that committed: the last one if it says so, else (the run
		// settled an in-doubt commit) the one attempt in doubt. Should several have
		// been in doubt, which one committed is unknown: publish none of them.
		var won *sessionTx
		switch {
		case lastOut == outcomeCommitted:
			won = last
		case lastOut == outcomeInDoubt && len(doubt) == 0:
			won = last
		case lastOut != outcomeInDoubt && len(doubt) == 1:
			won = doubt[0]
		}
		for _, t := range append(doubt, last) {
			if t == nil {
				continue
			}
			if t == won {
				t.runCommit()
			} else {
				t.runRollback()
			}
		}
		return nil
	}
	for _, t := range append(doubt, last) {
		if t != nil {
			t.runRollback()
		}
	}
	if fnErr != nil {
		return fnErr
	}
	return err
}

// txAttempt is one attempt of Tx. The hooks of the returned transaction are pending:
// the caller runs them once the outcome is final.
func (s *Session) txAttempt(ctx context.Context, seq int64, n int, opts pgx.TxOptions, fn func(pgx.Tx) error) (out commitOutcome, stx *sessionTx, err, fnErr error) {
	conn, release, err := s.acquire(ctx)
	if err != nil {
		return outcomeFailed, nil, err, nil
	}
	defer release()
	ctx, tr := s.traceStart(ctx, conn.Conn(), "tx", seq, n, -1, -1)
	defer func() { tr.end(outcomeTag(out, false), errors.Join(err, fnErr)) }()
	// BEGIN, the guards and the fence in one round trip (one simple-protocol
	// message as the transaction's begin query), before fn.
	opts.BeginQuery = beginSQL(opts) + ";" + s.guardSQL(seq) + s.advanceSQL(seq, nil, 0, 0)
	tx, err := conn.BeginTx(ctx, opts)
	if err != nil {
		// A guard or the fence failed: the transaction the message began is
		// aborted; end it so the connection goes back to the pool usable.
		if pgc := conn.Conn().PgConn(); !pgc.IsClosed() && pgc.TxStatus() != 'I' {
			_, _ = conn.Exec(ctx, "ROLLBACK")
		}
		return outcomeFailed, nil, err, nil
	}
	stx = &sessionTx{Tx: tx}
	if ferr := fn(stx); ferr != nil {
		_ = tx.Rollback(ctx)
		if IsTransient(ferr) && ctx.Err() == nil {
			// fn's statement failed for a transient reason: retry the whole unit.
			return outcomeFailed, stx, ferr, nil
		}
		return outcomeFailed, stx, nil, ferr
	}
	if s.cfg.beforeCommit != nil {
		s.cfg.beforeCommit(ctx, seq, n, conn.Conn().PgConn())
	}
	if err := tx.Commit(ctx); err != nil {
		if pg := pgErrorOf(err); pg != nil && pg.Severity == "ERROR" {
			return outcomeFailed, stx, err, nil
		}
		return outcomeInDoubt, stx, err, nil
	}
	return outcomeCommitted, stx, nil, nil
}

// sessionTx is the pgx.Tx handed to Session.Tx's function.
type sessionTx struct {
	pgx.Tx
	commitFns, rollbackFns []func()
}

var errTxManaged = errors.New("pgetl: Session.Tx commits and rolls back for you: return nil to commit, an error to roll back")

// Commit refuses: Session.Tx commits after fn returns nil.
func (t *sessionTx) Commit(context.Context) error { return errTxManaged }

// Rollback refuses: Session.Tx rolls back when fn returns an error.
func (t *sessionTx) Rollback(context.Context) error { return errTxManaged }

func (t *sessionTx) onCommit(f func()) { t.commitFns = append(t.commitFns, f) }

func (t *sessionTx) onRollback(f func()) { t.rollbackFns = append(t.rollbackFns, f) }

func (t *sessionTx) runCommit() {
	for _, f := range t.commitFns {
		f()
	}
	t.commitFns, t.rollbackFns = nil, nil
}

func (t *sessionTx) runRollback() {
	for _, f := range t.rollbackFns {
		f()
	}
	t.commitFns, t.rollbackFns = nil, nil
}

var _ commitHooks = (*sessionTx)(nil)

// beginSQL is the statement that begins a transaction of opts, as pgx renders it
// (opts.BeginQuery if set).
func beginSQL(opts pgx.TxOptions) string {
	if opts.BeginQuery != "" {
		return opts.BeginQuery
	}
	var b strings.Builder
	b.WriteString("begin")
	if opts.IsoLevel != "" {
		b.WriteString(" isolation level " + string(opts.IsoLevel))
	}
	if opts.AccessMode != "" {
		b.WriteString(" " + string(opts.AccessMode))
	}
	if opts.DeferrableMode != "" {
		b.WriteString(" " + string(opts.DeferrableMode))
	}
	return b.String()
}

// commitHooks is implemented by the pgx.Tx that [Session.Tx] hands to its function
// (and by the transaction of a batch flush). Code that stages state for a transaction
// (the [Cache]) registers what to do once the COMMIT is confirmed (publish) or once
// the transaction is known not to have committed (discard). Hooks run after the
// connection is released, in registration order, at most once; on a retry the
// attempt's hooks are discarded with it.
type commitHooks interface {
	pgx.Tx
	onCommit(f func())
	onRollback(f func())
}
