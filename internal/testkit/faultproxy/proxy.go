package faultproxy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/rs/zerolog"
)

// Direction is the way data flows through a Proxy: Upstream is client → server
// (requests), Downstream is server → client (replies).
type Direction string

const (
	// Upstream is client → server: requests.
	Upstream Direction = "upstream"
	// Downstream is server → client: replies.
	Downstream Direction = "downstream"
)

// EnvProxyLog names the variable holding the zerolog level ("debug", "info", "warn",
// "error", "disabled") at which Toxiproxy logs to t.Log; the default is "error".
const EnvProxyLog = "PGETL_FAULTS_PROXY_LOG"

var proxySeq atomic.Int64

// Proxy is an in-process Toxiproxy TCP proxy on 127.0.0.1 in front of one upstream.
// Faults are Toxiproxy toxics: each stays in force, for existing and new connections,
// until removed with Remove or Clear. Adding a toxic under a name that is in use
// replaces it. Methods fail the test on error and are safe for concurrent use.
//
// The toxic chains are Toxiproxy's (its ToxicCollection and links); the listener and
// the sockets are this package's, so that a link whose destination fails keeps
// draining instead of leaving a goroutine blocked forever (Toxiproxy's own proxy
// leaks one whenever a client goes away while the server still sends), and so that
// ResetPeer can close with an RST.
type Proxy struct {
	server   *toxiproxy.ApiServer
	px       *toxiproxy.Proxy // owns the ToxicCollection; never started
	addr     string
	upstream string
	seq      atomic.Int64
	accepts  sync.WaitGroup

	mu     sync.Mutex
	ln     net.Listener // nil while disabled
	conns  map[*relayConn]struct{}
	resets map[string]bool // reset toxics in force: sockets close with an RST
	idle   chan struct{}   // closed when conns becomes empty (if non-nil)
}

// NewProxy starts a proxy listening on a free port of 127.0.0.1 that forwards to
// upstream (host:port; see faults.TCPAddr). It is stopped, with all its connections, in
// t.Cleanup.
func NewProxy(t testing.TB, upstream string) *Proxy {
	t.Helper()
	level := zerolog.ErrorLevel
	if s := os.Getenv(EnvProxyLog); s != "" {
		l, err := zerolog.ParseLevel(s)
		if err != nil {
			t.Fatalf("faultproxy: %s=%q: %v", EnvProxyLog, s, err)
		}
		level = l
	}
	logger := zerolog.New(newLogWriter(t, "toxiproxy: ")).Level(level)
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), logger)
	name := "pgetl-" + strconv.FormatInt(proxySeq.Add(1), 10)
	p := &Proxy{
		server: server, upstream: upstream,
		px:    toxiproxy.NewProxy(server, name, "127.0.0.1:0", upstream),
		conns: map[*relayConn]struct{}{}, resets: map[string]bool{},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("faultproxy: proxy listen: %v", err)
	}
	p.addr = ln.Addr().String()
	p.px.Listen = p.addr
	p.serve(ln)
	// Registered after the log writer's cleanup, so it runs first (LIFO).
	t.Cleanup(p.stop)
	return p
}

// Addr returns the proxy's listen address (127.0.0.1:port).
func (p *Proxy) Addr() string { return p.addr }

// Upstream returns the address the proxy forwards to.
func (p *Proxy) Upstream() string { return p.upstream }

// Port returns the proxy's listen port.
func (p *Proxy) Port() int {
	_, port, _ := net.SplitHostPort(p.addr)
	n, _ := strconv.Atoi(port)
	return n
}

// URL returns connString (URL or keyword=value form) with its host and port replaced
// by the proxy's.
func (p *Proxy) URL(connString string) string {
	return withHostPort(connString, "127.0.0.1", p.Port())
}

// AddToxic adds (or replaces) the toxic called name of Toxiproxy type typ on direction
// dir, with toxicity 1 and the given attributes (see Toxiproxy's README), and returns
// name. Prefer the fault methods to Toxiproxy's reset_peer, limit_data and timeout
// types, which leak goroutines (see ResetPeer).
func (p *Proxy) AddToxic(t testing.TB, name, typ string, dir Direction, attrs map[string]any) string {
	t.Helper()
	body, err := json.Marshal(map[string]any{
		"name": name, "type": typ, "stream": string(dir), "toxicity": 1.0, "attributes": attrs,
	})
	if err != nil {
		t.Fatalf("faultproxy: toxic %s: %v", name, err)
	}
	if typ == "reset_peer" {
		typ = resetType // Toxiproxy's needs *net.TCPConn sockets and leaks goroutines
	}
	if p.px.Toxics.GetToxic(name) != nil {
		p.Remove(t, name)
	}
	if attrs == nil {
		body = bytes.Replace(body, []byte(`"attributes":null`), []byte(`"attributes":{}`), 1)
	}
	if typ == resetType {
		p.mu.Lock()
		p.resets[name] = true
		p.mu.Unlock()
	}
	if _, err := p.px.Toxics.AddToxicJson(bytes.NewReader(body)); err != nil {
		t.Fatalf("faultproxy: add toxic %s: %v", name, err)
	}
	return name
}

// ResetPeer makes every connection, at its next data in direction dir (after a delay
// of after), close abruptly with a TCP RST on both sides of the proxy: the data is
// dropped and the client's read fails at once ("connection reset by peer", or
// "unexpected EOF" in pgx when it was not reading). With dir Upstream the request
// never reaches the server; with Downstream the server executes it and the reply is
// lost with the connection. New connections die at their first packet while the
// toxic (called "reset_<dir>") is in force.
//
// Toxiproxy's own reset_peer toxic is not used: it leaks a goroutine per reset
// connection that receives more data (the toxic before it blocks forever on a channel
// nobody reads, which goleak in pgtest.Main reports). This package's reset, cut and
// lost-data toxics keep draining instead.
func (p *Proxy) ResetPeer(t testing.TB, dir Direction, after time.Duration) string {
	t.Helper()
	return p.AddToxic(t, "reset_"+string(dir), resetType, dir, map[string]any{"timeout": after.Milliseconds()})
}

// Reset is ResetPeer in both directions without delay: every connection dies at its
// next byte either way, and new connections die at their startup packet.
func (p *Proxy) Reset(t testing.TB) {
	t.Helper()
	p.ResetPeer(t, Upstream, 0)
	p.ResetPeer(t, Downstream, 0)
}

// CutAfter closes each connection once n bytes have passed in direction dir (counted
// per connection from when the toxic was added, or from its start for connections
// opened later); the toxic is called "cut_<dir>". A message in flight is truncated.
func (p *Proxy) CutAfter(t testing.TB, dir Direction, n int64) string {
	t.Helper()
	return p.AddToxic(t, "cut_"+string(dir), cutType, dir, map[string]any{"bytes": n})
}

// LoseReplies drops every byte from server to client without closing anything: the
// server executes requests but the client never hears back (it waits until its own
// deadline, keepalive or TCP_USER_TIMEOUT gives up). The toxic is "lost_downstream".
// Removing it closes every connection (their byte streams lost data), as Toxiproxy's
// timeout toxic does.
func (p *Proxy) LoseReplies(t testing.TB) string {
	t.Helper()
	return p.AddToxic(t, "lost_downstream", lostType, Downstream, nil)
}

// LoseRequests drops every byte from client to server without closing anything:
// requests never reach the server. The toxic is "lost_upstream". Removing it closes
// every connection.
func (p *Proxy) LoseRequests(t testing.TB) string {
	t.Helper()
	return p.AddToxic(t, "lost_upstream", lostType, Upstream, nil)
}

// Latency delays data in direction dir by d ± jitter; the toxic is
// "latency_<dir>". Removing it lets data flow at full speed again.
func (p *Proxy) Latency(t testing.TB, dir Direction, d, jitter time.Duration) string {
	t.Helper()
	return p.AddToxic(t, "latency_"+string(dir), "latency", dir,
		map[string]any{"latency": d.Milliseconds(), "jitter": jitter.Milliseconds()})
}

// Delay delays data in direction dir by d, at microsecond resolution (Latency's
// Toxiproxy toxic counts whole milliseconds, so it cannot add half of a 1 ms round
// trip); the toxic is "delay_<dir>". Each chunk is held until d after it was read,
// so data read in a burst is not delayed once per chunk: the link's throughput is
// kept, only its latency grows. Removing it lets data flow at full speed again.
func (p *Proxy) Delay(t testing.TB, dir Direction, d time.Duration) string {
	t.Helper()
	return p.AddToxic(t, "delay_"+string(dir), delayType, dir, map[string]any{"delay_us": d.Microseconds()})
}

// RoundTrip makes the link a distant one: every request→reply turn through the
// proxy takes rtt longer, rtt/2 in each direction (Delay on both), as a remote
// database adds its network's round trip. RoundTrip(t, 0) removes the delays.
func (p *Proxy) RoundTrip(t testing.TB, rtt time.Duration) {
	t.Helper()
	for _, dir := range []Direction{Upstream, Downstream} {
		if rtt <= 0 {
			if p.px.Toxics.GetToxic("delay_"+string(dir)) != nil {
				p.Remove(t, "delay_"+string(dir))
			}
			continue
		}
		half := rtt / 2
		if dir == Downstream {
			half = rtt - rtt/2
		}
		p.Delay(t, dir, half)
	}
}

// Toxics returns the names of the toxics in force.
func (p *Proxy) Toxics() []string {
	var names []string
	for _, tx := range p.px.Toxics.GetToxicArray() {
		if w, ok := tx.(*toxics.ToxicWrapper); ok {
			names = append(names, w.Name)
		}
	}
	return names
}

// Remove removes the toxic called name.
func (p *Proxy) Remove(t testing.TB, name string) {
	t.Helper()
	if err := p.px.Toxics.RemoveToxic(context.Background(), name); err != nil {
		t.Fatalf("faultproxy: remove toxic %s: %v", name, err)
	}
	p.mu.Lock()
	delete(p.resets, name)
	p.mu.Unlock()
}

// Clear removes every toxic.
func (p *Proxy) Clear(t testing.TB) {
	t.Helper()
	p.px.Toxics.ResetToxics(context.Background())
	p.mu.Lock()
	clear(p.resets)
	p.mu.Unlock()
}

// Disable closes every connection through the proxy and stops listening: new
// connections are refused until Enable. Toxics stay in force.
func (p *Proxy) Disable(t testing.TB) {
	t.Helper()
	p.disable()
}

// Enable listens again on the same address after Disable.
func (p *Proxy) Enable(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	enabled := p.ln != nil
	p.mu.Unlock()
	if enabled {
		return
	}
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		t.Fatalf("faultproxy: enable proxy on %s: %v", p.addr, err)
	}
	p.serve(ln)
}

// String describes the proxy.
func (p *Proxy) String() string { return fmt.Sprintf("proxy %s → %s", p.addr, p.upstream) }

// Toxic types of this package, registered with Toxiproxy. Unlike Toxiproxy's
// reset_peer, limit_data and timeout, once they have closed a connection they keep
// draining their input until the link's reader closes it, so that no stub upstream of
// them stays blocked (a goroutine leak per connection).
const (
	resetType = "pgetl_reset_peer"
	cutType   = "pgetl_limit_data"
	lostType  = "pgetl_timeout"
	delayType = "pgetl_latency"
)

func init() {
	toxics.Register(resetType, new(resetToxic))
	toxics.Register(cutType, new(cutToxic))
	toxics.Register(lostType, new(lostToxic))
	toxics.Register(delayType, new(delayToxic))
}

// drain discards a closed stub's input until the stub before it closes it (when the
// link's reader ends, which closing this stub's output brings about).
func drain(stub *toxics.ToxicStub) {
	for c := range stub.Input {
		_ = c
	}
}

// resetToxic closes the connection at its first data, after Timeout ms.
type resetToxic struct {
	Timeout int64 `json:"timeout"`
}

// Pipe implements toxics.Toxic.
func (r *resetToxic) Pipe(stub *toxics.ToxicStub) {
	select {
	case <-stub.Interrupt:
		return
	case c := <-stub.Input:
		if c != nil && r.Timeout > 0 {
			// Not interruptible: a chain change waits for the close (bounded by Timeout).
			time.Sleep(time.Duration(r.Timeout) * time.Millisecond)
		}
		stub.Close()
		drain(stub)
	}
}

// cutToxic passes Bytes bytes per connection, then closes it.
type cutToxic struct {
	Bytes int64 `json:"bytes"`
}

type cutState struct{ sent int64 }

// NewState implements toxics.StatefulToxic.
func (c *cutToxic) NewState() any { return new(cutState) }

// Pipe implements toxics.Toxic.
func (c *cutToxic) Pipe(stub *toxics.ToxicStub) {
	state := stub.State.(*cutState)
	for state.sent < c.Bytes {
		select {
		case <-stub.Interrupt:
			return
		case chunk := <-stub.Input:
			if chunk == nil {
				stub.Close()
				return
			}
			data := chunk.Data
			if left := c.Bytes - state.sent; int64(len(data)) > left {
				data = data[:left]
			}
			if len(data) > 0 {
				stub.Output <- &stream.StreamChunk{Data: data, Timestamp: chunk.Timestamp}
				state.sent += int64(len(data))
			}
		}
	}
	stub.Close()
	drain(stub)
}

// lostToxic drops every byte; removing it closes the connection.
type lostToxic struct{}

// Pipe implements toxics.Toxic.
func (*lostToxic) Pipe(stub *toxics.ToxicStub) {
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil {
				stub.Close()
				return
			}
		}
	}
}

// Cleanup implements toxics.CleanupToxic: the stream lost data, so removal closes it.
func (*lostToxic) Cleanup(stub *toxics.ToxicStub) {
	stub.Close()
	go drain(stub)
}

// delayToxic holds each chunk until DelayMicros after the link read it: Toxiproxy's
// latency toxic at microsecond resolution. The runtime's timers wake up to 1 ms late
// when the process is idle (the poller waits in whole milliseconds), which would
// turn a 1 ms round trip into 2.3 ms, so the last stretch of each wait is slept on
// a timerfd (see sleeper).
type delayToxic struct {
	DelayMicros int64 `json:"delay_us"`
}

// GetBufferSize implements toxics.BufferedToxic: chunks read in a burst queue here
// rather than block the link's reader, so that each is delayed from its own read.
func (*delayToxic) GetBufferSize() int { return 1024 }

// Pipe implements toxics.Toxic.
func (d *delayToxic) Pipe(stub *toxics.ToxicStub) {
	delay := time.Duration(d.DelayMicros) * time.Microsecond
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	sl := newSleeper()
	defer sl.close()
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil {
				stub.Close()
				return
			}
			due := c.Timestamp.Add(delay)
			for left := time.Until(due); left > 0; left = time.Until(due) {
				if left <= 2*time.Millisecond {
					sl.sleep(left)
					break
				}
				timer.Reset(left - time.Millisecond - time.Millisecond/2)
				select {
				case <-timer.C:
				case <-stub.Interrupt:
					stub.Output <- c // keep the data, as Toxiproxy's latency toxic does
					return
				}
			}
			stub.Output <- c
		}
	}
}

// serve accepts connections on ln until it is closed.
func (p *Proxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.accepts.Add(1)
	go func() {
		defer p.accepts.Done()
		for {
			client, err := ln.Accept()
			if err != nil {
				return // closed by disable
			}
			upstream, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
			if err != nil {
				p.px.Logger.Warn().Err(err).Msg("faultproxy: dial upstream")
				_ = client.Close()
				continue
			}
			c, u := &relayConn{Conn: client, p: p}, &relayConn{Conn: upstream, p: p}
			p.mu.Lock()
			if p.ln != ln { // disabled meanwhile
				p.mu.Unlock()
				_ = client.Close()
				_ = upstream.Close()
				return
			}
			p.conns[c], p.conns[u] = struct{}{}, struct{}{}
			p.mu.Unlock()
			name := fmt.Sprintf("%s#%d", client.RemoteAddr(), p.seq.Add(1))
			p.px.Toxics.StartLink(p.server, name+"upstream", c, u, stream.Upstream)
			p.px.Toxics.StartLink(p.server, name+"downstream", u, c, stream.Downstream)
		}
	}()
}

// disable stops listening and closes every socket; the links then wind down.
func (p *Proxy) disable() {
	p.mu.Lock()
	ln := p.ln
	p.ln = nil
	conns := make([]*relayConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	p.accepts.Wait()
	for _, c := range conns {
		_ = c.Conn.Close()
	}
}

// stop disables the proxy and waits (up to 10 s) until every link has ended.
func (p *Proxy) stop() {
	p.disable()
	p.mu.Lock()
	var idle chan struct{}
	if len(p.conns) > 0 {
		idle = make(chan struct{})
		p.idle = idle
	}
	p.mu.Unlock()
	if idle != nil {
		select {
		case <-idle:
		case <-time.After(10 * time.Second):
		}
	}
}

// relayConn is one socket of a proxied connection: the source of one link and the
// destination of the other. A failed write closes the socket but reports success, so
// that the link keeps draining its toxic chain until its source ends (Toxiproxy's
// link stops reading on a write error, which blocks the chain forever).
type relayConn struct {
	net.Conn
	p       *Proxy
	failed  atomic.Bool
	closeMu sync.Once
}

// Write implements io.Writer.
func (c *relayConn) Write(b []byte) (int, error) {
	if c.failed.Load() {
		return len(b), nil
	}
	if _, err := c.Conn.Write(b); err != nil {
		c.failed.Store(true)
		_ = c.Conn.Close() // the other link's read on it ends: the connection winds down
	}
	return len(b), nil
}

// Close is called by the link writing to c when its chain has ended.
func (c *relayConn) Close() error {
	c.closeMu.Do(func() {
		c.p.mu.Lock()
		reset := len(c.p.resets) > 0
		delete(c.p.conns, c)
		if len(c.p.conns) == 0 && c.p.idle != nil {
			close(c.p.idle)
			c.p.idle = nil
		}
		c.p.mu.Unlock()
		if tcp, ok := c.Conn.(*net.TCPConn); ok && reset {
			_ = tcp.SetLinger(0) // close with an RST
		}
		_ = c.Conn.Close()
	})
	return nil
}
