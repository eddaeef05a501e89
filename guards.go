package pgetl

import (
	"fmt"
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
	// ServerKeepalive, if set, also sets the server side TCP keepalive and user
	// timeout of the backend for each transaction (tcp_keepalives_idle, …), so the
	// server drops the backend of a client that vanished mid-transaction instead of
	// holding its locks. Nil sets nothing.
	ServerKeepalive *Keepalive
}

// guardStmts returns the SET LOCAL statements of a transaction committing batch seq.
// They are SET LOCAL, not SELECT set_config(…): a SELECT takes the transaction's
// snapshot, after which fn in Session.Tx could no longer SET TRANSACTION ISOLATION
// LEVEL (25001); SET takes none. (One SELECT instead of several SETs measured no
// faster.)
func (s *Session) guardStmts(seq int64) []string {
	var stmts []string
	g := s.cfg.Guards
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"idle_in_transaction_session_timeout", g.IdleInTransactionTimeout}, {"statement_timeout", g.StatementTimeout}, {"lock_timeout", g.LockTimeout}} {
		if f.d > 0 {
			stmts = append(stmts, fmt.Sprintf("SET LOCAL %s = %d", f.name, f.d.Milliseconds()))
		}
	}
	if s.cfg.AsyncCommit {
		stmts = append(stmts, "SET LOCAL synchronous_commit = off")
	}
	if g.ServerKeepalive != nil {
		for _, kv := range g.ServerKeepalive.ServerSettings() {
			stmts = append(stmts, "SET LOCAL "+kv)
		}
	}
	return append(stmts, "SET LOCAL application_name = "+quoteLiteral(s.appName(seq)))
}

// guardSQL returns guardStmts as one string of statements.
func (s *Session) guardSQL(seq int64) string {
	return strings.Join(s.guardStmts(seq), ";") + ";"
}

// quoteLiteral quotes s as an SQL string literal in the escape-string form (E'…',
// backslashes and quotes doubled), which reads the same whatever
// standard_conforming_strings is. s must not contain NUL and must be valid UTF-8.
func quoteLiteral(s string) string {
	return "E'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", "''") + "'"
}
