package pgetl

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// Tx runs fn in a short transaction on a connection acquired for it: BEGIN, the
// guards (SET LOCAL), fn, the checkpoint advance (so the session's fencing and
// in-doubt resolution cover custom work too), COMMIT, release. After a transient
// failure the transaction is rolled back and fn is called again on a fresh
// connection, so fn must do all its work through tx and must not keep effects of a
// failed attempt. fn must not call tx.Commit or tx.Rollback: return nil to commit, an
// error to roll back (that error is returned as is).
func (s *Session) Tx(ctx context.Context, fn func(pgx.Tx) error) error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if err := s.usable(); err != nil {
		return err
	}
	if err := s.sync(ctx); err != nil {
		return err
	}
	seq := s.nextSeq()
	var (
		fnErr error
		last  *sessionTx // the last attempt's transaction, whose hooks are pending
	)
	err := s.run(ctx, seq, func(ctx context.Context, n int) (commitOutcome, error) {
		if last != nil {
			last.runRollback() // a new attempt: the previous one did not commit
		}
		out, stx, err, ferr := s.txAttempt(ctx, seq, n, fn)
		last, fnErr = stx, ferr
		return out, err
	})
	if err == nil && fnErr == nil {
		s.committed(seq, nil, 0, 0, 0)
		if last != nil {
			last.runCommit()
		}
		return nil
	}
	if last != nil {
		last.runRollback()
	}
	if fnErr != nil {
		return fnErr
	}
	return err
}

// txAttempt is one attempt of Tx. The hooks of the returned transaction are pending:
// the caller runs them once the outcome is final.
func (s *Session) txAttempt(ctx context.Context, seq int64, n int, fn func(pgx.Tx) error) (out commitOutcome, stx *sessionTx, err, fnErr error) {
	t0 := time.Now()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return outcomeFailed, nil, err, nil
	}
	defer func() {
		conn.Release()
		s.mu.Lock()
		s.stat.holdNanos += int64(time.Since(t0))
		s.mu.Unlock()
	}()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return outcomeFailed, nil, err, nil
	}
	stx = &sessionTx{Tx: tx}
	if _, err := tx.Exec(ctx, s.guardSQL(seq)); err != nil {
		_ = tx.Rollback(ctx)
		return outcomeFailed, stx, err, nil
	}
	if ferr := fn(stx); ferr != nil {
		_ = tx.Rollback(ctx)
		if IsTransient(ferr) && ctx.Err() == nil {
			// fn's statement failed for a transient reason: retry the whole unit.
			return outcomeFailed, stx, ferr, nil
		}
		return outcomeFailed, stx, nil, ferr
	}
	if _, err := tx.Exec(ctx, s.advanceSQL(seq, nil, 0, 0)); err != nil {
		_ = tx.Rollback(ctx)
		return outcomeFailed, stx, err, nil
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
