package pgetl

// Process crash and restart (issue 5): the job runs as a subprocess (this test binary
// re-executed with -test.run=^TestHelperJob$), is killed with SIGKILL after k batches
// have committed, and is run again: each run resumes after the checkpoint's cursor,
// takes over the dead run's claim (Takeover, short Lease), and the final table holds
// every source row exactly once.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// Environment of the helper job.
const (
	envHelperJob    = "PGETL_HELPER_JOB" // the job name; set only in the subprocess
	envHelperDSN    = "PGETL_HELPER_DSN"
	envHelperSchema = "PGETL_HELPER_SCHEMA"
	envHelperTable  = "PGETL_HELPER_TABLE"
	envHelperRows   = "PGETL_HELPER_ROWS"
	envHelperBad    = "PGETL_HELPER_BAD" // comma-separated source rows made bad
	envHelperCommit = "PGETL_HELPER_COMMIT_ROWS"
)

// TestHelperJob is not a test: it is the job that TestFaultProcessRestart runs as a
// subprocess. Without its environment it does nothing.
func TestHelperJob(t *testing.T) {
	job := os.Getenv(envHelperJob)
	if job == "" {
		return
	}
	ctx := context.Background()
	n, err := strconv.ParseInt(os.Getenv(envHelperRows), 10, 64)
	require.NoError(t, err)
	commitRows, err := strconv.Atoi(os.Getenv(envHelperCommit))
	require.NoError(t, err)
	bad := map[int64]bool{}
	for _, f := range strings.Split(os.Getenv(envHelperBad), ",") {
		if f != "" {
			i, err := strconv.ParseInt(f, 10, 64)
			require.NoError(t, err)
			bad[i] = true
		}
	}
	pool, err := NewPool(ctx, os.Getenv(envHelperDSN))
	require.NoError(t, err)
	defer pool.Close()
	s, err := NewSession(ctx, pool, SessionConfig{Job: job, CheckpointSchema: os.Getenv(envHelperSchema),
		Lease: 2 * time.Second, Takeover: true,
		Retry: RetryPolicy{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}})
	require.NoError(t, err)
	defer s.Close(ctx)
	cp, err := s.Checkpoint(ctx)
	require.NoError(t, err)
	from := int64(1)
	if cp.Cursor != "" {
		last, err := strconv.ParseInt(cp.Cursor, 10, 64)
		require.NoError(t, err)
		from = last + 1
	}
	fmt.Printf("helper: resume-after=%q seq=%d rows=%d\n", cp.Cursor, cp.Seq, cp.Rows)
	require.NoError(t, loadJob(ctx, s, BatchConfig{Table: os.Getenv(envHelperTable), Columns: itemCols,
		CommitRows: commitRows, Rejects: RejectToTable}, from, n, bad))
	require.NoError(t, s.Finish(ctx))
	require.NoError(t, s.Close(ctx))
	fmt.Printf("helper: finished\n")
}

// helperRun is one run of the helper job.
type helperRun struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{} // closed when the process has exited; err is then set
	err  error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func startHelper(t *testing.T, env []string) *helperRun {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperJob$", "-test.count=1", "-test.v", "-test.timeout=120s")
	cmd.Env = append(os.Environ(), env...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	r := &helperRun{cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		r.err = cmd.Wait()
		close(r.done)
	}()
	t.Cleanup(func() {
		select {
		case <-r.done:
		default:
			_ = cmd.Process.Kill()
			<-r.done
		}
	})
	return r
}

var resumeRE = regexp.MustCompile(`helper: resume-after="([^"]*)"`)

func (r *helperRun) resumedAfter(t *testing.T) string {
	t.Helper()
	m := resumeRE.FindStringSubmatch(r.out.String())
	require.NotNil(t, m, "helper output:\n%s", r.out.String())
	return m[1]
}

func TestFaultProcessRestart(t *testing.T) {
	t.Parallel()
	const n, commitRows = 50_000, 500
	bad := []int64{777, 20_001, 49_999}
	bd := setupItems(t)
	ctx := context.Background()
	job := "restart"
	var badStr []string
	for _, b := range bad {
		badStr = append(badStr, strconv.FormatInt(b, 10))
	}
	env := []string{envHelperJob + "=" + job, envHelperDSN + "=" + bd.db.URL, envHelperSchema + "=" + bd.db.Schema,
		envHelperTable + "=" + bd.table, envHelperRows + "=" + strconv.Itoa(n), envHelperBad + "=" + strings.Join(badStr, ","),
		envHelperCommit + "=" + strconv.Itoa(commitRows)}

	lastCursor := ""
	killAt := []int64{5, 30, 60} // batches committed (in total) before each SIGKILL
	for k, at := range killAt {
		run := startHelper(t, env)
		var cp Checkpoint
		reached := poll(t, 60*time.Second, func() bool {
			var err error
			cp, err = ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, job)
			return err == nil && cp.Seq >= at
		})
		require.True(t, reached, "run %d did not reach batch %d; output:\n%s", k+1, at, run.out.String())
		require.NoError(t, run.cmd.Process.Signal(syscall.SIGKILL))
		select {
		case <-run.done:
		case <-time.After(10 * time.Second):
			t.Fatal("the killed helper did not exit")
		}
		require.Equal(t, lastCursor, run.resumedAfter(t), "run %d resumed after the checkpoint's cursor", k+1)
		// The dead process's backend ends (it may still commit what it had sent).
		require.True(t, poll(t, 10*time.Second, func() bool {
			return bd.db.Int(t, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1", "pgetl "+job+"#%") == 0
		}))
		cp, err := ReadCheckpoint(ctx, bd.db.Pool, bd.db.Schema, job)
		require.NoError(t, err)
		require.False(t, cp.Finished, "killed before the end")
		require.NotEqual(t, strconv.Itoa(n), cp.Cursor, "killed before the end")
		requireConsistent(t, bd.db.Pool, bd.table, cp, bad)
		t.Logf("run %d killed at checkpoint seq %d cursor %s rows %d rejects %d", k+1, cp.Seq, cp.Cursor, cp.Rows, cp.Rejects)
		lastCursor = cp.Cursor
	}
	run := startHelper(t, env)
	select {
	case <-run.done:
		require.NoError(t, run.err, "final run:\n%s", run.out.String())
	case <-time.After(90 * time.Second):
		t.Fatalf("the final run did not finish:\n%s", run.out.String())
	}
	require.Equal(t, lastCursor, run.resumedAfter(t))
	require.Contains(t, run.out.String(), "helper: finished")

	bd.requireExactly(t, n, bad...)
	cp := requireCheckpoint(t, bd.db.Pool, bd.db.Schema, job, strconv.Itoa(n), n-int64(len(bad)), int64(len(bad)))
	require.True(t, cp.Finished)
	requireRejects(t, bd.db.Pool, bd.db.Schema, job, bad)
}

// requireConsistent checks that what is committed matches the checkpoint: every
// source row up to its cursor, except the bad ones, and nothing after it.
func requireConsistent(t *testing.T, pool *pgxpool.Pool, table string, cp Checkpoint, bad []int64) {
	t.Helper()
	last, err := strconv.ParseInt(cp.Cursor, 10, 64)
	require.NoError(t, err)
	var nbad int64
	for _, b := range bad {
		if b <= last {
			nbad++
		}
	}
	var cnt, maxID int64
	require.NoError(t, pool.QueryRow(context.Background(), "SELECT count(*), coalesce(max(id), 0) FROM "+table).Scan(&cnt, &maxID))
	require.Equal(t, last-nbad, cnt, "rows committed up to the checkpoint's cursor %d", last)
	require.LessOrEqual(t, maxID, last, "nothing committed past the checkpoint")
	require.Equal(t, last-nbad, cp.Rows)
	require.Equal(t, nbad, cp.Rejects)
}
