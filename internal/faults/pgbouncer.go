package faults

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// PgBouncer is a PgBouncer process in front of one PostgreSQL server, run in the
// foreground as the postgres user (it refuses root) with its configuration, log and
// pid file in a temporary directory, listening on a free port of 127.0.0.1 (no Unix
// socket). Defaults: pool_mode = transaction, auth_type = trust with the user
// "postgres" in its auth_file, ignore_startup_parameters = extra_float_digits,
// admin_users = postgres. It is stopped (SIGTERM, then SIGKILL) in t.Cleanup.
//
// Signals, as observed with PgBouncer 1.18 (see TestPgBouncerRestart):
//   - SIGTERM: immediate shutdown. PgBouncer exits at once; every client connection
//     is closed, in or out of a transaction (open transactions roll back on the
//     server when PgBouncer's server connections close).
//   - SIGINT: safe shutdown (PAUSE, then SHUTDOWN). PgBouncer stops handing out
//     server connections and waits until every transaction in progress has ended
//     (clients inside a transaction go on and commit normally), then exits and closes
//     every client connection; a client that starts a new transaction meanwhile waits
//     and then loses its connection.
//
// pgx's default statement cache does not work through PgBouncer 1.18 in transaction
// mode: clients use default_query_exec_mode=exec or simple_protocol.
type PgBouncer struct {
	user pgUser
	bin  string
	dir  string
	port int

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when the running process has exited
	exitErr error
}

// PgBouncerOption configures NewPgBouncer.
type PgBouncerOption func(*pgbouncerConfig)

type pgbouncerConfig struct {
	settings map[string]string
	users    []string
}

// PgBouncerSetting sets a [pgbouncer] parameter, e.g. PgBouncerSetting("pool_mode",
// "session") or PgBouncerSetting("default_pool_size", "2").
func PgBouncerSetting(name, value string) PgBouncerOption {
	return func(c *pgbouncerConfig) { c.settings[name] = value }
}

// PgBouncerUsers adds users to the auth_file (auth_type trust still needs them
// listed); "postgres" is always there.
func PgBouncerUsers(names ...string) PgBouncerOption {
	return func(c *pgbouncerConfig) { c.users = append(c.users, names...) }
}

// NewPgBouncer starts PgBouncer in front of upstreamHost:upstreamPort (every database
// name maps to the same-named database there). The test is Unavailable when the
// pgbouncer binary is missing.
func NewPgBouncer(t testing.TB, upstreamHost string, upstreamPort int, opts ...PgBouncerOption) *PgBouncer {
	t.Helper()
	cfg := pgbouncerConfig{settings: map[string]string{}, users: []string{"postgres"}}
	for _, o := range opts {
		o(&cfg)
	}
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/pgbouncer"); err2 != nil {
			pgtest.Unavailable(t, "faults: pgbouncer is not installed (apt-get install pgbouncer)")
		}
		bin = "/usr/sbin/pgbouncer"
	}
	u := serverUser(t)
	b := &PgBouncer{user: u, bin: bin, dir: u.mkdirFor(t, "pgetl-pgbouncer-")}
	t.Cleanup(func() {
		b.kill()
		if err := os.RemoveAll(b.dir); err != nil {
			t.Errorf("faults: remove %s: %v", b.dir, err)
		}
	})

	var users strings.Builder
	for _, name := range cfg.users {
		fmt.Fprintf(&users, "%q \"\"\n", name)
	}
	b.writeFile(t, "userlist.txt", users.String())
	settings := map[string]string{
		"listen_addr":               "127.0.0.1",
		"unix_socket_dir":           "",
		"auth_type":                 "trust",
		"auth_file":                 filepath.Join(b.dir, "userlist.txt"),
		"pool_mode":                 "transaction",
		"ignore_startup_parameters": "extra_float_digits",
		"admin_users":               "postgres",
		"pidfile":                   filepath.Join(b.dir, "pgbouncer.pid"),
		"logfile":                   filepath.Join(b.dir, "pgbouncer.log"),
		"max_client_conn":           "200",
		"default_pool_size":         "20",
	}
	for k, v := range cfg.settings {
		settings[k] = v
	}
	// A free port can be taken between choosing and binding it: retry with another.
	for attempt := 1; ; attempt++ {
		b.port = FreePort(t)
		settings["listen_port"] = strconv.Itoa(b.port)
		var ini strings.Builder
		fmt.Fprintf(&ini, "[databases]\n* = host=%s port=%d\n\n[pgbouncer]\n", upstreamHost, upstreamPort)
		for k, v := range settings {
			fmt.Fprintf(&ini, "%s = %s\n", k, v)
		}
		b.writeFile(t, "pgbouncer.ini", ini.String())
		err := b.tryStart()
		if err == nil {
			break
		}
		if attempt == 3 {
			t.Fatalf("faults: start pgbouncer: %v\n%s", err, b.LogTail(20))
		}
		t.Logf("faults: start pgbouncer on port %d: %v; retrying", b.port, err)
	}
	return b
}

// Addr returns PgBouncer's listen address (127.0.0.1:port).
func (b *PgBouncer) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(b.port)) }

// Port returns PgBouncer's listen port.
func (b *PgBouncer) Port() int { return b.port }

// URL returns a connection string to database db through PgBouncer as postgres,
// without TLS.
func (b *PgBouncer) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", b.Addr(), db)
}

// LogFile returns the path of PgBouncer's log.
func (b *PgBouncer) LogFile() string { return filepath.Join(b.dir, "pgbouncer.log") }

// LogTail returns the last n lines of PgBouncer's log.
func (b *PgBouncer) LogTail(n int) string {
	data, _ := os.ReadFile(b.LogFile())
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// PID returns the PID of the running PgBouncer, or 0.
func (b *PgBouncer) PID() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil || b.exited() {
		return 0
	}
	return b.cmd.Process.Pid
}

// Running reports whether the PgBouncer process is alive.
func (b *PgBouncer) Running() bool { return b.PID() != 0 }

// Start starts a stopped PgBouncer again, on the same port, and waits until it
// accepts TCP connections.
func (b *PgBouncer) Start(t testing.TB) {
	t.Helper()
	if b.Running() {
		t.Fatalf("faults: pgbouncer already running (pid %d)", b.PID())
	}
	if err := b.tryStart(); err != nil {
		t.Fatalf("faults: start pgbouncer: %v\n%s", err, b.LogTail(20))
	}
}

// Signal sends sig to the running PgBouncer without waiting.
func (b *PgBouncer) Signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	pid := b.PID()
	if pid == 0 {
		t.Fatalf("faults: pgbouncer is not running")
	}
	if err := syscall.Kill(pid, sig); err != nil {
		t.Fatalf("faults: signal pgbouncer %d: %v", pid, err)
	}
}

// WaitExit waits up to timeout for the PgBouncer process to exit and reports whether
// it did.
func (b *PgBouncer) WaitExit(timeout time.Duration) bool {
	b.mu.Lock()
	done := b.done
	b.mu.Unlock()
	if done == nil {
		return true
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-done:
		return true
	case <-timer.C:
		return false
	}
}

// Stop sends sig (syscall.SIGTERM: immediate shutdown; syscall.SIGINT: safe
// shutdown, which waits for transactions in progress) and waits up to 30 s for
// PgBouncer to exit; if it does not, it is killed and the test fails.
func (b *PgBouncer) Stop(t testing.TB, sig syscall.Signal) {
	t.Helper()
	b.Signal(t, sig)
	if !b.WaitExit(30 * time.Second) {
		b.kill()
		t.Fatalf("faults: pgbouncer did not exit within 30s of %v", sig)
	}
}

// Restart stops PgBouncer with sig (see Stop) and starts it again on the same port.
func (b *PgBouncer) Restart(t testing.TB, sig syscall.Signal) {
	t.Helper()
	b.Stop(t, sig)
	b.Start(t)
}

func (b *PgBouncer) writeFile(t testing.TB, name, text string) {
	t.Helper()
	path := filepath.Join(b.dir, name)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatalf("faults: %v", err)
	}
	if err := b.user.chown(path); err != nil {
		t.Fatalf("faults: %v", err)
	}
}

// tryStart starts the process and waits until it accepts connections or exits.
func (b *PgBouncer) tryStart() error {
	// No deadline: the process outlives this call; kill stops it.
	cmd := b.user.command(context.Background(), b.dir, b.bin, filepath.Join(b.dir, "pgbouncer.ini"))
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	b.mu.Lock()
	b.cmd, b.done, b.exitErr = cmd, done, nil
	b.mu.Unlock()
	go func() {
		err := cmd.Wait()
		b.mu.Lock()
		b.exitErr = err
		b.mu.Unlock()
		close(done)
	}()
	var last error
	ok := poll(10*time.Second, 10*time.Millisecond, func() bool {
		select {
		case <-done:
			return true
		default:
		}
		conn, err := net.DialTimeout("tcp", b.Addr(), time.Second)
		if err == nil {
			_ = conn.Close()
		}
		last = err
		return err == nil
	})
	select {
	case <-done:
		b.mu.Lock()
		defer b.mu.Unlock()
		return fmt.Errorf("pgbouncer exited at start: %v", b.exitErr)
	default:
	}
	if !ok {
		b.kill()
		return fmt.Errorf("pgbouncer not listening on %s after 10s: %v", b.Addr(), last)
	}
	return nil
}

// exited reports whether the last started process has exited; b.mu is held.
func (b *PgBouncer) exited() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// kill stops a running PgBouncer: SIGTERM, then SIGKILL after 5 s.
func (b *PgBouncer) kill() {
	b.mu.Lock()
	cmd, done := b.cmd, b.done
	b.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(5 * time.Second)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		_ = cmd.Process.Kill()
		<-done
	}
}
