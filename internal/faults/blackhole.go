package faults

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// Environment of a test re-executed by RunInNetNS.
const (
	// EnvNetNS holds the name of the test the child process runs inside its private
	// network namespace.
	EnvNetNS = "PGETL_FAULTS_NETNS"
	// envHostNetNS holds the parent's network namespace (as /proc/self/ns/net reads),
	// which the child must not be in.
	envHostNetNS = "PGETL_FAULTS_HOST_NETNS"
)

// NetNSTimeout bounds a RunInNetNS child (less if the test's own deadline is nearer).
const NetNSTimeout = 90 * time.Second

// InNetNS reports whether t runs in the child process RunInNetNS started for it,
// inside a private network namespace. There it also brings the namespace's loopback
// up (once). A black-hole test is written as:
//
//	func TestX(t *testing.T) {
//		if !faults.InNetNS(t) {
//			faults.RunInNetNS(t)
//			return
//		}
//		c := faults.NewCluster(t) // on 127.0.0.1 of the namespace
//		… restore := c.BlackHole(t) … restore() …
//	}
func InNetNS(t testing.TB) bool {
	t.Helper()
	if os.Getenv(EnvNetNS) != t.Name() {
		return false
	}
	if err := checkPrivateNetNS(); err != nil {
		t.Fatalf("faults: %s is set but: %v", EnvNetNS, err)
	}
	loOnce.Do(func() {
		loErr = runQuiet("ip", "link", "set", "lo", "up")
	})
	if loErr != nil {
		t.Fatalf("faults: bring up lo in the namespace: %v", loErr)
	}
	return true
}

var (
	loOnce sync.Once
	loErr  error
)

// RunInNetNS re-executes the test binary with -test.run selecting exactly t, under
// `unshare --net` (a new, private network namespace with only a loopback), with
// EnvNetNS set so that InNetNS(t) is true there, plus env (KEY=value). The child's
// output goes to t.Log; t fails if the child fails and skips if it skips. The child
// is killed after NetNSTimeout. Servers the child started and did not stop (it was
// killed) are stopped by PID afterwards, and its temporary directory is removed.
// Needs root, unshare, ip and iptables; without them the test is Unavailable.
func RunInNetNS(t *testing.T, env ...string) {
	t.Helper()
	if os.Getenv(EnvNetNS) != "" {
		t.Fatalf("faults: RunInNetNS inside a namespace child (%s=%s)", EnvNetNS, os.Getenv(EnvNetNS))
	}
	if os.Geteuid() != 0 {
		pgtest.Unavailable(t, "faults: black-hole tests need root (network namespace + iptables)")
	}
	for _, bin := range []string{"unshare", "ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			pgtest.Unavailable(t, "faults: black-hole tests need "+bin+" (util-linux, iproute2)")
		}
	}
	if iptablesBin() == "" {
		pgtest.Unavailable(t, "faults: black-hole tests need iptables (apt-get install iptables)")
	}
	hostNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		pgtest.Unavailable(t, "faults: no /proc/self/ns/net: "+err.Error())
	}
	// The child's servers run as postgres: their temporary directories go here.
	base, err := os.MkdirTemp("", "pgetl-netns-")
	if err != nil {
		t.Fatalf("faults: %v", err)
	}
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatalf("faults: %v", err)
	}
	defer func() {
		sweepServers(t, base)
		if err := os.RemoveAll(base); err != nil {
			t.Errorf("faults: remove %s: %v", base, err)
		}
	}()

	timeout := NetNSTimeout
	if d, ok := t.Deadline(); ok && time.Until(d)-5*time.Second < timeout {
		timeout = time.Until(d) - 5*time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var parts []string
	for _, p := range strings.Split(t.Name(), "/") {
		parts = append(parts, "^"+regexp.QuoteMeta(p)+"$")
	}
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--", os.Args[0],
		"-test.run="+strings.Join(parts, "/"), "-test.v", "-test.count=1",
		"-test.timeout="+timeout.String())
	cmd.Env = append(os.Environ(), EnvNetNS+"="+t.Name(), envHostNetNS+"="+hostNS, "TMPDIR="+base)
	cmd.Env = append(cmd.Env, env...)
	out := &lineLogger{t: t, prefix: "netns: "}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err = cmd.Run()
	out.flush()
	all := out.all.String()
	switch {
	case ctx.Err() != nil:
		t.Fatalf("faults: namespace child killed after %v (timeout)", timeout)
	case err != nil:
		t.Fatalf("faults: namespace child failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	case strings.Contains(all, "--- SKIP: "+t.Name()):
		t.Skip("faults: skipped in the namespace child")
	case !strings.Contains(all, "--- PASS: "+t.Name()):
		t.Fatalf("faults: namespace child did not run %s", t.Name())
	}
}

// BlackHole silently drops, inside this private network namespace, every TCP packet
// to or from the cluster's port on the loopback (iptables INPUT DROP with --dport and
// with --sport): connections hang as if the server's host vanished, and new ones
// cannot be opened. restore removes the rules (also done in t.Cleanup); connections
// that the kernel has not given up on resume. It refuses to run outside a private
// network namespace (see InNetNS).
func (c *Cluster) BlackHole(t testing.TB) (restore func()) {
	t.Helper()
	return BlackHolePort(t, c.Port())
}

// BlackHolePort is Cluster.BlackHole for any TCP port of the namespace's loopback.
func BlackHolePort(t testing.TB, port int) (restore func()) {
	t.Helper()
	if err := checkPrivateNetNS(); err != nil {
		t.Fatalf("faults: refusing to touch iptables: %v", err)
	}
	bin := iptablesBin()
	if bin == "" {
		t.Fatalf("faults: no iptables")
	}
	p := strconv.Itoa(port)
	rules := [][]string{
		{"INPUT", "-i", "lo", "-p", "tcp", "--dport", p, "-j", "DROP"},
		{"INPUT", "-i", "lo", "-p", "tcp", "--sport", p, "-j", "DROP"},
	}
	var added [][]string
	var once sync.Once
	restore = func() {
		once.Do(func() {
			for _, r := range added {
				if err := runQuiet(bin, append([]string{"-w", "5", "-D"}, r...)...); err != nil {
					t.Errorf("faults: remove black hole rule: %v", err)
				}
			}
		})
	}
	t.Cleanup(restore)
	for _, r := range rules {
		if err := runQuiet(bin, append([]string{"-w", "5", "-A"}, r...)...); err != nil {
			restore()
			t.Fatalf("faults: add black hole rule: %v", err)
		}
		added = append(added, r)
	}
	return restore
}

// checkPrivateNetNS returns an error unless this process is in a network namespace
// other than PID 1's, its parent process's and the one RunInNetNS was called from,
// checking every one it can read (at least one: PID 1's is unreadable without
// ptrace rights over PID 1, as in some containers).
func checkPrivateNetNS() error {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return err
	}
	refs := map[string]string{"the parent test's": os.Getenv(envHostNetNS)}
	for who, path := range map[string]string{
		"PID 1's":              "/proc/1/ns/net",
		"the parent process's": fmt.Sprintf("/proc/%d/ns/net", os.Getppid()),
	} {
		refs[who], _ = os.Readlink(path)
	}
	checked := 0
	for who, ns := range refs {
		if ns == "" {
			continue
		}
		checked++
		if ns == self {
			return fmt.Errorf("this process is in %s network namespace (%s), not a private one", who, self)
		}
	}
	if checked == 0 {
		return fmt.Errorf("cannot tell whether network namespace %s is private", self)
	}
	return nil
}

var (
	iptOnce sync.Once
	iptPath string
)

// iptablesBin returns the iptables command to use: iptables (nf_tables on Debian 12),
// else iptables-legacy or iptables-nft; both work inside an unshared namespace.
func iptablesBin() string {
	iptOnce.Do(func() {
		for _, name := range []string{"iptables", "iptables-nft", "iptables-legacy"} {
			if p, err := exec.LookPath(name); err == nil {
				iptPath = p
				return
			}
		}
	})
	return iptPath
}

func runQuiet(name string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// sweepServers stops, by the PIDs in their pid files, the clusters and PgBouncers a
// killed namespace child left running under base.
func sweepServers(t testing.TB, base string) {
	pidFiles, _ := filepath.Glob(filepath.Join(base, "pgetl-cluster-*", "data", "postmaster.pid"))
	more, _ := filepath.Glob(filepath.Join(base, "pgetl-pgbouncer-*", "pgbouncer.pid"))
	for _, f := range append(pidFiles, more...) {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		first, _, _ := strings.Cut(string(b), "\n")
		pid, err := strconv.Atoi(strings.TrimSpace(first))
		if err != nil || !alive(pid) {
			continue
		}
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if name := strings.TrimSpace(string(comm)); name != "postgres" && name != "pgbouncer" {
			continue // the PID was reused by something else
		}
		t.Logf("faults: stopping %s (pid %d) left by the namespace child", f, pid)
		sig := syscall.SIGTERM // pgbouncer: immediate shutdown
		if strings.HasSuffix(f, "postmaster.pid") {
			sig = syscall.SIGQUIT // postgres: immediate shutdown
		}
		_ = syscall.Kill(pid, sig)
		if !poll(10*time.Second, 20*time.Millisecond, func() bool { return !alive(pid) }) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// lineLogger writes each complete line to t.Log and keeps everything.
type lineLogger struct {
	mu     sync.Mutex
	t      testing.TB
	prefix string
	buf    []byte
	all    bytes.Buffer
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.all.Write(p)
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.t.Log(l.prefix + string(l.buf[:i]))
		l.buf = l.buf[i+1:]
	}
	return len(p), nil
}

func (l *lineLogger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.buf) > 0 {
		l.t.Log(l.prefix + string(l.buf))
		l.buf = nil
	}
}
