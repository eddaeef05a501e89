package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/workload"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

const e2eRows = 20_000

// e2e is the built job and the database it runs against.
type e2e struct {
	bin     string
	baseURL string
}

// result is one finished run of the job.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\n--- stdout:\n%s--- stderr:\n%s", r.code, r.stdout, r.stderr)
}

// command returns the job's command for schema with args; DATABASE_URL is cleared
// so that -dsn (or libpq's defaults when the test database uses them) decides.
func (e *e2e) command(ctx context.Context, schema string, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	args = append([]string{"-dsn", e.baseURL, "-schema", schema, "-progress-every", "200ms"}, args...)
	cmd := exec.CommandContext(ctx, e.bin, args...)
	cmd.Env = append(os.Environ(), "DATABASE_URL=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	return cmd, &stdout, &stderr
}

func (e *e2e) run(t *testing.T, schema string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd, stdout, stderr := e.command(ctx, schema, args...)
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %v: %v", args, err)
	}
	return result{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String()}
}

// requireTable checks that the products table of db holds exactly rows 1..n at
// version v, minus the rows in skip, each once.
func requireTable(t *testing.T, db *pgtest.DB, n, v int64, skip ...int64) {
	t.Helper()
	var want workload.Sum
	for i := int64(1); i <= n; i++ {
		if !contains(skip, i) {
			want.Add(workload.Row(i, v))
		}
	}
	ctx := context.Background()
	count, sum, err := workload.QueryChecksum(ctx, db.Pool, db.Ident("products"))
	require.NoError(t, err)
	require.Equal(t, want.Count(), count, "row count")
	require.Equal(t, want.String(), sum, "checksum of the table's content")
	require.Equal(t, count, db.Int(t, "SELECT count(DISTINCT sku) FROM "+db.Ident("products")), "duplicate SKUs")
}

func contains(xs []int64, x int64) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}

func writeCSV(t *testing.T, dir string, n int64, bad map[int64]string) string {
	t.Helper()
	var buf bytes.Buffer
	require.NoError(t, workload.CSV(&buf, 1, n, 1))
	lines := strings.SplitAfter(buf.String(), "\n")
	for line, text := range bad { // line numbers from 1, the header is line 1
		lines[line-1] = text + "\n"
	}
	path := filepath.Join(dir, fmt.Sprintf("products-%d.csv", len(bad)))
	require.NoError(t, os.WriteFile(path, []byte(strings.Join(lines, "")), 0o644))
	return path
}

func TestProductsJob(t *testing.T) {
	base := pgtest.URL(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "products")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	e := &e2e{bin: bin, baseURL: base}

	for _, src := range []struct{ name, source string }{
		{"api", "api"}, {"synthetic", "synthetic"}, {"csv", "csv"}, {"insert", "synthetic"},
	} {
		t.Run("Source_"+src.name, func(t *testing.T) {
			t.Parallel()
			db := pgtest.New(t)
			args := []string{"-rows", fmt.Sprint(e2eRows), "-source", src.source, "-page-delay", "1ms", "-page-size", "200", "-api-faults", "0.05"}
			if src.name == "csv" {
				args = []string{"-source", "csv:" + writeCSV(t, t.TempDir(), e2eRows, nil)}
			}
			if src.name == "insert" {
				args = append(args, "-mode", "insert")
			}
			r := e.run(t, db.Schema, args...)
			require.Equal(t, 0, r.code, "%s", r)
			require.Contains(t, r.stdout, "every source row accounted for")
			require.Contains(t, r.stdout, fmt.Sprintf("loaded      %d (inserted %d, updated 0)", e2eRows, e2eRows), "%s", r)
			requireTable(t, db, e2eRows, 1)
			if src.name == "api" {
				require.Contains(t, r.stdout, "retries     ", "%s", r)
				require.NotContains(t, r.stdout, "(database 0, api 0)", "no API fault was retried: %s", r)
			}
			require.Contains(t, r.stderr, "msg=progress", "no progress lines on a non-terminal stderr")
		})
	}

	t.Run("KillResumeVersion2", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		job := "kill-" + db.Schema
		args := []string{"-job", job, "-rows", fmt.Sprint(e2eRows), "-page-size", "200", "-page-delay", "15ms",
			"-commit-rows", "1000", "-api-faults", "0", "-in-flight", "4"} // killed with batches in flight
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd, _, stderr := e.command(ctx, db.Schema, args...)
		require.NoError(t, cmd.Start())
		// Kill it once some batches are committed, well before the end.
		deadline := time.Now().Add(30 * time.Second)
		for {
			cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
			if err == nil && cp.Rows >= 2000 {
				require.Less(t, cp.Rows, int64(e2eRows), "the run ended before it could be killed")
				break
			}
			require.True(t, time.Now().Before(deadline), "no checkpoint progress: %v %+v\n%s", err, cp, stderr)
			time.Sleep(10 * time.Millisecond) // polling interval
		}
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		err := cmd.Wait()
		require.Error(t, err)
		require.False(t, cmd.ProcessState.Success())
		// A batch whose whole message was sent before the kill may still commit on
		// the server: wait until the dead run's backends are gone, then read where
		// it stopped.
		deadline = time.Now().Add(30 * time.Second)
		for db.Int(t, `SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1`, "pgetl "+job+"#%") > 0 {
			require.True(t, time.Now().Before(deadline), "the killed run's backends did not end")
			time.Sleep(10 * time.Millisecond) // polling interval
		}
		killed, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
		require.NoError(t, err)
		require.False(t, killed.Finished)

		// The rerun claims the dead run's job at once and resumes after its checkpoint.
		r := e.run(t, db.Schema, append(args, "-takeover", "-page-delay", "1ms")...)
		require.Equal(t, 0, r.code, "%s", r)
		require.Contains(t, r.stdout, "resumed     after row "+killed.Cursor, "%s", r)
		require.Contains(t, r.stdout, fmt.Sprintf("job total: %d rows, 0 rejects", e2eRows), "%s", r)
		requireTable(t, db, e2eRows, 1)
		cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
		require.NoError(t, err)
		require.True(t, cp.Finished)
		require.Equal(t, fmt.Sprint(e2eRows), cp.Cursor)

		// Version 2 of the same job (finished: it starts over) updates every row.
		r = e.run(t, db.Schema, "-job", job, "-rows", fmt.Sprint(e2eRows), "-version", "2", "-page-delay", "0")
		require.Equal(t, 0, r.code, "%s", r)
		require.Contains(t, r.stdout, fmt.Sprintf("loaded      %d (inserted 0, updated %d)", e2eRows, e2eRows), "%s", r)
		requireTable(t, db, e2eRows, 2)
		require.Zero(t, db.Int(t, `SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND application_name LIKE $1`, "pgetl "+job+"%"))
	})

	t.Run("BadCSVLine", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		// Line 5002 holds row 5001.
		path := writeCSV(t, t.TempDir(), e2eRows, map[int64]string{5002: "SKU-0005001,Product 5001 v1,12.3x,7,2024-01-12T13:46:41Z"})

		// -max-rejects 0: fatal, reported with its line; the rows before it committed.
		r := e.run(t, db.Schema, "-source", "csv:"+path, "-commit-rows", "3000")
		require.Equal(t, 1, r.code, "%s", r)
		require.Contains(t, r.stderr, "products: bad row at "+path+` line 5002: price "12.3x": not a decimal number`, "%s", r)
		require.Contains(t, r.stderr, "resume with: go -C examples run ./products", "%s", r)
		requireTable(t, db, 5000, 1)

		// Rerun with -max-rejects 5: resumes, rejects the line, accounts for every row.
		r = e.run(t, db.Schema, "-source", "csv:"+path, "-max-rejects", "5")
		require.Equal(t, 0, r.code, "%s", r)
		require.Contains(t, r.stdout, "resumed     after "+path+" line 5001", "%s", r)
		require.Contains(t, r.stdout, "rejects     1\n", "%s", r)
		requireTable(t, db, e2eRows, 1, 5001)
		var cursor, column, message string
		require.NoError(t, db.Pool.QueryRow(context.Background(), `SELECT cursor, column_name, message FROM `+db.Ident("reject")).
			Scan(&cursor, &column, &message))
		require.Equal(t, "5002", cursor)
		require.Equal(t, "price", column)
		require.Contains(t, message, `price "12.3x": not a decimal number`)
	})

	t.Run("TooManyRejects", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		path := writeCSV(t, t.TempDir(), e2eRows, map[int64]string{
			101: "SKU-0000100,Product 100 v1", 202: "SKU-0000201,Product 201 v1,1.00,x,2024-01-12T13:46:41Z",
			303: "SKU-0000302,Product 302 v1,1.00,1,yesterday"})
		r := e.run(t, db.Schema, "-source", "csv:"+path, "-max-rejects", "2")
		require.Equal(t, 1, r.code, "%s", r)
		require.Contains(t, r.stderr, "more than -max-rejects 2 rows rejected (the last at "+path+" line 303)", "%s", r)
	})

	t.Run("MalformedAPIPage", func(t *testing.T) {
		t.Parallel()
		db := pgtest.New(t)
		r := e.run(t, db.Schema, "-rows", "5000", "-page-delay", "0", "-api-malformed-page", "3", "-page-size", "100")
		require.Equal(t, 1, r.code, "%s", r)
		require.Regexp(t, `(?m)^products: api: page 3 \(GET http://127\.0\.0\.1:\d+/products\?page=3&size=100\): malformed page: .* \(after 5 attempts\)$`, r.stderr)
		// Pages 1 and 2 were loaded and committed.
		requireTable(t, db, 200, 1)
	})

	t.Run("UnreachableDatabase", func(t *testing.T) {
		t.Parallel()
		r := e.run(t, "unused", "-dsn", "postgres://etl:sekret@127.0.0.1:1/db?connect_timeout=5", "-rows", "10")
		require.Equal(t, 1, r.code, "%s", r)
		require.Regexp(t, `^products: cannot reach PostgreSQL at host=127\.0\.0\.1 port=1 user=etl database=db .*connection refused\n$`, r.stderr)
		require.NotContains(t, r.stderr, "sekret")
		require.Empty(t, r.stdout)
	})

	t.Run("BadFlags", func(t *testing.T) {
		t.Parallel()
		r := e.run(t, "unused", "-mode", "merge")
		require.Equal(t, 2, r.code, "%s", r)
		require.Contains(t, r.stderr, `products: -mode "merge": want upsert, insert or sync`)
	})
}

// TestInterrupt runs the job in-process and sends it SIGINT: it commits what it
// read, says how to resume, and exits 130.
func TestInterrupt(t *testing.T) {
	db := pgtest.New(t)
	sigs := make(chan os.Signal, 1)
	var stdout, stderr bytes.Buffer
	done := make(chan int, 1)
	job := "interrupt-" + db.Schema
	args := []string{"-dsn", db.BaseURL, "-schema", db.Schema, "-job", job, "-rows", "20000", "-page-size", "100",
		"-page-delay", "10ms", "-commit-rows", "500", "-progress", "off", "-api-faults", "0"}
	go func() { done <- run(args, &stdout, &stderr, sigs) }()
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
		if err == nil && cp.Rows > 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "no progress")
		time.Sleep(10 * time.Millisecond) // polling interval
	}
	sigs <- syscall.SIGINT
	var code int
	select {
	case code = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the job did not stop after SIGINT")
	}
	require.Equal(t, 130, code, "stdout:\n%s\nstderr:\n%s", &stdout, &stderr)
	require.Contains(t, stdout.String(), "products sync INTERRUPTED by SIGINT")
	require.Contains(t, stderr.String(), "resume with: go -C examples run ./products -dsn")
	cp, err := pgetl.ReadCheckpoint(ctx, db.Pool, db.Schema, job)
	require.NoError(t, err)
	require.False(t, cp.Finished)
	// Everything read was committed: the table holds rows 1..cursor.
	var n int64
	_, err = fmt.Sscan(cp.Cursor, &n)
	require.NoError(t, err)
	require.Contains(t, stdout.String(), fmt.Sprintf("rows read   %d\n", n))
	requireTable(t, db, n, 1)
}
