package pgetl

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// The tests in this file are not parallel: each checks with goleak that the rounds
// leave no goroutine behind, which other tests running at the same time would blur.

// requireRange checks that the rows of ids base+1..base+n are in the table, each
// once, and nothing else of the range.
func (bd *bundle) requireRange(t *testing.T, base, n int64) {
	t.Helper()
	var cnt, sum, distinct int64
	require.NoError(t, bd.pool.QueryRow(context.Background(), `SELECT count(*), coalesce(sum(id - $1), 0)::bigint, count(DISTINCT id)
		FROM `+bd.table+` WHERE id > $1 AND id <= $1 + 1000000`, base).Scan(&cnt, &sum, &distinct))
	require.Equal(t, n, cnt, "rows of the round")
	require.Equal(t, n, distinct, "distinct rows of the round")
	require.Equal(t, n*(n+1)/2, sum, "sum of the round's ids")
}

// requireStopped checks that the flusher of b has returned.
func requireStopped(t *testing.T, b *BatchSession) {
	t.Helper()
	select {
	case <-b.flusher.Done():
	default:
		t.Fatal("the batch session's flusher still runs after Close returned")
	}
}

// closeRound is one round of a race against Session.Close: a session, a batch
// session on it, and the ids of the round (base+1, base+2, …).
type closeRound struct {
	s    *Session
	b    *BatchSession
	job  string
	base int64
}

func (bd *bundle) closeRound(t *testing.T, name string, round int, cfg BatchConfig) closeRound {
	t.Helper()
	ctx := context.Background()
	job := fmt.Sprintf("%s-%d", name, round)
	s := bd.session(t, job)
	cfg.Table, cfg.Columns = bd.table, itemCols
	b, err := s.Batch(ctx, cfg)
	require.NoError(t, err)
	return closeRound{s: s, b: b, job: job, base: int64(round) * 1_000_000}
}

// requireCommitted checks the round's outcome: every row Add accepted (base+1 up to
// base+accepted) committed exactly once, and the checkpoint at the last of them.
func (bd *bundle) requireCommitted(t *testing.T, r closeRound, accepted int64) {
	t.Helper()
	bd.requireRange(t, r.base, accepted)
	cp, err := ReadCheckpoint(context.Background(), bd.pool, bd.db.Schema, r.job)
	require.NoError(t, err)
	want := ""
	if accepted > 0 {
		want = strconv.FormatInt(r.base+accepted, 10)
	}
	require.Equal(t, want, cp.Cursor, "checkpoint cursor")
	require.Equal(t, accepted, cp.Rows, "checkpoint rows")
}

// TestBatchCloseRacesAdd: Session.Close while another goroutine adds rows (and so
// hands full batches to the flusher). Before the fix this panicked with "send on
// closed channel" in most rounds. Now Add returns ErrClosed once Close has begun,
// every row it accepted before is committed by Close, and nothing leaks.
func TestBatchCloseRacesAdd(t *testing.T) {
	bd := setupItems(t)
	ctx := context.Background()
	leaks := goleak.IgnoreCurrent()
	for round := range 40 {
		r := bd.closeRound(t, "close-add", round, BatchConfig{CommitRows: 20 + rand.IntN(60), CommitInterval: time.Duration(rand.IntN(3)) * time.Millisecond})
		before := int64(1 + rand.IntN(300)) // rows added before Close starts
		started := make(chan struct{})
		done := make(chan struct{})
		var accepted int64
		var addErr error
		go func() {
			defer close(done)
			for i := int64(1); ; i++ {
				if i == before+1 {
					close(started)
				}
				if err := r.b.Add(ctx, strconv.FormatInt(r.base+i, 10), itemRow(r.base+i)...); err != nil {
					addErr = err
					if i <= before {
						close(started)
					}
					return
				}
				accepted = i
			}
		}()
		<-started
		closeErr := r.s.Close(ctx)
		<-done
		require.NoError(t, closeErr, "round %d", round)
		require.ErrorIs(t, addErr, ErrClosed, "round %d", round)
		requireStopped(t, r.b)
		require.ErrorIs(t, r.b.Flush(ctx), ErrClosed)
		require.NoError(t, r.b.Close(ctx), "BatchSession.Close after Session.Close returns the batch session's result")
		bd.requireCommitted(t, r, accepted)
	}
	goleak.VerifyNone(t, leaks)
}

// TestBatchCloseRacesFlush: Session.Close while another goroutine adds a row and
// flushes, again and again. Flush returns its own result or ErrClosed.
func TestBatchCloseRacesFlush(t *testing.T) {
	bd := setupItems(t)
	ctx := context.Background()
	leaks := goleak.IgnoreCurrent()
	for round := range 30 {
		r := bd.closeRound(t, "close-flush", round, BatchConfig{CommitRows: 1000})
		before := int64(1 + rand.IntN(5))
		started := make(chan struct{})
		done := make(chan struct{})
		var accepted int64
		var lastErr error
		go func() {
			defer close(done)
			defer func() {
				select {
				case <-started:
				default:
					close(started)
				}
			}()
			for i := int64(1); ; i++ {
				if i == before+1 {
					close(started)
				}
				if lastErr = r.b.Add(ctx, strconv.FormatInt(r.base+i, 10), itemRow(r.base+i)...); lastErr != nil {
					return
				}
				accepted = i
				if lastErr = r.b.Flush(ctx); lastErr != nil {
					return
				}
			}
		}()
		<-started
		closeErr := r.s.Close(ctx)
		<-done
		require.NoError(t, closeErr, "round %d", round)
		require.ErrorIs(t, lastErr, ErrClosed, "round %d", round)
		requireStopped(t, r.b)
		bd.requireCommitted(t, r, accepted)
	}
	goleak.VerifyNone(t, leaks)
}

// TestBatchCloseRacesBatch: Session.Close while another goroutine starts a batch
// session. Before the fix the batch session was registered (and so closed by
// Session.Close) before its batch and flusher existed. Now Batch either returns
// ErrClosed or a batch session that Session.Close closed.
func TestBatchCloseRacesBatch(t *testing.T) {
	bd := setupItems(t)
	ctx := context.Background()
	leaks := goleak.IgnoreCurrent()
	// Time Batch, to aim Close at its end, where it registers the batch session.
	s := bd.session(t, "close-batch-timing")
	var took time.Duration
	for range 5 {
		t0 := time.Now()
		b, err := s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols})
		took += time.Since(t0)
		require.NoError(t, err)
		require.NoError(t, b.Close(ctx))
	}
	require.NoError(t, s.Close(ctx))
	took /= 5
	var refused, closed int
	for round := range 200 {
		s := bd.session(t, fmt.Sprintf("close-batch-%d", round))
		var b *BatchSession
		var batchErr error
		done := make(chan struct{})
		go func() {
			defer close(done)
			b, batchErr = s.Batch(ctx, BatchConfig{Table: bd.table, Columns: itemCols, CommitRows: 10})
		}()
		// Somewhere around the end of Batch, most rounds a little before.
		time.Sleep(time.Duration(rand.Int64N(int64(took) * 3 / 2)))
		closeErr := s.Close(ctx)
		<-done
		require.NoError(t, closeErr, "round %d", round)
		if batchErr != nil {
			require.ErrorIs(t, batchErr, ErrClosed, "round %d", round)
			refused++
			continue
		}
		closed++
		requireStopped(t, b)
		require.ErrorIs(t, b.Add(ctx, "1", itemRow(1)...), ErrClosed)
		require.NoError(t, b.Close(ctx))
	}
	t.Logf("Batch refused with ErrClosed %d times, returned a batch session that Close closed %d times", refused, closed)
	goleak.VerifyNone(t, leaks)
}

// TestBatchCloseRacesBatchClose: Session.Close and BatchSession.Close at once, with
// rows buffered: one of them commits the rows, both return the same result.
func TestBatchCloseRacesBatchClose(t *testing.T) {
	bd := setupItems(t)
	ctx := context.Background()
	leaks := goleak.IgnoreCurrent()
	for round := range 30 {
		r := bd.closeRound(t, "close-close", round, BatchConfig{CommitRows: 100})
		n := int64(1 + rand.IntN(250))
		for i := int64(1); i <= n; i++ {
			require.NoError(t, r.b.Add(ctx, strconv.FormatInt(r.base+i, 10), itemRow(r.base+i)...))
		}
		var wg sync.WaitGroup
		var bErr, sErr error
		wg.Add(2)
		go func() { defer wg.Done(); bErr = r.b.Close(ctx) }()
		go func() { defer wg.Done(); sErr = r.s.Close(ctx) }()
		wg.Wait()
		require.NoError(t, bErr)
		require.NoError(t, sErr)
		requireStopped(t, r.b)
		bd.requireCommitted(t, r, n)
	}
	goleak.VerifyNone(t, leaks)
}

// TestBatchCloseCanceled: Session.Close with a canceled context while a batch is
// buffered abandons it cleanly: the rows are not committed (the checkpoint stays
// before them), Add returns ErrClosed, and the flusher is gone.
func TestBatchCloseCanceled(t *testing.T) {
	bd := setupItems(t)
	ctx := context.Background()
	leaks := goleak.IgnoreCurrent()
	r := bd.closeRound(t, "close-canceled", 0, BatchConfig{CommitRows: 100})
	require.NoError(t, load(ctx, r.b, 1, 150)) // one batch committed in the background, 50 rows buffered
	require.NoError(t, r.b.Flush(ctx))
	require.NoError(t, load(ctx, r.b, 151, 170))
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	err := r.s.Close(canceled)
	require.ErrorIs(t, err, context.Canceled)
	requireStopped(t, r.b)
	require.ErrorIs(t, r.b.Add(ctx, "171", itemRow(171)...), ErrClosed)
	bd.requireCommitted(t, r, 150)
	require.True(t, errors.Is(r.b.Close(ctx), context.Canceled), "BatchSession.Close returns the result of the Close that ran")
	goleak.VerifyNone(t, leaks)
}
