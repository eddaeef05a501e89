package pgetl

// Black hole (issue 9): inside a private network namespace (faults.RunInNetNS), a
// throwaway cluster's port is black-holed with iptables DROP rules while a batch's
// COPY is half sent: the test holds a SHARE lock on the table so that the COPY waits
// while the client's data backs up in the socket buffers (the kernel's queues show
// it), arms the black hole, then releases the lock, so the server's backend consumes
// what reached it and waits, in its transaction and with rows inserted, for data
// that never comes.
//
// The client socket has keepalives 1 s/1 s/2 and TCP_USER_TIMEOUT 3 s (libpq keys in
// the DSN, through ParseConfig): the kernel must end the stalled connection
// (ETIMEDOUT). With Guards.ServerKeepalive (1 s/1 s/2, user timeout 3 s) the orphaned
// backend must leave pg_stat_activity while the black hole is still in force; without
// it the backend stays until in-doubt resolution terminates it. The black hole lasts
// until the job's first reconnect has failed, so the outcome of the batch cannot be
// learned then. Either way, once the rules are removed the batch is replayed without
// waiting on the orphan's locks (lock_timeout 2 s would show it) and the job
// completes exactly. Waits are bounded by the configured timeouts plus a generous
// slack; the checks are on what happened, not on how long it took. The test's own
// checks use the cluster's Unix socket, which the rules do not touch.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

// connErrors records the read, write and dial errors of the pool's connections, and
// when they happened.
type connErrors struct {
	mu    sync.Mutex
	errs  []connError // reads and writes
	dials []connError
}

type connError struct {
	at  time.Time
	err error
}

func (r *connErrors) add(list *[]connError, err error) {
	r.mu.Lock()
	*list = append(*list, connError{time.Now(), err})
	r.mu.Unlock()
}

type watchedConn struct {
	net.Conn
	rec *connErrors
}

// note records err unless it is a deadline of pgconn's (not a failure) or the
// connection's own Close.
func (c *watchedConn) note(err error) {
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, net.ErrClosed) {
		c.rec.add(&c.rec.errs, err)
	}
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.note(err)
	return n, err
}

func (c *watchedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.note(err)
	return n, err
}

// since returns the errors of list recorded after t0.
func (r *connErrors) since(list *[]connError, t0 time.Time) []connError {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []connError
	for _, e := range *list {
		if e.at.After(t0) {
			out = append(out, e)
		}
	}
	return out
}

// tcpQueues returns, from the kernel's table of this network namespace's TCP
// sockets, the send queue (bytes written and not yet acknowledged) and the receive
// queue (bytes received and not yet read) of the socket from 127.0.0.1:local to
// 127.0.0.1:remote; ok is false when there is none.
func tcpQueues(t *testing.T, local, remote int) (tx, rx int64, ok bool) {
	t.Helper()
	data, err := os.ReadFile("/proc/net/tcp")
	require.NoError(t, err)
	want := fmt.Sprintf("0100007F:%04X 0100007F:%04X", local, remote)
	for _, line := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 || f[1]+" "+f[2] != want {
			continue
		}
		q := strings.SplitN(f[4], ":", 2)
		require.Len(t, q, 2, "%q", line)
		tx, err = strconv.ParseInt(q[0], 16, 64)
		require.NoError(t, err)
		rx, err = strconv.ParseInt(q[1], 16, 64)
		require.NoError(t, err)
		return tx, rx, true
	}
	return 0, 0, false
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
					rec.add(&rec.dials, err)
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
	var clientPort int
	backend := func() (pid int64, state string) {
		_ = admin.QueryRow(ctx, `SELECT pid, coalesce(client_port, 0), coalesce(state, '') || '/' || coalesce(wait_event_type, '') || '/' || coalesce(wait_event, '')
			FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&pid, &clientPort, &state)
		return pid, state
	}
	require.True(t, poll(t, 20*time.Second, func() bool {
		_, st := backend()
		return st == "active/Lock/relation"
	}), "batch 1 waits for the lock")
	// The backend does not read while it waits: the client's COPY data backs up
	// into the server's receive queue (consumed once the lock is released) and the
	// client's send queue (never delivered: the client's write stalls).
	require.NotZero(t, clientPort, "batch 1 runs over TCP")
	require.True(t, poll(t, 20*time.Second, func() bool {
		tx, _, ok1 := tcpQueues(t, clientPort, c.Port())
		_, rx, ok2 := tcpQueues(t, c.Port(), clientPort)
		return ok1 && ok2 && tx > 0 && rx > 0
	}), "the COPY data backs up in the socket buffers")
	restore := c.BlackHole(t)
	holed := time.Now()
	require.NoError(t, lock.Commit(ctx))
	// The server reads what reached it, then waits, inside the COPY, for the rest:
	// waiting to read with nothing left to read, and nothing can arrive.
	var orphan int64
	last := ""
	require.True(t, poll(t, 20*time.Second, func() bool {
		orphan, last = backend()
		_, rx, ok := tcpQueues(t, c.Port(), clientPort)
		return last == "active/Client/ClientRead" && ok && rx == 0
	}), "the backend waits for the rest of the COPY data (state %s)", last)
	held := bd.db0Int(t, `SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND relation = 'items'::regclass`, orphan)
	require.Positive(t, held, "the orphan holds its lock on items")
	_, err = admin.Exec(ctx, "BEGIN; SET LOCAL lock_timeout = 100; LOCK TABLE items IN SHARE MODE; ROLLBACK")
	require.Equal(t, "55P03", pgCode(err), "the orphan's lock blocks a conflicting one: %v", err)
	t.Logf("black hole armed; orphan backend %d is inside the COPY, holding its locks, waiting for the client", orphan)

	// The checks below are on what ended each side of the connection; the waits
	// are bounded by the configured timeouts plus a slack for a busy machine under
	// -race. Without the timeouts, nothing would end either side while the black
	// hole lasts (the kernel gives up after ~15 min of retransmissions).
	const slack = 20 * time.Second

	// Client side: the kernel ends the connection (TCP_USER_TIMEOUT or keepalives).
	var errs []connError
	require.True(t, poll(t, userTimeout+slack, func() bool {
		errs = rec.since(&rec.errs, holed)
		return slices.ContainsFunc(errs, func(e connError) bool { return errors.Is(e.err, syscall.ETIMEDOUT) })
	}), "the kernel did not end the client's connection: %v", errs)
	for _, e := range errs {
		t.Logf("client connection error %v after the black hole: %v", e.at.Sub(holed).Round(time.Millisecond), e.err)
	}

	// Server side.
	gone := func() bool {
		var k int64
		_ = admin.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", orphan).Scan(&k)
		return k == 0
	}
	if serverKA {
		// Nothing reaches the server from the job's side while the black hole lasts:
		// only the server's own keepalives can end the orphan.
		bound := time.Second + time.Second*2 + 2*time.Second
		require.True(t, poll(t, bound+slack, gone), "the orphaned backend outlived the server keepalive")
		t.Logf("orphaned backend left pg_stat_activity %v after the black hole (idle + interval × count + 2 s = %v)", time.Since(holed).Round(time.Millisecond), bound)
	} else {
		require.False(t, gone(), "without server keepalives the orphan is still there")
		t.Logf("without server keepalives the orphaned backend %d is still there %v after the black hole", orphan, time.Since(holed).Round(time.Millisecond))
	}

	// The job learns the outcome of batch 1 over a new connection: the black hole
	// lasts until one has failed, so resolution fails (the server is unreachable)
	// and the replay's fence must settle it.
	require.True(t, poll(t, 10*time.Second+slack, func() bool { return len(rec.since(&rec.dials, holed)) > 0 }),
		"the job did not try to reconnect")
	t.Logf("reconnect failed through the black hole: %v", rec.since(&rec.dials, holed)[0].err)
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
