package faults

import (
	"context"
	"fmt"
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

	"github.com/pgetl/pgetl/internal/pgtest"
)

// Running servers (initdb, postgres, pgbouncer) as the postgres user and watching
// their processes.

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
