// Package jobkit holds what the example jobs (examples/products, examples/orders)
// share around pgetl: signal handling, connecting with one clear error line,
// claiming a job that a killed run may still hold, the progress display and the
// resume hint.
package jobkit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/term"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/dsn"
)

// LockedWriter serializes writes to W.
type LockedWriter struct {
	mu sync.Mutex
	W  io.Writer
}

func (l *LockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.W.Write(p)
}

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// Signals turns the signals of a channel into two contexts: Read ends at the first
// signal (stop reading the source, commit what is buffered), Job at the second
// (abandon the buffer).
type Signals struct {
	Read, Job context.Context

	stopReading, abandon context.CancelFunc
	mu                   sync.Mutex
	got                  os.Signal
	done, watching       chan struct{}
}

// WatchSignals watches sigs until Stop.
func WatchSignals(sigs <-chan os.Signal) *Signals {
	s := &Signals{done: make(chan struct{}), watching: make(chan struct{})}
	s.Read, s.stopReading = context.WithCancel(context.Background())
	s.Job, s.abandon = context.WithCancel(context.Background())
	go func() {
		defer close(s.watching)
		n := 0
		for {
			select {
			case sig := <-sigs:
				n++
				if n == 1 {
					s.mu.Lock()
					s.got = sig
					s.mu.Unlock()
					s.stopReading()
				} else {
					s.abandon()
				}
			case <-s.done:
				return
			}
		}
	}()
	return s
}

// Signaled returns the first signal received, or nil.
func (s *Signals) Signaled() os.Signal {
	if s.Read.Err() == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got
}

// Stop stops watching and ends both contexts.
func (s *Signals) Stop() {
	close(s.done)
	<-s.watching
	s.stopReading()
	s.abandon()
}

// SigName names SIGINT and SIGTERM as the shell does.
func SigName(s os.Signal) string {
	switch s {
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGTERM:
		return "SIGTERM"
	}
	return s.String()
}

// Connect opens a pool with pgetl's defaults and checks the server answers, so
// that an unreachable database is one clear line, not a failure deep in the first
// batch.
func Connect(ctx context.Context, connString string) (*pgxpool.Pool, error) {
	cfg, err := pgetl.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	where := fmt.Sprintf("host=%s port=%d user=%s database=%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.User, cfg.ConnConfig.Database)
	pool, err := pgetl.NewPoolWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, cfg.ConnConfig.ConnectTimeout+5*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			return nil, fmt.Errorf("cannot use PostgreSQL at %s: %s (SQLSTATE %s)", where, pgErr.Message, pgErr.Code)
		}
		return nil, fmt.Errorf("cannot reach PostgreSQL at %s (from -dsn, $DATABASE_URL or libpq's PG* defaults): %w", where, unwrapConnect(err))
	}
	return pool, nil
}

// unwrapConnect returns the cause of a connect error without pgx's preamble, each
// distinct attempt's error once (pgconn tries every address, and with sslmode=prefer
// with and without TLS).
func unwrapConnect(err error) error {
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) && ce.Unwrap() != nil {
		err = ce.Unwrap()
	}
	var parts []string
	for _, p := range strings.Split(err.Error(), "\n") {
		if p = strings.TrimSpace(p); p != "" && !slices.Contains(parts, p) {
			parts = append(parts, p)
		}
	}
	return errors.New(strings.Join(parts, "; "))
}

// Claim starts the job's session: a finished job starts over if startOver (else
// Claim returns pgetl.ErrJobFinished), and a claim held by a killed run is waited
// for up to wait (or taken over with sc.Takeover).
func Claim(ctx context.Context, pool *pgxpool.Pool, sc pgetl.SessionConfig, wait time.Duration, startOver bool, log *slog.Logger) (*pgetl.Session, error) {
	deadline := time.Now().Add(wait)
	waiting := false
	for {
		s, err := pgetl.NewSession(ctx, pool, sc)
		switch {
		case err == nil:
			return s, nil
		case errors.Is(err, pgetl.ErrJobFinished) && !sc.Restart && startOver:
			log.Info("the job finished in an earlier run: starting it over", "job", sc.Job)
			sc.Restart = true
			continue
		case errors.Is(err, pgetl.ErrJobClaimed) && time.Now().Before(deadline):
			if !waiting {
				log.Info("the job is claimed by another run (or a killed one whose lease has not expired): waiting", "job", sc.Job, "up_to", wait)
				waiting = true
			}
			t := time.NewTimer(500 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
			continue
		case errors.Is(err, pgetl.ErrJobClaimed):
			return nil, fmt.Errorf("job %q is claimed by another live run (waited %v); if that run is dead, rerun with -takeover: %w", sc.Job, wait, err)
		}
		return nil, err
	}
}

// ResumeCommand returns the command that reruns a job: "go -C examples run ./<prog>"
// and args, without -restart, with dsn's secrets redacted.
func ResumeCommand(prog, connString string, args []string) string {
	var out []string
	secrets := dsn.Secrets(connString)
	for _, a := range args {
		if a == "-restart" || a == "--restart" || a == "-restart=true" || a == "--restart=true" {
			continue
		}
		out = append(out, ShellQuote(dsn.Redact(a, secrets...)))
	}
	return strings.TrimSpace("go -C examples run ./" + prog + " " + strings.Join(out, " "))
}

// ShellQuote quotes s for a POSIX shell when it needs quoting.
func ShellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_=.,:/@+%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// OneLine folds a multi-line message into one line.
func OneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}
