package faults

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Sample is one backend seen idle in transaction by a Sampler.
type Sample struct {
	At              time.Time     // when the sample was taken
	PID             int           // the backend's PID
	ApplicationName string        // its application_name
	State           string        // "idle in transaction" or "idle in transaction (aborted)"
	StateAge        time.Duration // how long it had been in that state (now() - state_change)
	XactAge         time.Duration // how long its transaction had been open (now() - xact_start)
	Query           string        // the last statement it ran
}

// Sampler polls pg_stat_activity in the background and records every backend, of an
// application_name prefix, seen idle in transaction. It reconnects after errors (the
// server may be restarting under the test), counting them.
type Sampler struct {
	connString string
	prefix     string
	every      time.Duration

	stop chan struct{}
	done chan struct{}
	once sync.Once

	mu      sync.Mutex
	samples int
	idle    []Sample
	errs    int
	lastErr error
}

// samplerAppName is the application_name of the sampler's own session.
const samplerAppName = "pgetl-faults-sampler"

// SampleActivity starts sampling pg_stat_activity of the server at connString every
// interval every (at least 1 ms) for backends whose application_name starts with
// appNamePrefix (the sampler's own session is never reported). connString must reach
// the server itself, not a PgBouncer. It runs until Stop, which t.Cleanup calls.
func SampleActivity(t testing.TB, connString, appNamePrefix string, every time.Duration) *Sampler {
	t.Helper()
	if every < time.Millisecond {
		every = time.Millisecond
	}
	if _, err := pgx.ParseConfig(connString); err != nil {
		t.Fatalf("faults: sampler: %v", err)
	}
	s := &Sampler{
		connString: connString, prefix: appNamePrefix, every: every,
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	go s.run()
	t.Cleanup(s.Stop)
	return s
}

// Stop stops sampling and waits for the sampler's goroutine and connection to end.
// It is idempotent.
func (s *Sampler) Stop() {
	s.once.Do(func() { close(s.stop) })
	<-s.done
}

// Samples returns how many samples have been taken successfully.
func (s *Sampler) Samples() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.samples
}

// IdleInTransaction returns every backend seen idle in transaction, one Sample per
// backend per sample taken, in order.
func (s *Sampler) IdleInTransaction() []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Sample(nil), s.idle...)
}

// Errors returns how many samples failed (connection or query errors) and the last
// error.
func (s *Sampler) Errors() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.errs, s.lastErr
}

// WaitSamples waits until at least n more samples than now have been taken, or
// timeout passes; it reports whether they were. Tests call it before Stop to be sure
// the sampler has looked at the state they set up.
func (s *Sampler) WaitSamples(n int, timeout time.Duration) bool {
	target := s.Samples() + n
	return poll(timeout, s.every/2+time.Millisecond, func() bool { return s.Samples() >= target })
}

const activityQuery = `SELECT pid, application_name, state,
	extract(epoch FROM now() - state_change)::float8,
	coalesce(extract(epoch FROM now() - xact_start), 0)::float8,
	query
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
	AND state LIKE 'idle in transaction%' AND starts_with(application_name, $1)`

func (s *Sampler) run() {
	defer close(s.done)
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			closeQuietly(conn)
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-s.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	ticker := time.NewTicker(s.every)
	defer ticker.Stop()
	for {
		if conn == nil {
			c, err := s.connect(ctx)
			if err != nil && ctx.Err() == nil {
				s.fail(err)
			}
			conn = c
		}
		if conn != nil {
			if err := s.sample(ctx, conn); err != nil {
				if ctx.Err() == nil {
					s.fail(err)
				}
				closeQuietly(conn)
				conn = nil
			}
		}
		select {
		case <-s.stop:
			return
		case <-ticker.C:
		}
	}
}

func (s *Sampler) connect(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(s.connString)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["application_name"] = samplerAppName
	cfg.ConnectTimeout = 5 * time.Second
	return pgx.ConnectConfig(ctx, cfg)
}

func (s *Sampler) sample(ctx context.Context, conn *pgx.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	at := time.Now()
	rows, err := conn.Query(ctx, activityQuery, s.prefix)
	if err != nil {
		return err
	}
	var found []Sample
	for rows.Next() {
		var (
			smp            Sample
			stateAge, xAge float64
		)
		if err := rows.Scan(&smp.PID, &smp.ApplicationName, &smp.State, &stateAge, &xAge, &smp.Query); err != nil {
			rows.Close()
			return err
		}
		smp.At = at
		smp.StateAge = time.Duration(stateAge * float64(time.Second))
		smp.XactAge = time.Duration(xAge * float64(time.Second))
		found = append(found, smp)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	s.samples++
	s.idle = append(s.idle, found...)
	s.mu.Unlock()
	return nil
}

func (s *Sampler) fail(err error) {
	s.mu.Lock()
	s.errs++
	s.lastErr = err
	s.mu.Unlock()
}
