package pgetl

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Guards are limits set with SET LOCAL at the start of every transaction pgetl runs,
// so they hold for the job's own work only and pass through transaction poolers
// (nothing is sent in the startup packet). A zero field means its default; a negative
// one means "do not set".
type Guards struct {
	// IdleInTransactionTimeout is idle_in_transaction_session_timeout. Defaults to
	// IdleInTransactionTimeoutDefault.
	IdleInTransactionTimeout time.Duration
	// StatementTimeout is statement_timeout. Defaults to StatementTimeoutDefault.
	StatementTimeout time.Duration
	// LockTimeout is lock_timeout. Defaults to LockTimeoutDefault.
	LockTimeout time.Duration
	// ClientCheckInterval is client_connection_check_interval, set on PostgreSQL 14
	// and later only (older servers lack it). Defaults to ClientCheckIntervalDefault.
	// With batches in flight, the backends of a client that died (killed, or its
	// host gone) may be waiting at the checkpoint's fence for the batch before them,
	// which never comes: the server only notices the closed connection while a
	// statement runs if it checks for it, and would otherwise wait until
	// lock_timeout. Through a pooler it checks the pooler's connection, which stays
	// up, so there it changes nothing.
	ClientCheckInterval time.Duration
	// ServerKeepalive, if set, also sets the server side TCP keepalive and user
	// timeout of the backend for each transaction (tcp_keepalives_idle, …), so the
	// server drops the backend of a client that vanished mid-transaction instead of
	// holding its locks. Nil sets nothing.
	ServerKeepalive *Keepalive
}

// guardSettings returns the settings of a transaction committing unit seq, as
// name and value.
func (s *Session) guardSettings(seq int64) [][2]string {
	var out [][2]string
	g := s.cfg.Guards
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"idle_in_transaction_session_timeout", g.IdleInTransactionTimeout}, {"statement_timeout", g.StatementTimeout}, {"lock_timeout", g.LockTimeout}} {
		if f.d > 0 {
			out = append(out, [2]string{f.name, strconv.FormatInt(f.d.Milliseconds(), 10)})
		}
	}
	if s.cfg.AsyncCommit {
		out = append(out, [2]string{"synchronous_commit", "off"})
	}
	if g.ServerKeepalive != nil {
		for _, kv := range g.ServerKeepalive.ServerSettings() {
			name, value, _ := strings.Cut(kv, " = ")
			out = append(out, [2]string{name, value})
		}
	}
	return append(out, [2]string{"application_name", s.appName(seq)})
}

// clientCheck returns the statement that sets client_connection_check_interval for
// the transaction on servers that have it, or "". It is a SELECT (returning no row
// on older servers), not a SET, which would fail there; it runs before the fence,
// which takes the transaction's snapshot anyway. The server arms the check when a
// statement starts, so it covers the statements after this one.
func (s *Session) clientCheck() string {
	d := s.cfg.Guards.ClientCheckInterval
	if d <= 0 {
		return ""
	}
	return "SELECT set_config('client_connection_check_interval', '" + strconv.FormatInt(max(d.Milliseconds(), 1), 10) +
		"', true) WHERE current_setting('server_version_num')::int >= 140000"
}

// guardSQL returns the guards of unit seq as SET LOCAL statements, for the
// simple-protocol message of a batch and for Session.Tx. They are SET LOCAL, not
// SELECT set_config(…): a SELECT takes the transaction's snapshot, and SET takes none
// (one SELECT instead of several SETs measured no faster).
func (s *Session) guardSQL(seq int64) string {
	var b strings.Builder
	for _, kv := range s.guardSettings(seq) {
		b.WriteString("SET LOCAL " + kv[0] + " = " + quoteLiteral(kv[1]) + ";")
	}
	if c := s.clientCheck(); c != "" {
		b.WriteString(c + ";")
	}
	return b.String()
}

// guardQuery returns the guards of unit seq as one parameterized statement, for the
// statement path: its text is the same for every batch, so pgx's statement cache
// prepares it once per connection instead of once per batch (a round trip each).
func (s *Session) guardQuery(seq int64) (string, []any) {
	kvs := s.guardSettings(seq)
	calls := make([]string, len(kvs))
	args := make([]any, 0, 2*len(kvs))
	for i, kv := range kvs {
		calls[i] = fmt.Sprintf("set_config($%d, $%d, true)", 2*i+1, 2*i+2)
		args = append(args, kv[0], kv[1])
	}
	if c := s.clientCheck(); c != "" {
		calls = append(calls, "("+c+")")
	}
	return "SELECT " + strings.Join(calls, ", "), args
}

// quoteLiteral quotes s as an SQL string literal in the escape-string form (E'…',
// backslashes and quotes doubled), which reads the same whatever
// standard_conforming_strings is. s must not contain NUL and must be valid UTF-8.
func quoteLiteral(s string) string {
	return "E'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", "''") + "'"
}
