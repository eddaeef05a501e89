package pgetl

import (
	"maps"
	"time"
)

// statCounters are a Session's counters. Guarded by Session.mu.
type statCounters struct {
	rows, rejects, batches, bytes int64
	txs                           int64
	holdNanos, flushNanos         int64
	retries                       map[string]int64
	sync                          rowCounts // BatchConfig.Sync batches and sweeps
}

// Stat is a snapshot of a session's counters, taken by [Session.Stat].
type Stat struct {
	c statCounters
}

// Stat returns a snapshot of the session's counters.
func (s *Session) Stat() Stat {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.stat
	c.retries = maps.Clone(s.stat.retries)
	return Stat{c: c}
}

// Rows returns the rows committed by the session.
func (st Stat) Rows() int64 { return st.c.rows }

// Rejects returns the rows the session rejected (committed to the reject sink).
func (st Stat) Rejects() int64 { return st.c.rejects }

// Batches returns the batches the session committed (Session.Tx calls are counted
// apart, in Txs, though they take checkpoint sequence numbers too).
func (st Stat) Batches() int64 { return st.c.batches }

// Txs returns the Session.Tx units the session committed.
func (st Stat) Txs() int64 { return st.c.txs }

// Bytes returns the encoded bytes of the rows the session committed.
func (st Stat) Bytes() int64 { return st.c.bytes }

// HoldDuration returns the total time the session held a connection.
func (st Stat) HoldDuration() time.Duration { return time.Duration(st.c.holdNanos) }

// FlushDuration returns the total time spent committing batches, retries included.
func (st Stat) FlushDuration() time.Duration { return time.Duration(st.c.flushNanos) }

// Retries returns the number of retried attempts by failure class ("connection",
// "server_shutdown", "serialization", "deadlock", "lock_timeout", "read_only",
// "too_many_connections", "idle_timeout", "sqlstate_XXXXX", "stale_key" for an
// upsert batch retried because its key cache was stale, "key_conflict" for a batch
// set's batch whose IgnoreExisting table went straight in and met an existing key,
// retried as a merge), the in-doubt commits
// found committed ("in_doubt_committed") and the probes spent isolating bad rows
// ("bisect_probe").
func (st Stat) Retries() map[string]int64 { return maps.Clone(st.c.retries) }

// TotalRetries returns the number of retried attempts of all classes (not counting
// in-doubt resolutions, bisection probes, bad-row isolation round trips and waits
// for an earlier batch in flight, which are not failures of the batch).
func (st Stat) TotalRetries() int64 {
	var n int64
	for k, v := range st.c.retries {
		switch k {
		case "in_doubt_committed", "bisect_probe", "isolate_round_trip", "predecessor_pending":
		default:
			n += v
		}
	}
	return n
}

// Reconnects returns how many attempts lost their connection (classes
// "connection", "server_shutdown" and "idle_timeout"): each retry after one runs on
// a fresh connection.
func (st Stat) Reconnects() int64 {
	return st.c.retries["connection"] + st.c.retries["server_shutdown"] + st.c.retries["idle_timeout"]
}
