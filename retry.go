package pgetl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
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
//
// Every attempt puts the checkpoint's fence first in its transaction (advanceSQL),
// so a replay of a unit that did commit fails at once with PGF02 and is counted as
// committed: an in-doubt commit that could not be resolved is settled by the next
// attempt that reaches the server. If none does (the caller gives up, retries run
// out), the error wraps ErrInDoubt: the outcome is unknown, and the session re-reads
// the checkpoint before its next unit of work (and in Checkpoint).
func (s *Session) run(ctx context.Context, seq int64, attempt func(ctx context.Context, n int) (commitOutcome, error)) error {
	start := s.clock.now()
	attempts, settled := 0, false
	defer func() { s.noteUnit(seq, attempts, settled) }()
	doubt := false // an attempt's COMMIT may have run and no later attempt settled it
	inDoubt := func(err error) error {
		if !doubt {
			return err
		}
		s.mu.Lock()
		s.resync = true
		s.mu.Unlock()
		return &InDoubtError{Job: s.cfg.Job, Seq: seq, Err: err}
	}
	actx := ctx // the attempt's: after a failure, says which class the next one retries
	for n := 1; ; n++ {
		outcome, err := attempt(actx, n)
		attempts = n
		if outcome == outcomeCommitted {
			return nil
		}
		if pg := pgErrorOf(err); pg != nil {
			switch {
			case pg.Code == codeAlreadyCommitted && doubt:
				// A replay found its batch committed at the fence: an earlier
				// attempt's COMMIT went through after all.
				s.log.Info("pgetl: in-doubt commit resolved by the replay's fence: committed", "job", s.cfg.Job, "seq", seq)
				s.count("in_doubt_committed")
				settled = true
				return nil
			case pg.Code == codeAlreadyCommitted:
				s.mu.Lock()
				s.resync = true
				s.mu.Unlock()
				return fmt.Errorf("pgetl: job %q: checkpoint is ahead of this session (batch %d already committed); retry to resync: %w", s.cfg.Job, seq, err)
			case pg.Code == codeFenced:
				s.fence()
				return fmt.Errorf("%w: job %q batch %d: %w", ErrFenced, s.cfg.Job, seq, err)
			case pg.Code == codeCheckpointGap:
				gerr := s.gap(context.WithoutCancel(ctx), seq, err)
				if !errors.Is(gerr, errPredecessorPending) {
					return gerr
				}
				// A batch before this one, in flight, has not committed within
				// lock_timeout (it is being retried): wait and try again.
				err = gerr
			case pg.Severity == "ERROR" && isDataError(pg.Code):
				// Data errors come after the fence: this attempt passed it, so no
				// earlier attempt had committed.
				doubt = false
			}
		}
		if outcome == outcomeInDoubt {
			doubt = true
			// End the transaction if it still runs on the server, and learn whether
			// it committed; if the caller gave up, do it on a short leash of its own.
			rctx, cancel := ctx, context.CancelFunc(func() {})
			if ctx.Err() != nil {
				rctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			}
			committed, rerr := s.resolve(rctx, seq)
			cancel()
			switch {
			case rerr == nil && committed:
				s.log.Info("pgetl: in-doubt commit resolved: committed", "job", s.cfg.Job, "seq", seq)
				s.count("in_doubt_committed")
				settled = true
				return nil
			case rerr == nil:
				doubt = false // resolved: not committed; replay
			case errors.Is(rerr, ErrFenced) || errors.Is(rerr, ErrCheckpointLost):
				return rerr
			default:
				// Unresolved: the replay's fence settles it (PGF02 if it committed).
				s.log.Warn("pgetl: in-doubt commit unresolved; the replay's fence settles it", "job", s.cfg.Job, "seq", seq, "err", rerr)
				err = errors.Join(err, rerr)
			}
		}
		if ctx.Err() != nil {
			return inDoubt(ctx.Err())
		}
		if !IsTransient(err) {
			return inDoubt(err)
		}
		if errors.Is(err, errPredecessorPending) {
			// Waiting for a batch before this one, which is itself retrying or
			// isolating rows: not this batch's failure, so it spends no attempt and no
			// time of its budget. If that batch fails, it aborts this one.
			n--
			start = s.clock.now()
			s.count("predecessor_pending")
			if werr := s.clock.sleep(ctx, s.backoff(1)); werr != nil {
				return inDoubt(werr)
			}
			continue
		}
		if werr := s.retryWait(ctx, seq, n, start, err); werr != nil {
			return inDoubt(werr)
		}
		actx = withRetryOf(ctx, retryClass(err))
	}
}

// unitStat is what run learned of a unit of work, for its BatchResult.
type unitStat struct {
	attempts int
	inDoubt  bool
}

// noteUnit accumulates run's account of unit seq (a batch may run several times:
// isolating rejects, committing the rows before a bad one).
func (s *Session) noteUnit(seq int64, attempts int, inDoubt bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.units == nil {
		s.units = map[int64]unitStat{}
	}
	u := s.units[seq]
	u.attempts += attempts
	u.inDoubt = u.inDoubt || inDoubt
	s.units[seq] = u
}

// notifyCommit completes res with run's account of its unit and calls the session's
// OnCommitFunc.
func (s *Session) notifyCommit(res BatchResult) {
	s.mu.Lock()
	u := s.units[res.Seq]
	delete(s.units, res.Seq)
	for seq := range s.units {
		if seq < res.Seq {
			delete(s.units, seq) // units that did not commit
		}
	}
	s.mu.Unlock()
	res.Attempts, res.InDoubt = u.attempts, u.inDoubt
	if s.cfg.OnCommitFunc != nil {
		s.cfg.OnCommitFunc(res)
	}
}

// retryWait decides whether attempt n of unit seq, which failed with the transient
// err, is retried: it returns ErrRetriesExhausted (wrapping err) once
// RetryPolicy.MaxAttempts or MaxElapsed (counted from start) are spent, else counts
// the retry, calls OnRetryFunc and waits the backoff (ctx's error if ctx ends first).
func (s *Session) retryWait(ctx context.Context, seq int64, n int, start time.Time, err error) error {
	r := s.cfg.Retry
	elapsed := s.clock.since(start)
	if n >= r.MaxAttempts || elapsed >= r.MaxElapsed {
		return fmt.Errorf("%w: job %q batch %d after %d attempts in %v: %w", ErrRetriesExhausted, s.cfg.Job, seq, n, elapsed.Round(time.Millisecond), err)
	}
	class := retryClass(err)
	backoff := min(s.backoff(n), r.MaxElapsed-elapsed)
	s.mu.Lock()
	s.stat.retries[class]++
	s.mu.Unlock()
	s.log.Warn("pgetl: retrying", "job", s.cfg.Job, "seq", seq, "attempt", n, "class", class, "backoff", backoff, "err", err)
	if s.cfg.OnRetryFunc != nil {
		s.cfg.OnRetryFunc(RetryEvent{Job: s.cfg.Job, Seq: seq, Attempt: n, Class: class, Backoff: backoff, Err: err})
	}
	return s.clock.sleep(ctx, backoff)
}

// backoff returns the wait before attempt n+1: full jitter, a uniform draw from
// [0, min(MaxBackoff, InitialBackoff·2^(n-1))].
func (s *Session) backoff(n int) time.Duration {
	r := s.cfg.Retry
	bound := r.InitialBackoff << min(n-1, 30)
	if bound > r.MaxBackoff || bound <= 0 {
		bound = r.MaxBackoff
	}
	if bound <= 0 {
		return 0
	}
	return time.Duration(s.clock.rand(int64(bound) + 1))
}

// clock is the time and randomness the retry loop uses; tests replace it.
type clock struct {
	now   func() time.Time
	sleep func(ctx context.Context, d time.Duration) error
	rand  func(n int64) int64 // uniform in [0, n)
}

func (c clock) since(t time.Time) time.Duration { return c.now().Sub(t) }

// realClock is the wall clock and math/rand/v2.
var realClock = clock{
	now: time.Now,
	sleep: func(ctx context.Context, d time.Duration) error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		}
	},
	rand: rand.Int64N,
}

func retryClass(err error) string {
	if errors.Is(err, errPredecessorPending) {
		return "predecessor_pending"
	}
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
	if errors.Is(err, errPredecessorPending) {
		return true
	}
	// A failed connect is transient even when it wraps context.DeadlineExceeded:
	// pgconn reports its own ConnectTimeout either as "i/o timeout" or as "context
	// deadline exceeded", depending on timing. (The caller's own context is checked
	// before IsTransient is consulted.)
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		// A deadline inside pgconn on a live connection is reported as a timeout.
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return transientCode(pgErr.Code)
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
