package pgetlotel

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.opentelemetry.io/otel/metric"

	"github.com/pgetl/pgetl"
)

// Observe registers the metrics of s, read from [pgetl.Session.Stat] at each
// collection (see the package documentation), with the attribute job = s.Job().
// Observe a session once, after [pgetl.NewSession]; call the registration's
// Unregister when the session is closed. Its Stat still reads after Close, so the
// last values are collected until then.
//
// pgetl.since_last_commit is exact to the commit for the batches of a session
// configured with [Instrumentation.Configure]; a Session.Tx unit (or any commit of a
// session not configured) is noticed at the next collection, so it is counted from
// there.
func (inst *Instrumentation) Observe(s *pgetl.Session) (metric.Registration, error) {
	if s == nil {
		return nil, errors.New("pgetlotel: Observe: nil session")
	}
	job := s.Job()
	jobAttrs := inst.attrSet(keyJob.String(job))
	opt := metric.WithAttributeSet(jobAttrs)
	st := s.Stat()
	since := &sinceCommit{last: time.Now(), batches: st.Batches(), txs: st.Txs()}
	return inst.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := s.Stat()
		o.ObserveInt64(inst.rows, st.Rows(), opt)
		o.ObserveInt64(inst.batches, st.Batches(), opt)
		o.ObserveInt64(inst.txs, st.Txs(), opt)
		o.ObserveInt64(inst.bytes, st.Bytes(), opt)
		o.ObserveInt64(inst.rejects, st.Rejects(), opt)
		byClass := st.Retries()
		for _, class := range retryClasses {
			if _, ok := byClass[class]; !ok {
				byClass[class] = 0
			}
		}
		for class, n := range byClass {
			o.ObserveInt64(inst.retries, n, metric.WithAttributeSet(inst.attrSet(keyJob.String(job), keyClass.String(class))))
		}
		hooked, ok := inst.lastCommitOf(job)
		o.ObserveFloat64(inst.sinceCommit, since.observe(time.Now(), st, hooked, ok).Seconds(), opt)
		return nil
	}, inst.sessionMetrics...)
}

// retryClasses are the classes of pgetl.retries reported from the start, at 0 until
// they occur (Prometheus' advice for known label values: rate() and alerts then see
// the first one); the others ("sqlstate_XXXXX", "stale_key", …) appear when they do.
var retryClasses = []string{"connection", "server_shutdown", "idle_timeout", "serialization", "deadlock",
	"lock_timeout", "read_only", "too_many_connections", "in_doubt_committed", "bisect_probe"}

// sinceCommit tracks a session's last commit for pgetl.since_last_commit.
type sinceCommit struct {
	mu        sync.Mutex // guards the fields below
	last      time.Time  // the last commit known
	collected time.Time  // the previous collection
	batches   int64      // Stat.Batches at the previous collection
	txs       int64      // Stat.Txs at the previous collection
}

// observe returns the time from the last commit to now, given the session's Stat and
// the time the hooks saw its job's last batch commit (if ok).
func (c *sinceCommit) observe(now time.Time, st pgetl.Stat, hooked time.Time, ok bool) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.Batches() != c.batches || st.Txs() != c.txs {
		at := now // a commit since the previous collection: when is not known
		if st.Txs() == c.txs && ok && hooked.After(c.collected) {
			at = hooked // batches only, and the hooks saw them
		}
		c.last, c.batches, c.txs = at, st.Batches(), st.Txs()
	} else if ok && hooked.After(c.last) {
		c.last = hooked // a batch the hooks saw before its Stat did
	}
	c.collected = now
	return max(now.Sub(c.last), 0)
}

// CacheStater is what [Instrumentation.ObserveCache] reads: any [pgetl.Cache].
type CacheStater interface {
	Stat() pgetl.CacheStat
}

// ObserveCache registers the metrics of c (see the package documentation), read from
// its Stat at each collection, with the attribute cache = name. Call the
// registration's Unregister when the cache is no longer used.
func (inst *Instrumentation) ObserveCache(name string, c CacheStater) (metric.Registration, error) {
	if c == nil {
		return nil, errors.New("pgetlotel: ObserveCache: nil cache")
	}
	opt := metric.WithAttributeSet(inst.attrSet(keyCache.String(name)))
	return inst.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := c.Stat()
		o.ObserveInt64(inst.cacheHits, st.Hits(), opt)
		o.ObserveInt64(inst.cacheMisses, st.Misses(), opt)
		o.ObserveInt64(inst.cacheBytes, st.Bytes(), opt)
		o.ObserveInt64(inst.cacheEntries, st.Len(), opt)
		return nil
	}, inst.cacheMetrics...)
}
