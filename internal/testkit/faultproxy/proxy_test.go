package faultproxy

import (
	"context"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/faults"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// newTestProxy returns a proxy in front of the test database and a connection string
// through it.
func newTestProxy(t *testing.T) (*Proxy, string) {
	t.Helper()
	base := pgtest.URL(t)
	p := NewProxy(t, faults.TCPAddr(t, base))
	return p, pgtest.WithParam(p.URL(base), "sslmode", "disable")
}

func TestProxyPassThrough(t *testing.T) {
	p, url := newTestProxy(t)
	require.Equal(t, "127.0.0.1", p.Addr()[:len("127.0.0.1")])
	conn := connect(t, url)
	n, err := queryInt(conn, 5*time.Second, "SELECT 41 + 1")
	require.NoError(t, err)
	require.EqualValues(t, 42, n)
	// The server sees the proxy's upstream side, not the client.
	var port int
	require.NoError(t, conn.QueryRow(context.Background(), "SELECT inet_server_port()").Scan(&port))
	require.Equal(t, p.Upstream(), net.JoinHostPort("127.0.0.1", fmt.Sprint(port)))
}

func TestProxyResetPeer(t *testing.T) {
	for _, dir := range []Direction{Upstream, Downstream} {
		t.Run(string(dir), func(t *testing.T) {
			p, url := newTestProxy(t)
			before := connect(t, url)
			_, err := queryInt(before, 5*time.Second, "SELECT 1")
			require.NoError(t, err)

			p.ResetPeer(t, dir, 0)
			require.Equal(t, []string{"reset_" + string(dir)}, p.Toxics())
			took, err := timed(func() error { _, err := queryInt(before, 5*time.Second, "SELECT 1"); return err })
			require.Error(t, err)
			require.Less(t, took, time.Second, "a reset is immediate")
			t.Logf("existing connection, reset %s: %v after %v", dir, err, took)

			// New connections die at their startup packet while the toxic is in force.
			_, err = tryConnect(url, 5*time.Second)
			require.Error(t, err)
			t.Logf("new connection, reset %s: %v", dir, err)

			p.Clear(t)
			require.Empty(t, p.Toxics())
			after := connect(t, url)
			_, err = queryInt(after, 5*time.Second, "SELECT 1")
			require.NoError(t, err)
		})
	}
	t.Run("both", func(t *testing.T) {
		p, url := newTestProxy(t)
		conn := connect(t, url)
		p.Reset(t)
		require.Len(t, p.Toxics(), 2)
		_, err := queryInt(conn, 5*time.Second, "SELECT 1")
		require.Error(t, err)
		p.Remove(t, "reset_upstream")
		p.Remove(t, "reset_downstream")
		_, err = queryInt(connect(t, url), 5*time.Second, "SELECT 1")
		require.NoError(t, err)
	})
}

func TestProxyCutAfter(t *testing.T) {
	p, url := newTestProxy(t)
	conn := connect(t, url)
	p.CutAfter(t, Downstream, 1000)
	// A reply of ~10 kB is cut at 1000 bytes: the client sees a truncated stream.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var s string
	took, err := timed(func() error {
		return conn.QueryRow(ctx, "SELECT string_agg(g::text, ',') FROM generate_series(1, 2500) g").Scan(&s)
	})
	require.Error(t, err)
	t.Logf("cut downstream after 1000 bytes: %v after %v", err, took)

	// Small exchanges pass until the budget is spent (the startup exchange is a few
	// hundred bytes).
	p.CutAfter(t, Upstream, 2000) // replaces nothing: different name
	p.Remove(t, "cut_downstream")
	c2 := connect(t, url)
	var sent int
	for i := range 200 {
		if _, err := queryInt(c2, 5*time.Second, "SELECT $1::int", i); err != nil {
			t.Logf("query %d: %v", i, err)
			break
		}
		sent++
	}
	require.Greater(t, sent, 0)
	require.Less(t, sent, 200, "the upstream cut ends the connection")
	t.Logf("cut upstream after 2000 bytes: %d queries passed", sent)
	p.Clear(t)
	_, err = queryInt(connect(t, url), 5*time.Second, "SELECT 1")
	require.NoError(t, err)
}

func TestProxyLostRepliesAndRequests(t *testing.T) {
	db := pgtest.New(t)
	db.Exec(t, "CREATE TABLE lost (id int)")
	base := pgtest.URL(t)
	p := NewProxy(t, faults.TCPAddr(t, base))
	url := pgtest.WithParam(p.URL(db.BaseURL), "sslmode", "disable")
	ins := "INSERT INTO " + db.Ident("lost") + " VALUES ($1) RETURNING id"

	conn := connect(t, url)
	_, err := queryInt(conn, 5*time.Second, ins, 0) // prepares the statement
	require.NoError(t, err)
	p.LoseReplies(t)
	took, err := timed(func() error { _, err := queryInt(conn, time.Second, ins, 1); return err })
	require.Error(t, err)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, took, 4*time.Second, "bounded by the context deadline (+ pgx's 1 s deadline delay)")
	t.Logf("lost reply: %v after %v", err, took)
	// The server executed the statement: only the reply was lost.
	require.Eventually(t, func() bool {
		return db.Int(t, "SELECT count(*) FROM "+db.Ident("lost")+" WHERE id = 1") == 1
	}, 5*time.Second, 20*time.Millisecond)
	p.Remove(t, "lost_downstream")

	conn = connect(t, url)
	_, err = queryInt(conn, 5*time.Second, ins, 0)
	require.NoError(t, err)
	p.LoseRequests(t)
	took, err = timed(func() error { _, err := queryInt(conn, time.Second, ins, 2); return err })
	require.Error(t, err)
	require.Less(t, took, 4*time.Second)
	t.Logf("lost request: %v after %v", err, took)
	p.Clear(t)
	require.EqualValues(t, 0, db.Int(t, "SELECT count(*) FROM "+db.Ident("lost")+" WHERE id = 2"),
		"the request never reached the server")
	n, err := queryInt(connect(t, url), 5*time.Second, ins, 3)
	require.NoError(t, err)
	require.EqualValues(t, 3, n)
}

func TestProxyLatency(t *testing.T) {
	p, url := newTestProxy(t)
	conn := connect(t, url)
	p.Latency(t, Downstream, 300*time.Millisecond, 0)
	took, err := timed(func() error { _, err := queryInt(conn, 5*time.Second, "SELECT 1"); return err })
	require.NoError(t, err)
	require.GreaterOrEqual(t, took, 300*time.Millisecond)
	t.Logf("latency 300ms: round trip %v", took)
	p.Remove(t, "latency_downstream")
	took, err = timed(func() error { _, err := queryInt(conn, 5*time.Second, "SELECT 1"); return err })
	require.NoError(t, err)
	require.Less(t, took, 250*time.Millisecond)
}

// TestProxyRoundTrip: RoundTrip(rtt) makes every SELECT 1 take at least rtt, also
// below a millisecond of delay per direction, and RoundTrip(0) removes it. How close
// to rtt it stays is logged, not asserted: on a loaded machine any upper bound is a
// guess (the benchmarks report the measured round trip).
func TestProxyRoundTrip(t *testing.T) {
	p, url := newTestProxy(t)
	conn := connect(t, url)
	sample := func() (fastest, median time.Duration) {
		var ts []time.Duration
		for range 15 {
			took, err := timed(func() error { _, err := queryInt(conn, 5*time.Second, "SELECT 1"); return err })
			require.NoError(t, err)
			ts = append(ts, took)
		}
		slices.Sort(ts)
		return ts[0], ts[len(ts)/2]
	}
	for _, rtt := range []time.Duration{time.Millisecond, 20 * time.Millisecond} {
		p.RoundTrip(t, rtt)
		require.ElementsMatch(t, []string{"delay_upstream", "delay_downstream"}, p.Toxics())
		fastest, median := sample()
		t.Logf("RoundTrip(%v): SELECT 1 takes %v (median), %v (fastest)", rtt, median, fastest)
		require.GreaterOrEqual(t, fastest, rtt, "every round trip is delayed by rtt")
	}
	p.RoundTrip(t, 0)
	require.Empty(t, p.Toxics())
	fastest, _ := sample()
	require.Less(t, fastest, 20*time.Millisecond, "without the toxic, a round trip is not delayed by 20 ms")
}

func TestProxyDisableEnable(t *testing.T) {
	p, url := newTestProxy(t)
	conn := connect(t, url)
	p.Disable(t)
	_, err := queryInt(conn, 5*time.Second, "SELECT 1")
	require.Error(t, err, "Disable closes existing connections")
	_, err = tryConnect(url, 2*time.Second)
	require.Error(t, err, "Disable refuses new connections")
	t.Logf("connect while disabled: %v", err)
	p.Enable(t)
	p.Enable(t) // idempotent
	_, err = queryInt(connect(t, url), 5*time.Second, "SELECT 1")
	require.NoError(t, err)
}

// TestProxyNoGoroutineLeak: clients that keep writing after a reset, a cut or the
// removal of a lost-data toxic leave no goroutine behind (Toxiproxy's own reset_peer
// leaks one per such connection).
func TestProxyNoGoroutineLeak(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) }) // runs after the proxy stops
	p, _ := newTestProxy(t)
	hammer := func() {
		for range 10 {
			c, err := net.Dial("tcp", p.Addr())
			require.NoError(t, err)
			for range 50 {
				if _, err := c.Write(make([]byte, 100)); err != nil {
					break
				}
			}
			require.NoError(t, c.Close())
		}
	}
	p.ResetPeer(t, Upstream, 0)
	hammer()
	p.Clear(t)
	p.CutAfter(t, Upstream, 150)
	hammer()
	p.Clear(t)
	p.LoseRequests(t)
	var conns []net.Conn
	for range 5 {
		c, err := net.Dial("tcp", p.Addr())
		require.NoError(t, err)
		_, err = c.Write(make([]byte, 100))
		require.NoError(t, err)
		conns = append(conns, c)
	}
	p.Clear(t) // closes them
	for _, c := range conns {
		_, _ = c.Write(make([]byte, 100))
		_ = c.Close()
	}
}
