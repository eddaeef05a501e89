package pgetl

// Black hole (issue 9): inside a private network namespace (faults.RunInNetNS), a
// throwaway cluster's port is black-holed with iptables DROP rules while a batch's
// COPY is half sent: the test holds a SHARE lock on the table so that the COPY waits
// while the client fills the socket buffers with a 10 MB batch, arms the black hole,
// then releases the lock, so the server's backend has consumed part of the COPY and
// waits, in its transaction and with rows inserted, for data that never comes.
//
// The client socket has keepalives 1 s/1 s/2 and TCP_USER_TIMEOUT 3 s (libpq keys in
// the DSN, through ParseConfig): the stalled write must fail within 3 s + 2 s. With
// Guards.ServerKeepalive (1 s/1 s/2, user timeout 3 s) the orphaned backend must
// leave pg_stat_activity within 1 + 1 × 2 + 2 s of the black hole, while it is still
// in force; without it the backend stays until in-doubt resolution terminates it.
// Either way, once the rules are removed the batch is replayed without waiting on
// the orphan's locks (lock_timeout 2 s would show it) and the job completes exactly.
// The test's own checks use the cluster's Unix socket, which the rules do not touch.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgetl/pgetl/internal/faults"
	"github.com/stretchr/testify/require"
)

func TestFaultBlackHole(t *testing.T) {
	t.Parallel()
	for _, serverKA := range []bool{false, true} {
		name := map[bool]string{false: "client_keepalive", true: "server_keepalive"}[serverKA]
		t.Run(name, func(t *testing.T) {
			if !faults.InNetNS(t) {
				t.Parallel()
				faults.RunInNetNS(t)
				return
			}
			blackHoleJob(t, serverKA)
		})
	}
}

// connErrors records, per connection, the first read or write error and when.
type connErrors struct {
	mu   sync.Mutex
	errs []connError
}

type connError struct {
	at  time.Time
	err error
}

type watchedConn struct {
	net.Conn
	rec  *connErrors
	once sync.Once
}

func (c *watchedConn) note(err error) {
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, context.DeadlineExceeded) {
		c.once.Do(func() {
			c.rec.mu.Lock()
			c.rec.errs = append(c.rec.errs, connError{time.Now(), err})
			c.rec.mu.Unlock()
		})
	}
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return n, err // a deadline of pgconn's, not a failure
	}
	c.note(err)
	return n, err
}

func (c *watchedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return n, err
	}
	c.note(err)
	return n, err
}

// first returns the first error recorded after t0.
func (r *connErrors) first(t0 time.Time) (connError, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.errs {
		if e.at.After(t0) {
			return e, true
		}
	}
	return connError{}, false
}

// db0Int returns the single integer sql yields on the bundle's pool.
func (bd *bundle) db0Int(t *testing.T, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	require.NoError(t, bd.pool.QueryRow(context.Background(), sql, args...).Scan(&n))
	return n
}

func blackHoleJob(t *testing.T, serverKA bool) {
	const n, commitRows = 300_000, 150_000
	const userTimeout = 3 * time.Second
	ctx := context.Background()
	c := faults.NewCluster(t)
	admin := faultPool(t, fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres sslmode=disable", c.SocketDir(), c.Port()))
	bd := &bundle{pool: admin, table: "items"}
	_, err := admin.Exec(ctx, `CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL,
		price numeric(12,2) NOT NULL CHECK (price >= 0), qty int NOT NULL, at timestamptz NOT NULL)`)
	require.NoError(t, err)

	rec := &connErrors{}
	pool := faultPool(t, c.URL()+"&keepalives_idle=1&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=3000&connect_timeout=2",
		func(cfg *pgxpool.Config) {
			dial := cfg.ConnConfig.DialFunc
			cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
				conn, err := dial(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return &watchedConn{Conn: conn, rec: rec}, nil
			}
			cfg.MaxConns = 2
		})
	job := "bh"
	guards := Guards{LockTimeout: 2 * time.Second}
	if serverKA {
		guards.ServerKeepalive = &Keepalive{Idle: time.Second, Interval: time.Second, Count: 2, UserTimeout: userTimeout}
	}
	tr := newTrigger(t)
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, Guards: guards,
		Retry: RetryPolicy{MaxAttempts: 100, MaxElapsed: 60 * time.Second, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second},
		beforeCommit: func(_ context.Context, seq int64, attempt int, _ *pgconn.PgConn) {
			if seq == 1 && attempt == 1 {
				tr.pull(seq)
			}
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	sampler := faults.SampleActivity(t, fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres", c.SocketDir(), c.Port()), "pgetl "+job+"#", 20*time.Millisecond)

	// The COPY of batch 1 waits behind the test's lock.
	lock, err := admin.Begin(ctx)
	require.NoError(t, err)
	defer lock.Rollback(ctx)
	_, err = lock.Exec(ctx, "LOCK TABLE items IN SHARE MODE")
	require.NoError(t, err)
	res := goJob(func() error {
		return loadJob(ctx, s, BatchConfig{Table: "items", Columns: itemCols, CommitRows: commitRows, CommitInterval: -1}, 1, n, nil)
	})
	tr.wait(t, res, 60*time.Second)
	tr.release()
	app := s.appName(1)
	backend := func() (pid int64, state string) {
		_ = admin.QueryRow(ctx, `SELECT pid, coalesce(state, '') || '/' || coalesce(wait_event_type, '') || '/' || coalesce(wait_event, '')
			FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&pid, &state)
		return pid, state
	}
	require.True(t, poll(t, 20*time.Second, func() bool {
		_, st := backend()
		return st == "active/Lock/relation"
	}), "batch 1 waits for the lock")
	time.Sleep(500 * time.Millisecond) // the client fills the socket buffers meanwhile
	restore := c.BlackHole(t)
	holed := time.Now()
	require.NoError(t, lock.Commit(ctx))
	// The server reads what reached it (the first ~100 kB: the socket buffer), then
	// waits, inside the COPY, for the rest.
	var orphan int64
	stableSince, last := time.Now(), ""
	require.True(t, poll(t, 10*time.Second, func() bool {
		pid, st := backend()
		if st != last || st != "active/Client/ClientRead" {
			last, stableSince = st, time.Now()
		}
		orphan = pid
		return time.Since(stableSince) > 300*time.Millisecond
	}), "the backend waits for the rest of the COPY data (state %s)", last)
	held := bd.db0Int(t, `SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND relation = 'items'::regclass`, orphan)
	require.Positive(t, held, "the orphan holds its lock on items")
	_, err = admin.Exec(ctx, "BEGIN; SET LOCAL lock_timeout = 100; LOCK TABLE items IN SHARE MODE; ROLLBACK")
	require.Equal(t, "55P03", pgCode(err), "the orphan's lock blocks a conflicting one: %v", err)
	t.Logf("black hole armed; orphan backend %d is inside the COPY, holding its locks, waiting for the client", orphan)

	// Client side: the stalled write fails by TCP_USER_TIMEOUT.
	var detected connError
	require.True(t, poll(t, userTimeout+5*time.Second, func() bool {
		var ok bool
		detected, ok = rec.first(holed)
		return ok
	}), "the client did not notice the black hole")
	detect := detected.at.Sub(holed)
	t.Logf("client noticed the black hole after %v: %v", detect.Round(time.Millisecond), detected.err)
	require.Less(t, detect, userTimeout+2*time.Second, "detected within TCP_USER_TIMEOUT + 2 s")

	// Server side.
	gone := func() bool {
		var k int64
		_ = admin.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", orphan).Scan(&k)
		return k == 0
	}
	if serverKA {
		bound := time.Second + time.Second*2 + 2*time.Second
		require.True(t, poll(t, bound+time.Second, gone), "the orphaned backend outlived the server keepalive")
		left := time.Since(holed)
		t.Logf("orphaned backend left pg_stat_activity %v after the black hole (bound %v)", left.Round(time.Millisecond), bound)
		require.Less(t, left, bound, "orphan gone within idle + interval × count + 2 s")
	} else {
		require.False(t, gone(), "without server keepalives the orphan is still there")
		t.Logf("without server keepalives the orphaned backend %d is still there %v after the black hole", orphan, time.Since(holed).Round(time.Millisecond))
	}
	restore()
	restored := time.Now()
	require.NoError(t, waitJob(t, res, 60*time.Second))
	st := s.Stat()
	t.Logf("job done %v after the rules were removed; retries %v", time.Since(restored).Round(time.Millisecond), st.Retries())
	sampler.Stop()
	require.True(t, gone(), "the orphan is gone")
	require.Zero(t, st.Retries()["lock_timeout"], "the replay did not wait on the orphan's locks: %v", st.Retries())
	bd.requireExactly(t, n)
	requireCheckpoint(t, admin, "", job, strconv.Itoa(n), n, 0)
	requireNoIdleInTx(t, sampler, 0)
}
