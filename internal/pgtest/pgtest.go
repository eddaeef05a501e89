// Package pgtest gives tests and benchmarks their PostgreSQL database.
//
// The database comes from PGETL_TEST_DATABASE_URL when set; else from a server
// reachable with libpq defaults (PGHOST, PGPORT, …, or the local socket/localhost);
// else from a throwaway testcontainers-go Postgres where a Docker engine exists (see
// below). Each test gets its own schema, dropped in t.Cleanup. When CI=true a test
// that cannot get its database fails with a message saying what to set; it never
// skips.
//
// # The container fallback
//
// testcontainers-go and the Docker client are not dependencies of the core module
// (they would land in the go.sum of every program that imports pgetl). The fallback
// runs the command internal/testkit/cmd/pgcontainer of the test-kit module instead:
// `go run ./cmd/pgcontainer` in that module's directory, found from this file's own
// path, so it needs the go command and a source checkout of pgetl (which running
// pgetl's tests implies). The first run builds it, which downloads the test-kit
// module's dependencies. The command prints the container's connection string and
// stops the container when its stdin closes: Main closes it after the tests, and the
// operating system closes it if the test binary dies. Where no Docker engine runs,
// the command fails and URL reports that with the other two reasons.
package pgtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"
)

// EnvURL names the variable holding the test database's connection string.
const EnvURL = "PGETL_TEST_DATABASE_URL"

// EnvPgBouncerURL names the variable holding a connection string to a PgBouncer in
// transaction mode in front of the test database.
const EnvPgBouncerURL = "PGETL_TEST_PGBOUNCER_URL"

var (
	once      sync.Once
	baseURL   string
	baseErr   error
	container *containerProcess // the container fallback's command, if it started
	seq       atomic.Int64
)

// InCI reports whether CI=true, where missing infrastructure fails instead of skipping.
func InCI() bool { return os.Getenv("CI") == "true" }

// Main runs the package's tests, stops a container started for them and checks for
// leaked goroutines. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if container != nil {
		if err := container.stop(time.Minute); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
		}
	}
	if code == 0 {
		if err := goleak.Find(ignoreLeaks()...); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func ignoreLeaks() []goleak.Option {
	return []goleak.Option{
		// testcontainers' reaper and docker client keep background goroutines.
		goleak.IgnoreTopFunction("github.com/testcontainers/testcontainers-go.(*Reaper).connect.func1"),
		// pgconn closes a connection that failed mid-query in the background: it
		// dials the server to send a CancelRequest, bounded by pgconn's own deadline
		// (seconds). Behind a black hole that dial outlives the test; it is pgx's
		// goroutine, and it ends by itself.
		goleak.IgnoreAnyFunction("github.com/jackc/pgx/v5/pgconn.(*PgConn).asyncClose.func1"),
	}
}

// Unavailable fails (CI=true) or skips the test with msg.
func Unavailable(t testing.TB, msg string) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s (CI=true: tests must not skip)", msg)
	}
	t.Skip(msg)
}

// URL returns the base connection string of the test database (shared by all tests:
// use New for an isolated schema).
func URL(t testing.TB) string {
	t.Helper()
	once.Do(func() { baseURL, baseErr = find() })
	if baseErr != nil {
		Unavailable(t, "pgtest: no PostgreSQL for tests: set "+EnvURL+
			" (e.g. postgres://postgres@127.0.0.1:5432/test), run a local server reachable with libpq defaults, or install Docker: "+
			baseErr.Error())
	}
	return baseURL
}

func find() (string, error) {
	if u := os.Getenv(EnvURL); u != "" {
		if err := ping(u); err != nil {
			return "", fmt.Errorf("%s is set but unusable: %w", EnvURL, err)
		}
		return u, nil
	}
	errLocal := ping("")
	if errLocal == nil {
		return "", nil // libpq defaults
	}
	c, err := startContainer(5 * time.Minute)
	if err != nil {
		return "", fmt.Errorf("local server: %v; testcontainers: %w", errLocal, err)
	}
	container = c
	if err := ping(c.url); err != nil {
		return "", fmt.Errorf("local server: %v; testcontainers: container started but unusable: %w", errLocal, err)
	}
	return c.url, nil
}

func ping(connString string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		return err
	}
	cfg.ConnectTimeout = 5 * time.Second
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// DB is one test's database: a schema of its own on the shared test server.
type DB struct {
	// URL connects to the test database with search_path set to Schema (sent in the
	// startup packet: not for use through PgBouncer).
	URL string
	// BaseURL connects to the test database without a search_path.
	BaseURL string
	// Schema is the test's own schema, dropped at cleanup.
	Schema string
	// Pool is a plain pgxpool on URL for the test's own set-up and checks.
	Pool *pgxpool.Pool
}

// New creates a schema for t and returns it with a pool whose search_path is that
// schema. The schema and the pool are removed in t.Cleanup.
func New(t testing.TB) *DB {
	t.Helper()
	return newDB(t, 40)
}

// NewShort is New with a schema name of at most 40 bytes (New's may reach about 55),
// for tools that build longer identifiers from the schema's name: River's
// Config.Schema takes at most 46 bytes.
func NewShort(t testing.TB) *DB {
	t.Helper()
	return newDB(t, 0)
}

// newDB is New with the test's name cut to maxName bytes in the schema's name; 0
// cuts it so the whole name fits in 40 bytes.
func newDB(t testing.TB, maxName int) *DB {
	t.Helper()
	base := URL(t)
	name := strings.ToLower(t.Name())
	name = strings.Map(func(r rune) rune {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			return r
		}
		return '_'
	}, name)
	suffix := fmt.Sprintf("_%d_%d", os.Getpid(), seq.Add(1))
	if maxName == 0 {
		maxName = max(1, 40-len("t_")-len(suffix))
	}
	if len(name) > maxName {
		name = name[:maxName]
	}
	schema := "t_" + name + suffix
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create schema: %v", err)
	}
	url := WithParam(base, "search_path", schema)
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatalf("pgtest: pool: %v", err)
	}
	db := &DB{URL: url, BaseURL: base, Schema: schema, Pool: pool}
	t.Cleanup(func() {
		pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Errorf("pgtest: cleanup connect: %v", err)
			return
		}
		defer conn.Close(ctx)
		// End what the test left behind in its schema before dropping it.
		_, _ = conn.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE pid <> pg_backend_pid() AND datname = current_database() AND application_name LIKE $1`, schema+"%")
		if _, err := conn.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("pgtest: drop schema %s: %v", schema, err)
		}
	})
	return db
}

// Ident returns name qualified with the test's schema, quoted for SQL.
func (db *DB) Ident(name string) string { return pgx.Identifier{db.Schema, name}.Sanitize() }

// Qualified returns name qualified with the test's schema, unquoted ("schema.name"),
// as pgetl's BatchConfig.Table takes it.
func (db *DB) Qualified(name string) string { return db.Schema + "." + name }

// Exec runs sql on the test's pool and fails the test on error.
func (db *DB) Exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	if _, err := db.Pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("pgtest: %s: %v", sql, err)
	}
}

// Int returns the single int64 that sql yields.
func (db *DB) Int(t testing.TB, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := db.Pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("pgtest: %s: %v", sql, err)
	}
	return n
}

// PgBouncerURL returns the connection string of a PgBouncer in transaction mode in
// front of the test database (PGETL_TEST_PGBOUNCER_URL); it fails under CI=true and
// skips otherwise when unset.
func PgBouncerURL(t testing.TB) string {
	t.Helper()
	u := os.Getenv(EnvPgBouncerURL)
	if u == "" {
		Unavailable(t, "pgtest: no PgBouncer for tests: set "+EnvPgBouncerURL+
			" to a PgBouncer in transaction mode in front of the test database (bash .ci/run starts one)")
	}
	return u
}

// WithParam returns connString with key=value added, in URL or key=value form.
func WithParam(connString, key, value string) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		sep := "?"
		if strings.Contains(connString, "?") {
			sep = "&"
		}
		return connString + sep + key + "=" + value
	}
	if connString == "" {
		return key + "=" + value
	}
	return connString + " " + key + "=" + value
}
