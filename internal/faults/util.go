// Package faults is the fault kit of pgetl's fault-injection tests: real faults
// against real servers, each started on loopback and stopped by PID in t.Cleanup.
//
//   - Proxy: Toxiproxy as an in-process library (resets, cuts, lost replies or
//     requests, latency, refused connections) between a client and a server.
//   - Cluster: a throwaway PostgreSQL cluster (initdb + pg_ctl as the postgres user on
//     a free loopback port) to restart, stop, crash or set read-only.
//   - PgBouncer: a PgBouncer in transaction mode in front of a server, restartable with
//     SIGTERM (immediate) or SIGINT (safe: waits for transactions to end).
//   - RunInNetNS, InNetNS and Cluster.BlackHole: a test re-executes itself inside a
//     private network namespace where iptables DROP rules black-hole a cluster's port
//     without touching the host's network.
//   - Sampler: records every moment a backend of an application_name prefix is idle
//     in transaction.
//
// Helpers that need root, a binary or a server that is missing call
// pgtest.Unavailable: the test fails under CI=true and skips otherwise.
//
// What a pgx v5 client sees (measured by this package's tests on Debian 12,
// PostgreSQL 15, PgBouncer 1.18):
//   - Proxy.ResetPeer: "read: connection reset by peer" at once (< 2 ms), on open
//     connections and on new ones.
//   - Proxy.CutAfter: "unexpected EOF" once the byte budget is spent.
//   - Proxy.LoseReplies / LoseRequests: nothing until the client's own deadline
//     (context.DeadlineExceeded); a lost reply's statement did run on the server.
//   - Proxy.Disable: existing connections fail, new ones get "connection refused".
//   - Cluster.Restart: 57P01 admin_shutdown on existing sessions (≈0.2–0.3 s).
//   - Cluster.CrashBackend: every session of the cluster is cut ("conn closed" on
//     the next use); ready again ≈0.1–0.2 s after the SIGKILL.
//   - Cluster.SetReadOnly: 25006 read_only_sql_transaction on the next write.
//   - Cluster.BlackHole with TCP_USER_TIMEOUT 3 s on the client socket: the query
//     fails with io.ErrUnexpectedEOF (pgx does not keep the ETIMEDOUT) ≈3.4 s after
//     it was sent.
package faults

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pgetl/pgetl/internal/pgtest"
)

// FreePort returns a TCP port of 127.0.0.1 that was free a moment ago (it listens on
// port 0 and closes). Another process may take it before the caller binds it: callers
// that start servers retry with a new port when the bind fails.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("faults: free port: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatalf("faults: free port: %v", err)
	}
	return port
}

// TCPAddr returns the host:port a connection string reaches over TCP, for use as a
// Proxy's upstream. Unix-socket hosts (libpq defaults often resolve to one) are
// replaced by 127.0.0.1 with the same port.
func TCPAddr(t testing.TB, connString string) string {
	t.Helper()
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		t.Fatalf("faults: parse %q: %v", connString, err)
	}
	cands := append([]*pgconn.FallbackConfig{{Host: cfg.Host, Port: cfg.Port}}, cfg.Fallbacks...)
	for _, c := range cands {
		if !strings.HasPrefix(c.Host, "/") {
			return net.JoinHostPort(c.Host, strconv.Itoa(int(c.Port)))
		}
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(cfg.Port)))
}

// withHostPort returns connString with its host and port replaced (URL or
// keyword=value form; "" means libpq defaults and yields keyword=value).
func withHostPort(connString, host string, port int) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		scheme, rest, _ := strings.Cut(connString, "://")
		authority, tail := rest, ""
		if i := strings.IndexAny(rest, "/?"); i >= 0 {
			authority, tail = rest[:i], rest[i:]
		}
		userinfo := ""
		if at := strings.LastIndex(authority, "@"); at >= 0 {
			userinfo = authority[:at+1]
		}
		path, query, hasQuery := strings.Cut(tail, "?")
		if hasQuery {
			// Drop host= and port= parameters: they would override the authority.
			var keep []string
			for _, kv := range strings.Split(query, "&") {
				if k, _, _ := strings.Cut(kv, "="); kv != "" && k != "host" && k != "port" {
					keep = append(keep, kv)
				}
			}
			if len(keep) > 0 {
				path += "?" + strings.Join(keep, "&")
			}
		}
		return scheme + "://" + userinfo + net.JoinHostPort(host, strconv.Itoa(port)) + path
	}
	// keyword=value: later keywords override earlier ones.
	s := fmt.Sprintf("host=%s port=%d", host, port)
	if strings.TrimSpace(connString) == "" {
		return s
	}
	return connString + " " + s
}

// pgUser is the account servers run as: postgres (initdb, postgres and pgbouncer
// refuse root) when the test runs as root, else the current user.
type pgUser struct {
	Name     string
	UID, GID uint32
	Home     string
	asRoot   bool // the test runs as root and switches to this user
}

var (
	pgUserOnce sync.Once
	pgUserVal  pgUser
	pgUserErr  error
)

// postgresUser returns the account to run servers as (see pgUser).
func postgresUser() (pgUser, error) {
	pgUserOnce.Do(func() {
		if os.Geteuid() != 0 {
			u, err := user.Current()
			if err != nil {
				pgUserErr = err
				return
			}
			pgUserVal, pgUserErr = toPgUser(u, false)
			return
		}
		u, err := user.Lookup("postgres")
		if err != nil {
			pgUserErr = fmt.Errorf("running as root needs a postgres user to run servers as: %w", err)
			return
		}
		pgUserVal, pgUserErr = toPgUser(u, true)
	})
	return pgUserVal, pgUserErr
}

func toPgUser(u *user.User, asRoot bool) (pgUser, error) {
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return pgUser{}, err
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return pgUser{}, err
	}
	return pgUser{Name: u.Username, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir, asRoot: asRoot}, nil
}

// serverUser returns the account to run servers as, or marks the test unavailable.
func serverUser(t testing.TB) pgUser {
	t.Helper()
	u, err := postgresUser()
	if err != nil {
		pgtest.Unavailable(t, "faults: "+err.Error())
	}
	return u
}

// command builds a command that runs as u, in dir, with a small fixed environment.
func (u pgUser) command(ctx context.Context, dir, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = []string{
		"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
		"HOME=" + u.Home, "USER=" + u.Name, "LOGNAME=" + u.Name,
		"LANG=C.UTF-8", "LC_ALL=C.UTF-8", "TZ=UTC",
	}
	if u.asRoot {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u.UID, Gid: u.GID}}
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// mkdirFor creates a fresh temporary directory owned by u (mode 0700) under
// os.TempDir, which u can traverse (t.TempDir's parent is private to the test's user).
func (u pgUser) mkdirFor(t testing.TB, pattern string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatalf("faults: mkdir: %v", err)
	}
	if err := u.chown(dir); err != nil {
		_ = os.RemoveAll(dir)
		t.Fatalf("faults: chown %s: %v", dir, err)
	}
	return dir
}

// chown gives path to u when the test runs as root.
func (u pgUser) chown(path string) error {
	if !u.asRoot {
		return nil
	}
	return os.Chown(path, int(u.UID), int(u.GID))
}

// pgBinDir finds PostgreSQL's server binaries: $PGETL_PG_BINDIR, pg_config --bindir,
// or the newest /usr/lib/postgresql/*/bin.
func pgBinDir() (string, error) {
	has := func(dir string) bool {
		_, err := os.Stat(filepath.Join(dir, "initdb"))
		return err == nil
	}
	if d := os.Getenv("PGETL_PG_BINDIR"); d != "" {
		if has(d) {
			return d, nil
		}
		return "", fmt.Errorf("PGETL_PG_BINDIR=%s has no initdb", d)
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if d := strings.TrimSpace(string(out)); has(d) {
			return d, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if has(d) {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", fmt.Errorf("no initdb: install the PostgreSQL server package or set PGETL_PG_BINDIR")
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// poll calls cond every interval until it returns true or timeout passes; it reports
// whether cond returned true.
func poll(timeout, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
}

// alive reports whether process pid exists and is not a zombie.
func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // no /proc: kill(0) said it exists
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// logWriter forwards lines to t.Log until closed (t.Log after a test ends panics).
type logWriter struct {
	mu     sync.Mutex
	t      testing.TB
	prefix string
	closed bool
}

func newLogWriter(t testing.TB, prefix string) *logWriter {
	w := &logWriter{t: t, prefix: prefix}
	t.Cleanup(w.close)
	return w
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.t.Log(w.prefix + strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *logWriter) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}
