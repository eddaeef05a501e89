package pgetl

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5/pgconn"
)

// Defaults of [RetryPolicy].
const (
	// MaxAttemptsDefault is the number of attempts of one unit of work.
	MaxAttemptsDefault = 10
	// MaxElapsedDefault bounds the time spent retrying one unit of work.
	MaxElapsedDefault = 5 * time.Minute
	// InitialBackoffDefault is the first backoff's upper bound.
	InitialBackoffDefault = 100 * time.Millisecond
	// MaxBackoffDefault caps the backoff.
	MaxBackoffDefault = 10 * time.Second
)

// RetryPolicy bounds the retries of transient failures (see [IsTransient]). Backoff
// is exponential with full jitter.
type RetryPolicy struct {
	// MaxAttempts is the number of attempts, the first included. Defaults to
	// MaxAttemptsDefault; 1 disables retries.
	MaxAttempts int
	// MaxElapsed bounds the total time spent retrying one unit of work. Defaults to
	// MaxElapsedDefault.
	MaxElapsed time.Duration
	// InitialBackoff is the first backoff's upper bound. Defaults to
	// InitialBackoffDefault.
	InitialBackoff time.Duration
	// MaxBackoff caps the backoff. Defaults to MaxBackoffDefault.
	MaxBackoff time.Duration
}

// RetryEvent describes a failed attempt that is about to be retried.
type RetryEvent struct {
	Job     string        // the job's name
	Seq     int64         // batch sequence being committed
	Attempt int           // the attempt that failed, from 1
	Class   string        // the failure's class, as counted in Stat.Retries
	Backoff time.Duration // the wait before the next attempt
	Err     error         // the failure
}

// commitOutcome is what one attempt to commit a unit of work reports.
type commitOutcome int

const (
	outcomeFailed    commitOutcome = iota // the attempt failed; the error says how
	outcomeCommitted                      // COMMIT succeeded
	outcomeInDoubt                        // the connection failed after COMMIT may have been sent
)

// run commits one unit of work (batch seq) with attempt, retrying transient failures
// with backoff and resolving an in-doubt COMMIT from the checkpoint. Caller must hold
// commitMu.
func (s *Session) run(ctx context.Context, seq int64, attempt func(ctx context.Context, n int) (commitOutcome, error)) error {
	start := time.Now()
	r := s.cfg.Retry
	for n := 1; ; n++ {
		outcome, err := attempt(ctx, n)
		if outcome == outcomeCommitted {
			return nil
		}
		if ctx.Err() != nil {
			if outcome == outcomeInDoubt {
				// The caller gave up while the transaction may still run on the
				// server (its whole message was sent): end it, and learn whether it
				// had committed.
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
				committed, rerr := s.resolve(rctx, seq)
				cancel()
				if rerr == nil && committed {
					s.count("in_doubt_committed")
					return nil
				}
				if rerr != nil {
					s.mu.Lock()
					s.resync = true
					s.mu.Unlock()
				}
			}
			return ctx.Err()
		}
		if pg := pgErrorOf(err); pg != nil {
			switch pg.Code {
			case codeAlreadyCommitted:
				if n == 1 {
					s.mu.Lock()
					s.resync = true
					s.mu.Unlock()
					return fmt.Errorf("pgetl: job %q: checkpoint is ahead of this session (batch %d already committed); retry to resync: %w", s.cfg.Job, seq, err)
				}
				// A replay found its batch committed: the earlier attempt's COMMIT
				// went through after all.
				s.count("in_doubt_committed")
				return nil
			case codeFenced:
				s.fence()
				return fmt.Errorf("%w: job %q batch %d: %w", ErrFenced, s.cfg.Job, seq, err)
			}
		}
		if outcome == outcomeInDoubt {
			committed, rerr := s.resolve(ctx, seq)
			if rerr == nil && committed {
				s.log.Info("pgetl: in-doubt commit resolved: committed", "job", s.cfg.Job, "seq", seq)
				s.count("in_doubt_committed")
				return nil
			}
			if rerr != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if errors.Is(rerr, ErrFenced) {
					return rerr
				}
				// Unresolved: the replay's checkpoint fence still prevents a duplicate.
				s.log.Warn("pgetl: in-doubt commit unresolved; replay is fenced by the checkpoint", "job", s.cfg.Job, "seq", seq, "err", rerr)
			}
		}
		if !IsTransient(err) {
			return err
		}
		class := retryClass(err)
		if n >= r.MaxAttempts || time.Since(start) >= r.MaxElapsed {
			return fmt.Errorf("%w: job %q batch %d after %d attempts in %v: %w", ErrRetriesExhausted, s.cfg.Job, seq, n, time.Since(start).Round(time.Millisecond), err)
		}
		backoff := s.backoff(n)
		s.mu.Lock()
		s.stat.retries[class]++
		s.mu.Unlock()
		s.log.Warn("pgetl: retrying", "job", s.cfg.Job, "seq", seq, "attempt", n, "class", class, "backoff", backoff, "err", err)
		if s.cfg.OnRetryFunc != nil {
			s.cfg.OnRetryFunc(RetryEvent{Job: s.cfg.Job, Seq: seq, Attempt: n, Class: class, Backoff: backoff, Err: err})
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// backoff returns the wait before attempt n+1: full jitter over an exponential bound.
func (s *Session) backoff(n int) time.Duration {
	r := s.cfg.Retry
	bound := r.InitialBackoff << min(n-1, 30)
	if bound > r.MaxBackoff || bound <= 0 {
		bound = r.MaxBackoff
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	x := uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 | uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48
	return time.Duration(x%uint64(bound)) + bound/10
}

func retryClass(err error) string {
	if pg := pgErrorOf(err); pg != nil {
		switch {
		case pg.Code == "40001":
			return "serialization"
		case pg.Code == "40P01":
			return "deadlock"
		case pg.Code == "55P03":
			return "lock_timeout"
		case pg.Code == "25006":
			return "read_only"
		case pg.Code == "53300":
			return "too_many_connections"
		case pg.Code == "25P03" || pg.Code == "57P05":
			return "idle_timeout"
		case strings.HasPrefix(pg.Code, "57P"):
			return "server_shutdown"
		}
		return "sqlstate_" + pg.Code
	}
	return "connection"
}

func (s *Session) count(class string) {
	s.mu.Lock()
	s.stat.retries[class]++
	s.mu.Unlock()
}

// IsTransient reports whether err is worth retrying on a fresh connection: a lost or
// refused connection, a server shutting down or starting (57P01, 57P02, 57P03), an
// idle-session or idle-in-transaction timeout (57P05, 25P03), class 08, a
// serialization failure or deadlock (40001, 40P01), a lock not available (55P03), too
// many connections (53300), or a read-only transaction after a failover (25006).
// Data errors (classes 22 and 23) and cancellation by the caller's context are not.
// It never looks at message text.
func IsTransient(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		// A deadline inside pgconn on a live connection is reported as a timeout; the
		// caller's own context is checked before IsTransient is consulted.
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return transientCode(pgErr.Code)
	}
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true
	}
	if pgconn.Timeout(err) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ETIMEDOUT) {
		return true
	}
	// pgconn reports a connection it closed itself ("conn closed") without a typed
	// cause; SafeToRetry marks errors raised before anything was sent.
	return pgconn.SafeToRetry(err) || isConnClosed(err)
}

// isConnClosed reports the remaining errors of pgconn's transport layer: pgconn
// exposes no sentinel for a connection it had already marked closed ("conn
// closed"), but every error it raises around sending and receiving implements
// SafeToRetry (whatever it returns), while server errors are *PgError (handled
// above). So any such error counts as a lost connection: transient.
func isConnClosed(err error) bool {
	var c interface{ SafeToRetry() bool }
	return errors.As(err, &c)
}

func transientCode(code string) bool {
	switch code {
	case pgerrcode.AdminShutdown, pgerrcode.CrashShutdown, pgerrcode.CannotConnectNow,
		pgerrcode.IdleInTransactionSessionTimeout, pgerrcode.IdleSessionTimeout,
		pgerrcode.SerializationFailure, pgerrcode.DeadlockDetected,
		pgerrcode.LockNotAvailable, pgerrcode.TooManyConnections,
		pgerrcode.ReadOnlySQLTransaction:
		return true
	}
	return pgerrcode.IsConnectionException(code)
}

// isDataError reports a SQLSTATE for bad input data: class 22 (data exception), class
// 23 (integrity constraint violation) and 42804 (datatype mismatch).
func isDataError(code string) bool {
	return pgerrcode.IsDataException(code) || pgerrcode.IsIntegrityConstraintViolation(code) ||
		code == pgerrcode.DatatypeMismatch
}
