package faultsuite_test

// The ordering check of the tests with several batches in flight (issue 17): a
// monitor samples, from a connection of its own while the job runs, the job's
// checkpoint row, its reject rows and the target table in one statement (one
// snapshot), and checks at every sample that the checkpoint only moves forward and
// matches what is committed: the rows of source rows 1..cursor, each once, minus
// the bad ones, which are exactly the rejects. A commit callback checks the same
// order from the client's side: every batch is the one after the last, its cursor
// beyond the last's.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgetl/pgetl"
	"github.com/stretchr/testify/require"
)

// committed is what a sample saw: the checkpoint row, its job's reject rows, and
// the target table's committed rows (count, sum and max of their source row
// numbers, as the monitor's rowsSQL computes them).
type committed struct {
	seq, cursor, rows, rejects int64
	rejectRows                 int64
	cnt, sum, max              int64
}

// cpMonitor samples a job's checkpoint and target table until stopped.
type cpMonitor struct {
	connString, query, job string
	bad                    []int64 // the source rows that must be rejected, sorted

	stopCh chan struct{}
	done   chan struct{}

	mu         sync.Mutex // guards the fields below
	last       committed
	samples    int
	seqs       map[int64]bool // distinct seqs seen
	violations []string
	connErrs   int
}

// startMonitor starts sampling job's checkpoint (in schema) and its target rows
// every 5 ms over a connection of its own to connString (reconnecting after a
// fault). rowsSQL returns count(*), sum and max of the source row numbers of the
// rows the job has committed (e.g. "SELECT count(*), coalesce(sum(id), 0)::bigint,
// coalesce(max(id), 0) FROM items"); bad are the source rows the job rejects. The
// monitor stops in t.Cleanup at the latest.
func startMonitor(t *testing.T, connString, schema, job, rowsSQL string, bad []int64) *cpMonitor {
	t.Helper()
	sch := pgx.Identifier{schema}.Sanitize()
	m := &cpMonitor{connString: connString, job: job, bad: bad,
		query: `SELECT c.seq, coalesce(c.cursor, '0'), c.rows, c.rejects,
			(SELECT count(*) FROM ` + sch + `.reject r WHERE r.job = c.job), t.*
		FROM ` + sch + `.checkpoint c, (` + rowsSQL + `) t WHERE c.job = $1`,
		stopCh: make(chan struct{}), done: make(chan struct{}), seqs: map[int64]bool{}}
	go m.run()
	t.Cleanup(m.stop)
	return m
}

func (m *cpMonitor) run() {
	defer close(m.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-m.stopCh:
			cancel()
		case <-m.done:
		}
	}()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			_ = conn.Close(context.Background())
		}
	}()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-m.stopCh:
			return
		case <-tick.C:
		}
		if conn == nil || conn.IsClosed() {
			c, err := pgx.Connect(ctx, m.connString)
			if err != nil {
				m.connErr()
				continue
			}
			conn = c
		}
		if err := m.sample(ctx, conn); err != nil {
			if ctx.Err() != nil {
				return
			}
			m.connErr()
			_ = conn.Close(context.Background())
			conn = nil
		}
	}
}

// sample takes and checks one sample on conn.
func (m *cpMonitor) sample(ctx context.Context, conn *pgx.Conn) error {
	var s committed
	var cursor string
	err := conn.QueryRow(ctx, m.query, m.job).Scan(&s.seq, &cursor, &s.rows, &s.rejects, &s.rejectRows, &s.cnt, &s.sum, &s.max)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil // not claimed yet
	}
	if err != nil {
		return err
	}
	c, err := strconv.ParseInt(cursor, 10, 64)
	if err != nil {
		m.violate(fmt.Sprintf("cursor %q is not a row number", cursor))
		return nil
	}
	s.cursor = c
	m.check(s)
	return nil
}

func (m *cpMonitor) connErr() {
	m.mu.Lock()
	m.connErrs++
	m.mu.Unlock()
}

func (m *cpMonitor) violate(v string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.violations) < 5 {
		m.violations = append(m.violations, v)
	}
}

// check checks a sample against the previous one and against the source.
func (m *cpMonitor) check(s committed) {
	m.mu.Lock()
	prev := m.last
	m.last = s
	m.samples++
	m.seqs[s.seq] = true
	m.mu.Unlock()
	switch {
	case s.seq < prev.seq:
		m.violate(fmt.Sprintf("seq went back from %d to %d", prev.seq, s.seq))
	case s.cursor < prev.cursor:
		m.violate(fmt.Sprintf("cursor went back from %d to %d (seq %d → %d)", prev.cursor, s.cursor, prev.seq, s.seq))
	case s.seq == prev.seq && s.cursor != prev.cursor:
		m.violate(fmt.Sprintf("cursor moved from %d to %d at the same seq %d", prev.cursor, s.cursor, s.seq))
	}
	// Source rows 1..cursor are committed, each once, except the bad ones.
	c := s.cursor
	var badN, badSum, good int64
	good = c
	for _, b := range m.bad {
		if b > c {
			break
		}
		badN++
		badSum += b
	}
	for good > 0 && m.isBad(good) {
		good--
	}
	want := committed{seq: s.seq, cursor: c, rows: c - badN, rejects: badN, rejectRows: badN,
		cnt: c - badN, sum: c*(c+1)/2 - badSum, max: good}
	if s != want {
		m.violate(fmt.Sprintf("checkpoint and committed rows disagree at seq %d cursor %d: got %+v, want %+v", s.seq, c, s, want))
	}
}

func (m *cpMonitor) isBad(i int64) bool {
	for _, b := range m.bad {
		if b == i {
			return true
		}
	}
	return false
}

// waitSample waits until the monitor has taken a sample (of a claimed job), so that
// a test can be sure it samples while the job runs.
func (m *cpMonitor) waitSample(t *testing.T) {
	t.Helper()
	require.True(t, poll(t, 30*time.Second, func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.samples > 0
	}), "the checkpoint monitor took no sample")
}

// stop stops sampling and waits for the monitor's goroutine. Idempotent.
func (m *cpMonitor) stop() {
	select {
	case <-m.stopCh:
	default:
		close(m.stopCh)
	}
	<-m.done
}

// require stops the monitor and fails the test if a sample broke the order or
// disagreed with the committed rows, or if it saw fewer than minSeqs checkpoints
// (it must have sampled while the job ran). It returns the last sample.
func (m *cpMonitor) require(t *testing.T, minSeqs int) committed {
	t.Helper()
	m.stop()
	// One last sample, after the job: the final checkpoint.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, m.connString)
	require.NoError(t, err)
	defer conn.Close(ctx)
	require.NoError(t, m.sample(ctx, conn))
	m.mu.Lock()
	defer m.mu.Unlock()
	t.Logf("checkpoint monitor: %d samples, %d distinct checkpoints, %d connection errors, last %+v", m.samples, len(m.seqs), m.connErrs, m.last)
	require.Empty(t, m.violations, "checkpoint order or consistency broken")
	require.GreaterOrEqual(t, len(m.seqs), minSeqs, "the monitor saw too few checkpoints to judge the order")
	return m.last
}

// commitOrder checks, in BatchConfig.OnCommitFunc, that batches are reported
// committed in order: each after the last (with contiguous, the one right after
// it: a job whose session also runs Session.Tx units, which take sequences of
// their own, is not contiguous), its cursor beyond the last's.
type commitOrder struct {
	contiguous bool

	mu         sync.Mutex // guards the fields below
	seq, last  int64
	n          int
	violations []string
}

// onCommit is the BatchConfig.OnCommitFunc.
func (o *commitOrder) onCommit(r pgetl.BatchResult) {
	o.mu.Lock()
	defer o.mu.Unlock()
	c, err := strconv.ParseInt(r.Cursor, 10, 64)
	o.n++
	switch {
	case err != nil:
		o.violations = append(o.violations, fmt.Sprintf("batch %d: cursor %q", r.Seq, r.Cursor))
	case r.Seq <= o.seq || o.contiguous && o.seq != 0 && r.Seq != o.seq+1:
		o.violations = append(o.violations, fmt.Sprintf("batch %d committed after %d", r.Seq, o.seq))
	case c <= o.last:
		o.violations = append(o.violations, fmt.Sprintf("batch %d: cursor %d after %d", r.Seq, c, o.last))
	}
	o.seq, o.last = r.Seq, c
}

func (o *commitOrder) require(t *testing.T, lastSeq int64) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	require.Empty(t, o.violations, "batches reported committed out of order")
	require.Equal(t, lastSeq, o.seq, "the last batch reported committed is the checkpoint's")
}
