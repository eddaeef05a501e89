package pgetl

import (
	"context"
	"sync"
)

// pipeline commits a batch session's batches with up to InFlight of them in flight,
// each on its own pooled connection. Batch n+1 is sent while n commits: its fence
// (the checkpoint advance, first in its transaction) waits on the server until n's
// COMMIT, so batches commit in order and exactly once whatever the client sees
// first; results are recorded in order too. If a batch fails, the ones after it are
// canceled before it commits anything of its own (a RejectFail prefix), since their
// fences wait for it. With InFlight 1 the pipeline is not used.
type pipeline struct {
	s        *Session
	slots    chan struct{} // one per batch in flight
	lastDone chan struct{} // closed once the last batch submitted is recorded; the submitter's only
	mu       sync.Mutex    // guards units, changed and the units' holding and finished
	units    map[int64]*flightUnit
	changed  chan struct{} // closed and replaced when a unit's holding or finished changes
}

// flightUnit is a batch in flight.
type flightUnit struct {
	cancel   context.CancelFunc
	ran      chan struct{} // closed when its commit attempts are over (before it records)
	holding  bool          // holds a connection (see takeTurn)
	finished bool          // its attempts are over
}

func newPipeline(s *Session, inFlight int) *pipeline {
	p := &pipeline{s: s, slots: make(chan struct{}, inFlight), lastDone: make(chan struct{}), units: map[int64]*flightUnit{},
		changed: make(chan struct{})}
	close(p.lastDone)
	return p
}

// A batch in flight takes a connection (Session.acquire, through takeTurn) only
// while every batch before it that is still attempting holds one: a batch that
// took the pool's last connection ahead of an earlier one would wait at the fence
// for it, while it waits for a connection, until the fence gives up (5 s) and the
// batch is replayed. So a pool with fewer connections than batches in flight, or a
// batch that lost its connection and retries, costs no stall.
type flightTurn struct {
	p   *pipeline
	seq int64
	u   *flightUnit
}

type flightTurnKey struct{}

// takeTurn waits, if ctx is a batch's in flight, until every batch before it still
// attempting holds a connection, and returns the functions to call once this one
// took its own (took) and gave it back (gave).
func takeTurn(ctx context.Context) (took, gave func(), err error) {
	ft, _ := ctx.Value(flightTurnKey{}).(*flightTurn)
	if ft == nil {
		return func() {}, func() {}, nil
	}
	p := ft.p
	for {
		p.mu.Lock()
		blocked := false
		for q, u := range p.units {
			if q < ft.seq && !u.holding && !u.finished {
				blocked = true
				break
			}
		}
		changed := p.changed
		p.mu.Unlock()
		if !blocked {
			return func() { p.setHolding(ft.u, true) }, func() { p.setHolding(ft.u, false) }, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
	}
}

// setHolding records whether u holds a connection, and wakes the batches waiting
// for their turn.
func (p *pipeline) setHolding(u *flightUnit, holding bool) { p.change(func() { u.holding = holding }) }

// setFinished records that u's attempts are over, and wakes the batches waiting
// for their turn.
func (p *pipeline) setFinished(u *flightUnit) { p.change(func() { u.finished = true }) }

// change runs f under mu and wakes the batches waiting in takeTurn.
func (p *pipeline) change(f func()) {
	p.mu.Lock()
	f()
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

// serial reports whether batches commit one at a time.
func (p *pipeline) serial() bool { return cap(p.slots) == 1 }

// submit starts the next batch: it waits for a slot, checks ready and takes the
// batch's sequence under the session's commitMu, then runs work in a goroutine of
// its own. work returns how to record what committed (nil if nothing did), which
// runs once every batch before it is recorded; on an error fail runs too and the
// batches after it are aborted. The returned channel is closed once the batch is
// recorded. submit is called by one goroutine (the batch session's flusher).
func (p *pipeline) submit(ctx context.Context, ready func(context.Context) error,
	work func(ctx context.Context, seq int64) (record func(), err error), fail func(error)) <-chan struct{} {
	s := p.s
	done := make(chan struct{})
	prev := p.lastDone
	p.lastDone = done
	p.slots <- struct{}{}
	s.commitMu.Lock()
	if s.needsSync() {
		s.drain() // a failure left the checkpoint to re-read: let the others end first
	}
	err := ready(ctx)
	var seq int64
	if err == nil {
		seq = s.reserveSeq()
		s.flight.Add(1)
	}
	s.commitMu.Unlock()
	if err != nil {
		fail(err)
		go func() { <-prev; <-p.slots; close(done) }()
		return done
	}
	uctx, cancel := context.WithCancel(ctx)
	u := &flightUnit{cancel: cancel, ran: make(chan struct{})}
	uctx = context.WithValue(uctx, flightTurnKey{}, &flightTurn{p: p, seq: seq, u: u})
	p.mu.Lock()
	p.units[seq] = u
	p.mu.Unlock()
	go func() {
		defer close(done)
		defer func() { <-p.slots }()
		defer s.flight.Done()
		defer cancel()
		record, err := work(uctx, seq)
		p.setFinished(u)
		close(u.ran)
		<-prev
		p.mu.Lock()
		delete(p.units, seq)
		p.mu.Unlock()
		if record != nil {
			record() // committed: account for it, whatever happened to the others
		}
		if err != nil {
			fail(err)
			p.abortAfter(seq)
		}
	}()
	return done
}

// abortAfter cancels the batches in flight after seq and waits until their attempts
// are over: their fences wait for seq, which is not going to commit what they follow
// (it failed, or commits only the rows before a bad one), so none of them may commit.
// A canceled attempt's backend is ended by in-doubt resolution, which then reads the
// checkpoint after it.
func (p *pipeline) abortAfter(seq int64) {
	p.mu.Lock()
	var later []*flightUnit
	for q, u := range p.units {
		if q > seq {
			later = append(later, u)
		}
	}
	p.mu.Unlock()
	for _, u := range later {
		u.cancel()
	}
	for _, u := range later {
		<-u.ran
	}
}

// wait returns once every batch submitted is recorded. Only the submitter calls it.
func (p *pipeline) wait() { <-p.lastDone }
