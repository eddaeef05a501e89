package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/sockopt"
)

// Exit statuses of the doctor.
const (
	exitOK       = 0
	exitWarnings = 1
	exitError    = 2
)

type doctorConfig struct {
	dsn           string
	middleboxIdle time.Duration
	olderThan     time.Duration
	app           string
	terminate     bool
	yes           bool
}

// report prints the doctor's findings and counts the warnings.
type report struct {
	w        io.Writer
	warnings int
}

func (r *report) ok(topic, format string, args ...any) { r.line("OK", topic, format, args...) }
func (r *report) warn(topic, format string, args ...any) {
	r.warnings++
	r.line("WARN", topic, format, args...)
}
func (r *report) info(topic, format string, args ...any) { r.line("INFO", topic, format, args...) }
func (r *report) line(level, topic, format string, args ...any) {
	fmt.Fprintf(r.w, "%-4s  %-20s %s\n", level, topic, fmt.Sprintf(format, args...))
}

func doctor(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	var c doctorConfig
	fs := flag.NewFlagSet("pgetl doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.dsn, "dsn", "", "connection string (default: $DATABASE_URL, else libpq's PG* variables and defaults)")
	fs.DurationVar(&c.middleboxIdle, "middlebox-idle", 60*time.Second, "idle timeout of the NAT, load balancer or proxy between client and server")
	fs.DurationVar(&c.olderThan, "older-than", 30*time.Second, "list sessions idle in transaction for longer than this")
	fs.StringVar(&c.app, "app", "", "only sessions whose application_name matches this LIKE pattern (e.g. 'pgetl %')")
	fs.BoolVar(&c.terminate, "terminate", false, "end the listed sessions (pg_terminate_backend) after confirmation")
	fs.BoolVar(&c.yes, "yes", false, "with -terminate: do not ask for confirmation")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: pgetl doctor [flags]\n\nChecks a connection string and server for long ETL jobs. Flags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitError
	}
	if fs.NArg() > 0 || c.middleboxIdle <= 0 || c.olderThan < 0 {
		fmt.Fprintln(stderr, "pgetl doctor: unexpected argument, or -middlebox-idle not positive, or -older-than negative")
		return exitError
	}
	if c.dsn == "" {
		c.dsn = os.Getenv("DATABASE_URL")
	}
	fail := func(format string, args ...any) int {
		fmt.Fprintf(stderr, "pgetl doctor: "+format+"\n", args...)
		return exitError
	}

	cfg, err := pgetl.ParseConfig(c.dsn)
	if err != nil {
		return fail("%v", err)
	}
	cfg.MaxConns = max(cfg.MaxConns, 2) // the pooler check holds two connections
	// The doctor's own queries use an exec mode that works behind any pooler; the
	// report judges the mode the connection string gives a job.
	jobMode := cfg.ConnConfig.DefaultQueryExecMode
	cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeCacheDescribe
	where := fmt.Sprintf("host=%s port=%d user=%s database=%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.User, cfg.ConnConfig.Database)
	pool, err := pgetl.NewPoolWithConfig(ctx, cfg)
	if err != nil {
		return fail("%v", err)
	}
	defer pool.Close()
	cctx, cancel := context.WithTimeout(ctx, cfg.ConnConfig.ConnectTimeout+5*time.Second)
	conn, err := pool.Acquire(cctx)
	cancel()
	if err != nil {
		return fail("cannot connect to %s: %s", where, oneLine(err.Error()))
	}
	var version string
	err = conn.QueryRow(ctx, "SELECT current_setting('server_version')").Scan(&version)
	if err != nil {
		conn.Release()
		return fail("%s: %s", where, oneLine(err.Error()))
	}
	r := &report{w: stdout}
	fmt.Fprintf(stdout, "pgetl doctor: %s (PostgreSQL %s), middleboxes idle out after %v\n", where, version, c.middleboxIdle)

	tcp := checkClientSocket(r, conn, c.middleboxIdle)
	settings, err := serverSettings(ctx, conn)
	conn.Release()
	if err != nil {
		return fail("read server settings: %s", oneLine(err.Error()))
	}
	pooled, err := checkPooler(ctx, r, pool, jobMode)
	if err != nil {
		return fail("pooler check: %s", oneLine(err.Error()))
	}
	checkServerKeepalive(r, settings, tcp, pooled, c.middleboxIdle)
	checkTimeouts(r, settings, pool.Config().MaxConnIdleTime)
	if err := checkIdleInTransaction(ctx, r, pool, c, stdin, stdout); err != nil {
		return fail("%s", oneLine(err.Error()))
	}
	if r.warnings > 0 {
		fmt.Fprintf(stdout, "%d warning(s)\n", r.warnings)
		return exitWarnings
	}
	fmt.Fprintln(stdout, "no problems found")
	return exitOK
}

// checkClientSocket reports the keepalive options of the live socket of conn, and
// whether it is TCP.
func checkClientSocket(r *report, conn *pgxpool.Conn, middlebox time.Duration) (tcp bool) {
	nc := conn.Conn().PgConn().Conn()
	if nc.RemoteAddr().Network() == "unix" {
		r.ok("client keepalive", "Unix socket %s: no TCP, no middlebox in the way", nc.RemoteAddr())
		return false
	}
	o, err := sockopt.Read(nc)
	if err != nil {
		r.info("client keepalive", "cannot read the socket's options here: %v", err)
		return true
	}
	const topic = "client keepalive"
	switch {
	case !o.KeepAlive:
		r.warn(topic, "off on the live socket (%s): a connection a middlebox dropped while idle is noticed only at the next write; set keepalives=1 (pgetl's default)", o)
	case o.Idle >= middlebox:
		r.warn(topic, "first probe after %v idle, not before the middleboxes' %v: an idle connection can be dropped silently; set keepalives_idle below %d (live socket: %s)",
			o.Idle, middlebox, int(middlebox.Seconds()), o)
	default:
		r.ok(topic, "first probe after %v idle (before the middleboxes' %v), a dead server noticed after ≈ %v (live socket: %s)",
			o.Idle, middlebox, o.Idle+o.Interval*time.Duration(o.Count), o)
	}
	if o.UserTimeout == 0 {
		r.warn("client user timeout", "TCP_USER_TIMEOUT not set: a write to a vanished server retransmits for ≈ 15 min before failing; set tcp_user_timeout (ms), pgetl's default is %v", pgetl.KeepaliveUserTimeoutDefault)
	} else {
		r.ok("client user timeout", "unacknowledged writes fail after %v", o.UserTimeout)
	}
	return true
}

// setting is one server setting in its base unit.
type setting struct {
	value int64
	unit  string // "s", "ms" or ""
	found bool
}

func (s setting) duration() time.Duration {
	switch s.unit {
	case "s":
		return time.Duration(s.value) * time.Second
	case "ms":
		return time.Duration(s.value) * time.Millisecond
	case "min":
		return time.Duration(s.value) * time.Minute
	}
	return time.Duration(s.value)
}

func (s setting) String() string {
	if !s.found {
		return "n/a"
	}
	if s.unit == "" {
		return strconv.FormatInt(s.value, 10)
	}
	if s.value == 0 {
		return "0"
	}
	return s.duration().String()
}

func serverSettings(ctx context.Context, conn *pgxpool.Conn) (map[string]setting, error) {
	rows, err := conn.Query(ctx, `SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name = ANY($1)`,
		[]string{"tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout",
			"idle_in_transaction_session_timeout", "idle_session_timeout", "statement_timeout", "lock_timeout"})
	if err != nil {
		return nil, err
	}
	out := map[string]setting{}
	var name, value, unit string
	_, err = pgx.ForEachRow(rows, []any{&name, &value, &unit}, func() error {
		v, err := strconv.ParseInt(value, 10, 64)
		if err != nil {
			return fmt.Errorf("setting %s = %q: %w", name, value, err)
		}
		out[name] = setting{value: v, unit: unit, found: true}
		return nil
	})
	return out, err
}

// linuxKeepaliveTime is Linux's default tcp_keepalive_time, what a server whose
// tcp_keepalives_idle is 0 uses (unless its OS was tuned).
const linuxKeepaliveTime = 2 * time.Hour

func checkServerKeepalive(r *report, s map[string]setting, tcp, pooled bool, middlebox time.Duration) {
	const topic = "server keepalive"
	idle, ivl, cnt, ut := s["tcp_keepalives_idle"], s["tcp_keepalives_interval"], s["tcp_keepalives_count"], s["tcp_user_timeout"]
	desc := fmt.Sprintf("tcp_keepalives_idle=%s interval=%s count=%s tcp_user_timeout=%s", idle, ivl, cnt, ut)
	if !tcp && !pooled {
		r.ok(topic, "not applicable over a Unix socket (%s)", desc)
		return
	}
	if pooled {
		desc += "; behind a pooler these are the pooler→server link's, the client→pooler link follows the pooler's tcp_keepalive settings"
	}
	eff := idle.duration()
	if eff == 0 {
		eff = linuxKeepaliveTime
		desc += fmt.Sprintf(" (0: the server OS's default, %v on Linux)", linuxKeepaliveTime)
	}
	if eff >= middlebox {
		r.warn(topic, "the server probes an idle client only after %v, not before the middleboxes' %v: the backend of a client that vanished mid-transaction stays idle in transaction with its locks; set tcp_keepalives_idle (ALTER SYSTEM or per role) or pgetl's Guards.ServerKeepalive (%s)",
			eff, middlebox, desc)
		return
	}
	r.ok(topic, "%s", desc)
}

func checkTimeouts(r *report, s map[string]setting, poolIdle time.Duration) {
	if it := s["idle_in_transaction_session_timeout"]; it.value == 0 {
		r.warn("idle-in-xact timeout", "idle_in_transaction_session_timeout=0: a session that forgets to COMMIT holds its locks and snapshot until someone ends it; pgetl sets %v in its own transactions (SET LOCAL), other clients get nothing: set it for their roles (ALTER ROLE … SET idle_in_transaction_session_timeout = '5min')",
			pgetl.IdleInTransactionTimeoutDefault)
	} else {
		r.ok("idle-in-xact timeout", "idle_in_transaction_session_timeout=%s: abandoned transactions are ended by the server", it)
	}
	switch is := s["idle_session_timeout"]; {
	case !is.found:
		r.ok("idle session", "idle_session_timeout not supported (PostgreSQL < 14): idle connections are never ended by the server")
	case is.value == 0:
		r.ok("idle session", "idle_session_timeout=0: the server does not end idle connections (the pool retires them after %v)", poolIdle)
	case is.duration() <= poolIdle:
		r.warn("idle session", "idle_session_timeout=%s ends idle pooled connections before the pool retires them (pool_max_conn_idle_time %v): set pool_max_conn_idle_time below it", is, poolIdle)
	default:
		r.ok("idle session", "idle_session_timeout=%s, above the pool's idle time %v", is, poolIdle)
	}
	st := s["statement_timeout"]
	if st.value == 0 {
		r.ok("statement timeout", "statement_timeout=0 server-wide; pgetl sets %v per transaction (SET LOCAL)", pgetl.StatementTimeoutDefault)
	} else {
		r.ok("statement timeout", "statement_timeout=%s server-wide; pgetl's SET LOCAL (default %v) applies to its own transactions", st, pgetl.StatementTimeoutDefault)
	}
	if lt := s["lock_timeout"]; lt.found {
		r.info("lock timeout", "lock_timeout=%s server-wide; pgetl sets %v per transaction", lt, pgetl.LockTimeoutDefault)
	}
}

// checkPooler detects a pooler (see the package doc) and reports the exec mode.
func checkPooler(ctx context.Context, r *report, pool *pgxpool.Pool, mode pgx.QueryExecMode) (pooled bool, err error) {
	a, err := pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer a.Release()
	b, err := pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer b.Release()
	var pidA, pidB uint32
	if err := a.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pidA); err != nil {
		return false, err
	}
	if err := b.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pidB); err != nil {
		return false, err
	}
	told := a.Conn().PgConn().PID()
	// A second signal that does not depend on the pooler's idle list: while A holds
	// a transaction, B runs on another backend; once A commits, a transaction pooler
	// may move B's next statement to A's backend. A session pooler never moves B.
	moved := false
	for i := 0; i < 5 && pidA != pidB && !moved; i++ {
		var b1, b2 uint32
		tx, err := a.Begin(ctx)
		if err != nil {
			return false, err
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			_ = tx.Rollback(ctx)
			return false, err
		}
		if err := b.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&b1); err != nil {
			_ = tx.Rollback(ctx)
			return false, err
		}
		if err := tx.Commit(ctx); err != nil {
			return false, err
		}
		if err := b.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&b2); err != nil {
			return false, err
		}
		moved = b1 != b2
	}
	const topic = "pooler"
	switch {
	case pidA == pidB || moved:
		// Two open client connections served by one backend: transaction pooling.
		if mode == pgx.QueryExecModeCacheStatement {
			r.warn(topic, "transaction pooler detected (one client connection's statements ran on different backends, or two client connections on one, pid %d): exec mode %q uses prepared statements, which fail behind it (SQLSTATE 42P05/26000, CopyFrom too): add %s=pgbouncer to the connection string (exec mode cache_describe)",
				pidA, mode, pgetl.PoolerKey)
		} else {
			r.ok(topic, "transaction pooler detected (one client connection's statements ran on different backends, or two client connections on one, pid %d); exec mode %q works behind it", pidA, mode)
		}
		return true, nil
	case told != pidA:
		r.ok(topic, "pooler detected (the backend pid the client was told, %d, is not the server's, %d), in session mode or transaction mode under load; exec mode %q works in session mode, in transaction mode use %s=pgbouncer",
			told, pidA, mode, pgetl.PoolerKey)
		return true, nil
	}
	r.ok(topic, "none detected (client and server agree on the backend pid %d); exec mode %q", pidA, mode)
	return false, nil
}

func checkIdleInTransaction(ctx context.Context, r *report, pool *pgxpool.Pool, c doctorConfig, stdin io.Reader, stdout io.Writer) error {
	const topic = "idle in transaction"
	all, err := pgetl.IdleInTransaction(ctx, pool, c.olderThan)
	if err != nil {
		return err
	}
	var bs []pgetl.Backend
	for _, b := range all {
		if c.app == "" || likeMatch(c.app, b.ApplicationName) {
			bs = append(bs, b)
		}
	}
	scope := ""
	if c.app != "" {
		scope = fmt.Sprintf(" with application_name LIKE %q", c.app)
	}
	if len(bs) == 0 {
		r.ok(topic, "no session%s idle in transaction for more than %v", scope, c.olderThan)
		return nil
	}
	r.warn(topic, "%d session(s)%s idle in transaction for more than %v (holding locks and the xmin horizon):", len(bs), scope, c.olderThan)
	fmt.Fprintf(stdout, "      %-8s %-40s %-12s %-10s %-10s %s\n", "PID", "APPLICATION", "USER", "IDLE", "XACT AGE", "LAST QUERY")
	for _, b := range bs {
		fmt.Fprintf(stdout, "      %-8d %-40s %-12s %-10s %-10s %s\n", b.PID, truncate(b.ApplicationName, 40), truncate(b.User, 12),
			b.StateAge.Round(time.Second), b.XactAge.Round(time.Second), truncate(oneLine(b.Query), 80))
	}
	if !c.terminate {
		fmt.Fprintln(stdout, "      end them with -terminate (pg_terminate_backend: their transactions roll back)")
		return nil
	}
	if !c.yes {
		fmt.Fprintf(stdout, "End these %d session(s)? Their transactions roll back. [y/N] ", len(bs))
		answer, _ := bufio.NewReader(stdin).ReadString('\n')
		if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
			fmt.Fprintln(stdout, "\nnothing terminated")
			return nil
		}
	}
	done, err := pgetl.TerminateBackends(ctx, pool, bs)
	if err != nil {
		return err
	}
	// pg_terminate_backend only signals: wait (briefly) for the backends to exit.
	deadline := time.Now().Add(5 * time.Second)
	gone := false
	for !gone && time.Now().Before(deadline) {
		var left int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", done).Scan(&left); err != nil {
			return err
		}
		if gone = left == 0; !gone {
			t := time.NewTimer(50 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
		}
	}
	for _, pid := range done {
		fmt.Fprintf(stdout, "      terminated pid %d\n", pid)
	}
	if len(done) < len(bs) {
		fmt.Fprintf(stdout, "      %d session(s) had moved on (committed, or another transaction) and were left alone\n", len(bs)-len(done))
	}
	if len(done) > 0 && !gone {
		fmt.Fprintln(stdout, "      some terminated backends had not exited after 5s")
	}
	if gone {
		r.warnings-- // resolved
		r.ok(topic, "%d session(s) terminated", len(done))
	}
	return nil
}

// likeMatch reports whether s matches the SQL LIKE pattern p: % matches any run of
// characters, _ any one character, \ escapes the next one.
func likeMatch(p, s string) bool {
	pr, sr := []rune(p), []rune(s)
	// match[j] reports whether pr[:i] matches sr[:j], row by row over i.
	match := make([]bool, len(sr)+1)
	match[0] = true
	for i := 0; i < len(pr); i++ {
		c, lit := pr[i], false
		if c == '\\' && i+1 < len(pr) {
			i++
			c, lit = pr[i], true
		}
		next := make([]bool, len(sr)+1)
		switch {
		case c == '%' && !lit:
			next[0] = match[0]
			for j := 1; j <= len(sr); j++ {
				next[j] = next[j-1] || match[j]
			}
		default:
			for j := 1; j <= len(sr); j++ {
				next[j] = match[j-1] && ((c == '_' && !lit) || sr[j-1] == c)
			}
		}
		match = next
	}
	return match[len(sr)]
}

func truncate(s string, n int) string {
	if len([]rune(s)) <= n {
		return s
	}
	return string([]rune(s)[:n-1]) + "…"
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
