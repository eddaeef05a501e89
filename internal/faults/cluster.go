package faults

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl/internal/pgtest"
)

// Cluster is a throwaway PostgreSQL cluster: a temporary data directory initialised
// with initdb and run with pg_ctl as the postgres user (or the current user when not
// root), listening on a free port of 127.0.0.1 only (and a Unix socket in its own
// directory), with fsync off. It is stopped (-m immediate) and its directory removed
// in t.Cleanup. Methods fail the test on error.
type Cluster struct {
	user pgUser
	bin  string
	dir  string // owned by the server user: data/, postgres.log, the socket
	port int

	mu  sync.Mutex
	pid int // postmaster PID while running (0 when stopped)
}

// ClusterOption configures NewCluster.
type ClusterOption func(*clusterConfig)

type clusterConfig struct {
	settings [][2]string
}

// ClusterSetting sets a server parameter in the cluster's configuration file (so it
// survives restarts), e.g. ClusterSetting("tcp_keepalives_idle", "2").
func ClusterSetting(name, value string) ClusterOption {
	return func(c *clusterConfig) { c.settings = append(c.settings, [2]string{name, value}) }
}

// Timeouts of cluster operations.
const (
	clusterOpTimeout = 60 * time.Second // one initdb or pg_ctl run
	readyTimeout     = 30 * time.Second // accepting connections again after a crash
)

// NewCluster initialises and starts a throwaway cluster. It needs PostgreSQL's server
// binaries (see PGETL_PG_BINDIR) and, when the test runs as root, a postgres user;
// without them the test is Unavailable.
func NewCluster(t testing.TB, opts ...ClusterOption) *Cluster {
	t.Helper()
	var cfg clusterConfig
	for _, o := range opts {
		o(&cfg)
	}
	u := serverUser(t)
	bin, err := pgBinDir()
	if err != nil {
		pgtest.Unavailable(t, "faults: "+err.Error())
	}
	c := &Cluster{user: u, bin: bin, dir: u.mkdirFor(t, "pgetl-cluster-")}
	t.Cleanup(func() {
		c.stopImmediate()
		if err := os.RemoveAll(c.dir); err != nil {
			t.Errorf("faults: remove %s: %v", c.dir, err)
		}
	})
	start := time.Now()
	c.run(t, "initdb", "-D", c.DataDir(), "-A", "trust", "-U", "postgres", "--no-sync",
		"-E", "UTF8", "--locale=C", "--no-instructions")
	conf := []string{
		"listen_addresses = '127.0.0.1'",
		"unix_socket_directories = '" + c.dir + "'",
		"fsync = off", "full_page_writes = off", // safe for process crashes, not for OS crashes
		"shared_buffers = '32MB'", "max_connections = 60",
		"log_line_prefix = '%m [%p] %a '",
		"include_if_exists = 'pgetl_faults_port.conf'",
	}
	for _, s := range cfg.settings {
		conf = append(conf, fmt.Sprintf("%s = '%s'", s[0], strings.ReplaceAll(s[1], "'", "''")))
	}
	appendFile(t, filepath.Join(c.DataDir(), "postgresql.conf"), "\n# pgetl faults\n"+strings.Join(conf, "\n")+"\n")
	c.startOnFreePort(t)
	t.Logf("faults: cluster %s up in %v (data %s)", c.Addr(), time.Since(start).Round(time.Millisecond), c.DataDir())
	return c
}

// startOnFreePort starts the cluster for the first time on a free port, written to
// pgetl_faults_port.conf (which postgresql.conf includes). A free port can be taken
// between choosing and binding it: it retries with another.
func (c *Cluster) startOnFreePort(t testing.TB) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		c.port = FreePort(t)
		portConf := filepath.Join(c.DataDir(), "pgetl_faults_port.conf")
		if err := os.WriteFile(portConf, []byte(fmt.Sprintf("port = %d\n", c.port)), 0o600); err != nil {
			t.Fatalf("faults: %v", err)
		}
		if err := c.user.chown(portConf); err != nil {
			t.Fatalf("faults: %v", err)
		}
		err := c.tryStart()
		if err == nil {
			return
		}
		if attempt == 3 {
			t.Fatalf("faults: start cluster: %v\n%s", err, c.LogTail(30))
		}
		t.Logf("faults: start cluster on port %d: %v; retrying", c.port, err)
	}
}

// DataDir returns the cluster's data directory.
func (c *Cluster) DataDir() string { return filepath.Join(c.dir, "data") }

// SocketDir returns the directory of the cluster's Unix socket.
func (c *Cluster) SocketDir() string { return c.dir }

// LogFile returns the path of the server log.
func (c *Cluster) LogFile() string { return filepath.Join(c.dir, "postgres.log") }

// Host returns the address the cluster listens on: 127.0.0.1.
func (c *Cluster) Host() string { return "127.0.0.1" }

// Port returns the cluster's TCP port.
func (c *Cluster) Port() int { return c.port }

// Addr returns host:port of the cluster.
func (c *Cluster) Addr() string { return net.JoinHostPort(c.Host(), strconv.Itoa(c.port)) }

// URL returns a connection string to the cluster's postgres database as the postgres
// superuser over TCP, without TLS.
func (c *Cluster) URL() string {
	return fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", c.Addr())
}

// PID returns the postmaster's PID, or 0 when the cluster is stopped.
func (c *Cluster) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pid
}

// Start starts a stopped cluster (after StopImmediate, crash recovery runs first) and
// waits until it accepts connections.
func (c *Cluster) Start(t testing.TB) {
	t.Helper()
	if err := c.tryStart(); err != nil {
		t.Fatalf("faults: start cluster: %v\n%s", err, c.LogTail(30))
	}
}

// Restart restarts the cluster with pg_ctl restart -m fast: sessions are terminated
// (clients get 57P01 admin_shutdown), open transactions roll back, the server
// checkpoints and comes back on the same port. It returns when connections are
// accepted again.
func (c *Cluster) Restart(t testing.TB) {
	t.Helper()
	c.Stop(t, "fast")
	c.Start(t)
}

// StopImmediate stops the cluster with pg_ctl stop -m immediate: every process exits
// at once without a checkpoint (as on a power loss); Start runs crash recovery.
func (c *Cluster) StopImmediate(t testing.TB) {
	t.Helper()
	c.Stop(t, "immediate")
}

// Stop stops the cluster with pg_ctl stop -m mode ("smart", "fast" or "immediate")
// and waits until the postmaster has exited.
func (c *Cluster) Stop(t testing.TB, mode string) {
	t.Helper()
	pid := c.PID()
	c.run(t, "pg_ctl", "stop", "-D", c.DataDir(), "-m", mode, "-w", "-t", "60")
	if !poll(10*time.Second, 10*time.Millisecond, func() bool { return !alive(pid) }) {
		t.Fatalf("faults: postmaster %d still alive after pg_ctl stop", pid)
	}
	c.mu.Lock()
	c.pid = 0
	c.mu.Unlock()
}

// Crash kills (SIGKILL) one backend of the cluster, from a connection it opens for
// the purpose; see CrashBackend.
func (c *Cluster) Crash(t testing.TB) {
	t.Helper()
	conn, err := c.connect(5 * time.Second)
	if err != nil {
		t.Fatalf("faults: crash: connect: %v", err)
	}
	var pid int
	err = conn.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid)
	if err != nil {
		closeQuietly(conn)
		t.Fatalf("faults: crash: %v", err)
	}
	c.CrashBackend(t, pid)
	closeQuietly(conn)
}

// CrashBackend kills backend pid of the cluster with SIGKILL. The postmaster then
// terminates every other backend (their clients lose their connections, in-flight
// transactions are lost), runs crash recovery and accepts connections again;
// CrashBackend returns when it does. pid must be a child of this cluster's postmaster.
func (c *Cluster) CrashBackend(t testing.TB, pid int) {
	t.Helper()
	pm := c.PID()
	if pm == 0 || parentPID(pid) != pm {
		t.Fatalf("faults: crash: %d is not a backend of postmaster %d", pid, pm)
	}
	logOffset := c.logSize()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("faults: crash: kill %d: %v", pid, err)
	}
	// The postmaster logs the crash, reinitialises, then logs it is ready again.
	ok := poll(readyTimeout, 20*time.Millisecond, func() bool {
		log := c.logSince(logOffset)
		i := strings.Index(log, "terminating any other active server processes")
		return i >= 0 && strings.Contains(log[i:], "database system is ready to accept connections")
	})
	if !ok {
		t.Fatalf("faults: crash: cluster did not reinitialise within %v\n%s", readyTimeout, c.LogTail(30))
	}
	c.WaitReady(t, readyTimeout)
}

// WaitReady waits until the cluster accepts connections and runs a query.
func (c *Cluster) WaitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	var last error
	ok := poll(timeout, 20*time.Millisecond, func() bool {
		conn, err := c.connect(2 * time.Second)
		if err == nil {
			_, err = conn.Exec(context.Background(), "SELECT 1")
			closeQuietly(conn)
		}
		last = err
		return err == nil
	})
	if !ok {
		t.Fatalf("faults: cluster %s not ready within %v: %v\n%s", c.Addr(), timeout, last, c.LogTail(30))
	}
}

// SetReadOnly sets default_transaction_read_only for the whole cluster (ALTER SYSTEM +
// pg_reload_conf), as a demoted primary or a hot standby after a failover would
// behave: writes fail with SQLSTATE 25006 read_only_sql_transaction. It returns once
// new sessions get the setting. Existing sessions pick it up before their next
// statement (a backend processes the reload signal between commands), but a
// transaction already open keeps the read/write mode it began with.
func (c *Cluster) SetReadOnly(t testing.TB, on bool) {
	t.Helper()
	if on {
		c.Exec(t, "ALTER SYSTEM SET default_transaction_read_only = on")
	} else {
		c.Exec(t, "ALTER SYSTEM RESET default_transaction_read_only")
	}
	c.Exec(t, "SELECT pg_reload_conf()")
	want := map[bool]string{true: "on", false: "off"}[on]
	var got string
	ok := poll(10*time.Second, 10*time.Millisecond, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, c.URL())
		if err != nil {
			return false
		}
		defer closeQuietly(conn)
		err = conn.QueryRow(ctx, "SHOW default_transaction_read_only").Scan(&got)
		return err == nil && got == want
	})
	if !ok {
		t.Fatalf("faults: default_transaction_read_only is %q, want %q", got, want)
	}
}

// Exec runs sql (with args) on a new superuser session of the cluster, with
// default_transaction_read_only off so that it works on a read-only cluster too.
func (c *Cluster) Exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	conn, err := c.connect(10 * time.Second)
	if err != nil {
		t.Fatalf("faults: cluster exec: connect: %v", err)
	}
	defer closeQuietly(conn)
	ctx, cancel := context.WithTimeout(context.Background(), clusterOpTimeout)
	defer cancel()
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("faults: cluster exec %q: %v", sql, err)
	}
}

// LogTail returns the last n lines of the server log.
func (c *Cluster) LogTail(n int) string {
	b, _ := os.ReadFile(c.LogFile())
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (c *Cluster) connect(timeout time.Duration) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(c.URL())
	if err != nil {
		return nil, err
	}
	cfg.ConnectTimeout = timeout
	cfg.RuntimeParams["default_transaction_read_only"] = "off"
	cfg.RuntimeParams["application_name"] = "pgetl-faults-admin"
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return pgx.ConnectConfig(ctx, cfg)
}

func (c *Cluster) tryStart() error {
	ctx, cancel := context.WithTimeout(context.Background(), clusterOpTimeout)
	defer cancel()
	cmd := c.user.command(ctx, c.dir, filepath.Join(c.bin, "pg_ctl"), "start", "-D", c.DataDir(),
		"-l", c.LogFile(), "-w", "-t", "60")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pg_ctl start: %v: %s", err, bytes.TrimSpace(out))
	}
	pid, err := readPostmasterPID(c.DataDir())
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.pid = pid
	c.mu.Unlock()
	return nil
}

// stopImmediate stops the cluster at cleanup: pg_ctl stop -m immediate, then SIGKILL
// of the postmaster if it is still alive.
func (c *Cluster) stopImmediate() {
	pid, err := readPostmasterPID(c.DataDir())
	if err != nil {
		return // not running
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterOpTimeout)
	defer cancel()
	_ = c.user.command(ctx, c.dir, filepath.Join(c.bin, "pg_ctl"), "stop", "-D", c.DataDir(),
		"-m", "immediate", "-w", "-t", "30").Run()
	if !poll(10*time.Second, 10*time.Millisecond, func() bool { return !alive(pid) }) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// run runs one of the server binaries as the server user and fails t on error.
func (c *Cluster) run(t testing.TB, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clusterOpTimeout)
	defer cancel()
	out, err := c.user.command(ctx, c.dir, filepath.Join(c.bin, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("faults: %s %s: %v\n%s\n%s", name, strings.Join(args, " "), err, out, c.LogTail(20))
	}
}

func (c *Cluster) logSize() int64 {
	fi, err := os.Stat(c.LogFile())
	if err != nil {
		return 0
	}
	return fi.Size()
}

func (c *Cluster) logSince(off int64) string {
	f, err := os.Open(c.LogFile())
	if err != nil {
		return ""
	}
	defer f.Close()
	var b bytes.Buffer
	if _, err := f.Seek(off, 0); err == nil {
		_, _ = b.ReadFrom(f)
	}
	return b.String()
}

// readPostmasterPID returns the PID in dataDir/postmaster.pid.
func readPostmasterPID(dataDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(string(b), "\n")
	return strconv.Atoi(strings.TrimSpace(first))
}

// parentPID returns the parent of process pid per /proc, or 0.
func parentPID(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:]) // state ppid ...
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

func appendFile(t testing.TB, path, text string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatalf("faults: %v", err)
	}
	if _, err := f.WriteString(text); err != nil {
		_ = f.Close()
		t.Fatalf("faults: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("faults: %v", err)
	}
}

func closeQuietly(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}
