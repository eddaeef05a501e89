// Package dbtest gives this module's tests their PostgreSQL database: a small copy
// of the core module's internal/pgtest (which another module cannot import),
// without its testcontainers fallback.
//
// The database comes from PGETL_TEST_DATABASE_URL when set, else from a server
// reachable with libpq defaults. Each test gets its own schema, dropped in
// t.Cleanup. When CI=true a test that cannot get its database fails; it never skips.
package dbtest

import (
	"context"
	"fmt"
	"os"
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
	once    sync.Once
	baseURL string
	baseErr error
	seq     atomic.Int64
)

// InCI reports whether CI=true, where missing infrastructure fails instead of skipping.
func InCI() bool { return os.Getenv("CI") == "true" }

// Main runs the package's tests and checks for leaked goroutines. Call it from
// TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreTopFunction("internal/poll.runtime_pollWait")); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// Unavailable fails (CI=true) or skips the test with msg.
func Unavailable(t testing.TB, msg string) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s (CI=true: tests must not skip)", msg)
	}
	t.Skip(msg)
}

// URL returns the base connection string of the test database.
func URL(t testing.TB) string {
	t.Helper()
	once.Do(func() {
		baseURL = os.Getenv(EnvURL)
		baseErr = ping(baseURL)
		if baseErr != nil && baseURL != "" {
			baseErr = fmt.Errorf("%s is set but unusable: %w", EnvURL, baseErr)
		}
	})
	if baseErr != nil {
		Unavailable(t, "dbtest: no PostgreSQL for tests: set "+EnvURL+
			" (e.g. postgres://postgres@127.0.0.1:5432/test) or run a server reachable with libpq defaults: "+baseErr.Error())
	}
	return baseURL
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
	// URL connects to the test database (no search_path: name the schema).
	URL string
	// Schema is the test's own schema (short enough for River's Config.Schema),
	// dropped at cleanup.
	Schema string
	// Pool is a plain pgxpool on URL for the test's own set-up and checks.
	Pool *pgxpool.Pool
}

// New creates a schema for t and returns it with a pool. The schema and the pool
// are removed in t.Cleanup.
func New(t testing.TB) *DB {
	t.Helper()
	base := URL(t)
	schema := fmt.Sprintf("prv_%d_%d", os.Getpid(), seq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, base)
	if err != nil {
		t.Fatalf("dbtest: pool: %v", err)
	}
	if _, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		pool.Close()
		t.Fatalf("dbtest: create schema: %v", err)
	}
	db := &DB{URL: base, Schema: schema, Pool: pool}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("dbtest: drop schema %s: %v", schema, err)
		}
		pool.Close()
	})
	return db
}

// Ident returns name qualified with the test's schema, quoted for SQL.
func (db *DB) Ident(name string) string { return pgx.Identifier{db.Schema, name}.Sanitize() }

// Qualified returns name qualified with the test's schema, unquoted ("schema.name"),
// as pgetl's BatchConfig.Table takes it.
func (db *DB) Qualified(name string) string { return db.Schema + "." + name }

// Int returns the single int64 that sql yields.
func (db *DB) Int(t testing.TB, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := db.Pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("dbtest: %s: %v", sql, err)
	}
	return n
}

// PgBouncerURL returns the connection string of a PgBouncer in transaction mode in
// front of the test database; it fails under CI=true and skips otherwise when unset.
func PgBouncerURL(t testing.TB) string {
	t.Helper()
	u := os.Getenv(EnvPgBouncerURL)
	if u == "" {
		Unavailable(t, "dbtest: no PgBouncer for tests: set "+EnvPgBouncerURL+
			" to a PgBouncer in transaction mode in front of the test database (bash .ci/run starts one)")
	}
	return u
}

// Eventually polls cond every interval until it returns true (returns nil), returns
// an error (returns it), or timeout passes (returns an error naming what).
func Eventually(ctx context.Context, timeout, interval time.Duration, what string, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
		case <-t.C:
		}
	}
}
