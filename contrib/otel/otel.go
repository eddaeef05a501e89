package pgetlotel

import (
	"context"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgetl/pgetl"
)

// ScopeName is the instrumentation scope of the tracer and the meter.
const ScopeName = "github.com/pgetl/pgetl/contrib/otel"

// maxRetryEvents bounds the retry events kept for one batch (a RetryPolicy may allow
// many attempts); the span counts the ones left out in pgetl.batch.retry_events_dropped.
const maxRetryEvents = 32

// durationBuckets are the bucket boundaries of pgetl.batch.duration, in seconds: a
// batch takes milliseconds to seconds, and minutes while retries last.
var durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// Attribute keys.
const (
	keyJob              = attribute.Key("job")
	keyClass            = attribute.Key("class")
	keyCache            = attribute.Key("cache")
	keySpanJob          = attribute.Key("pgetl.job")
	keySeq              = attribute.Key("pgetl.batch.seq")
	keyRows             = attribute.Key("pgetl.batch.rows")
	keyRejects          = attribute.Key("pgetl.batch.rejects")
	keyBytes            = attribute.Key("pgetl.batch.bytes")
	keyCursor           = attribute.Key("pgetl.batch.cursor")
	keyAttempts         = attribute.Key("pgetl.batch.attempts")
	keyInDoubt          = attribute.Key("pgetl.batch.in_doubt")
	keyEventsDropped    = attribute.Key("pgetl.batch.retry_events_dropped")
	keyRetryAttempt     = attribute.Key("pgetl.retry.attempt")
	keyRetryClass       = attribute.Key("pgetl.retry.class")
	keyRetryBackoff     = attribute.Key("pgetl.retry.backoff")
	keyRetryError       = attribute.Key("pgetl.retry.error")
	keyInDoubtOutcome   = attribute.Key("pgetl.in_doubt.outcome")
	batchSpanName       = "pgetl.batch"
	retryEventName      = "pgetl.retry"
	inDoubtEventName    = "pgetl.in_doubt"
	inDoubtOutcomeValue = "committed"
)

// Option configures an [Instrumentation].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	tp    trace.TracerProvider
	mp    metric.MeterProvider
	attrs []attribute.KeyValue
}

// WithTracerProvider sets the tracer provider of the batch spans. Defaults to the
// global provider ([otel.GetTracerProvider]) at New.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return optionFunc(func(c *config) { c.tp = tp })
}

// WithMeterProvider sets the meter provider of the metrics. Defaults to the global
// provider ([otel.GetMeterProvider]) at New.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return optionFunc(func(c *config) { c.mp = mp })
}

// WithAttributes adds attrs to every span and every metric point (a deployment or
// tenant name, say). Defaults to none.
func WithAttributes(attrs ...attribute.KeyValue) Option {
	return optionFunc(func(c *config) { c.attrs = append(c.attrs, attrs...) })
}

// Instrumentation reports pgetl sessions and caches to a tracer and a meter. One
// Instrumentation serves any number of sessions; it is safe for concurrent use and
// starts no goroutine.
type Instrumentation struct {
	tracer trace.Tracer
	meter  metric.Meter
	attrs  []attribute.KeyValue

	duration       metric.Float64Histogram
	rows           metric.Int64ObservableCounter
	batches        metric.Int64ObservableCounter
	txs            metric.Int64ObservableCounter
	bytes          metric.Int64ObservableCounter
	rejects        metric.Int64ObservableCounter
	retries        metric.Int64ObservableCounter
	sinceCommit    metric.Float64ObservableGauge
	cacheHits      metric.Int64ObservableCounter
	cacheMisses    metric.Int64ObservableCounter
	cacheBytes     metric.Int64ObservableGauge
	cacheEntries   metric.Int64ObservableGauge
	sessionMetrics []metric.Observable
	cacheMetrics   []metric.Observable

	mu         sync.Mutex                    // guards the fields below
	pending    map[string]map[int64]*retries // job → batch seq → its retries so far
	lastCommit map[string]time.Time          // job → when its last batch committed
}

// retries are the retry events of one batch not yet committed.
type retries struct {
	events  []pgetl.RetryEvent
	at      []time.Time
	dropped int
}

// New returns an Instrumentation. An instrument the meter cannot create is reported
// to [otel.Handle] and replaced by a no-op one, as OpenTelemetry instrumentations do.
func New(opts ...Option) *Instrumentation {
	var c config
	for _, o := range opts {
		o.apply(&c)
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	inst := &Instrumentation{
		tracer:     c.tp.Tracer(ScopeName),
		meter:      c.mp.Meter(ScopeName),
		attrs:      c.attrs,
		pending:    map[string]map[int64]*retries{},
		lastCommit: map[string]time.Time{},
	}
	m, nm := inst.meter, noop.Meter{}
	var err error
	if inst.duration, err = m.Float64Histogram("pgetl.batch.duration", metric.WithUnit("s"),
		metric.WithDescription("Time from a batch's first attempt to its commit, retries included."),
		metric.WithExplicitBucketBoundaries(durationBuckets...)); err != nil {
		otel.Handle(err)
		inst.duration, _ = nm.Float64Histogram("pgetl.batch.duration")
	}
	counter := func(name, unit, desc string) metric.Int64ObservableCounter {
		i, err := m.Int64ObservableCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil {
			otel.Handle(err)
			i, _ = nm.Int64ObservableCounter(name)
		}
		return i
	}
	gauge := func(name, unit, desc string) metric.Int64ObservableGauge {
		i, err := m.Int64ObservableGauge(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil {
			otel.Handle(err)
			i, _ = nm.Int64ObservableGauge(name)
		}
		return i
	}
	inst.rows = counter("pgetl.rows.committed", "{row}", "Rows committed by the session.")
	inst.batches = counter("pgetl.batches.committed", "{batch}", "Batches committed by the session.")
	inst.txs = counter("pgetl.txs.committed", "{transaction}", "Session.Tx units committed by the session.")
	inst.bytes = counter("pgetl.bytes.committed", "By", "Encoded bytes of the rows committed by the session.")
	inst.rejects = counter("pgetl.rejects", "{row}", "Rows rejected by the session.")
	inst.retries = counter("pgetl.retries", "{retry}", "Retried attempts by failure class, in-doubt commits found committed and bisection probes, as in pgetl's Stat.Retries.")
	if inst.sinceCommit, err = m.Float64ObservableGauge("pgetl.since_last_commit", metric.WithUnit("s"),
		metric.WithDescription("Time since the session's last commit (of a batch or a Tx unit), or since it was first observed.")); err != nil {
		otel.Handle(err)
		inst.sinceCommit, _ = nm.Float64ObservableGauge("pgetl.since_last_commit")
	}
	inst.cacheHits = counter("pgetl.cache.hits", "{lookup}", "Lookups answered by the cache.")
	inst.cacheMisses = counter("pgetl.cache.misses", "{lookup}", "Lookups the cache could not answer.")
	inst.cacheBytes = gauge("pgetl.cache.bytes", "By", "Memory taken by the cache's entries.")
	inst.cacheEntries = gauge("pgetl.cache.entries", "{entry}", "Entries in the cache.")
	inst.sessionMetrics = []metric.Observable{inst.rows, inst.batches, inst.txs, inst.bytes, inst.rejects, inst.retries, inst.sinceCommit}
	inst.cacheMetrics = []metric.Observable{inst.cacheHits, inst.cacheMisses, inst.cacheBytes, inst.cacheEntries}
	return inst
}

// Configure installs the Instrumentation's hooks in cfg before it is passed to
// [pgetl.NewSession]: a span and a pgetl.batch.duration point per committed batch,
// and the retry events of its span. Hooks already in cfg.OnCommitFunc and
// cfg.OnRetryFunc are kept and called after the Instrumentation's. Configure a given
// config once: twice reports every batch twice.
func (inst *Instrumentation) Configure(cfg *pgetl.SessionConfig) {
	prevCommit, prevRetry := cfg.OnCommitFunc, cfg.OnRetryFunc
	cfg.OnRetryFunc = func(ev pgetl.RetryEvent) {
		inst.onRetry(ev)
		if prevRetry != nil {
			prevRetry(ev)
		}
	}
	cfg.OnCommitFunc = func(res pgetl.BatchResult) {
		inst.onCommit(res)
		if prevCommit != nil {
			prevCommit(res)
		}
	}
}

// onRetry keeps ev for the span of its batch.
func (inst *Instrumentation) onRetry(ev pgetl.RetryEvent) {
	now := time.Now()
	inst.mu.Lock()
	defer inst.mu.Unlock()
	bySeq := inst.pending[ev.Job]
	if bySeq == nil {
		bySeq = map[int64]*retries{}
		inst.pending[ev.Job] = bySeq
	}
	r := bySeq[ev.Seq]
	if r == nil {
		r = &retries{}
		bySeq[ev.Seq] = r
	}
	if len(r.events) >= maxRetryEvents {
		r.dropped++
		return
	}
	r.events = append(r.events, ev)
	r.at = append(r.at, now)
}

// takeRetries returns the retries kept for batch seq of job and forgets them, and
// those of its earlier units: batches commit in order, so an earlier unit's retries
// still kept are a Session.Tx unit's or a unit's that failed.
func (inst *Instrumentation) takeRetries(job string, seq int64, end time.Time) *retries {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	inst.lastCommit[job] = end
	bySeq := inst.pending[job]
	r := bySeq[seq]
	for s := range bySeq {
		if s <= seq {
			delete(bySeq, s)
		}
	}
	if len(bySeq) == 0 {
		delete(inst.pending, job)
	}
	return r
}

// onCommit records the span and the duration of a committed batch.
func (inst *Instrumentation) onCommit(res pgetl.BatchResult) {
	end := time.Now()
	r := inst.takeRetries(res.Job, res.Seq, end)
	inst.duration.Record(context.Background(), res.Duration.Seconds(),
		metric.WithAttributeSet(inst.attrSet(keyJob.String(res.Job))))

	attrs := append([]attribute.KeyValue{
		keySpanJob.String(res.Job),
		keySeq.Int64(res.Seq),
		keyRows.Int64(res.Rows),
		keyRejects.Int64(res.Rejects),
		keyBytes.Int64(res.Bytes),
		keyCursor.String(res.Cursor),
		keyAttempts.Int(res.Attempts),
		keyInDoubt.Bool(res.InDoubt),
	}, inst.attrs...)
	if r != nil && r.dropped > 0 {
		attrs = append(attrs, keyEventsDropped.Int(r.dropped))
	}
	_, span := inst.tracer.Start(context.Background(), batchSpanName,
		trace.WithTimestamp(end.Add(-res.Duration)),
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(attrs...))
	if r != nil {
		for i, ev := range r.events {
			eattrs := []attribute.KeyValue{
				keyRetryAttempt.Int(ev.Attempt),
				keyRetryClass.String(ev.Class),
				keyRetryBackoff.Float64(ev.Backoff.Seconds()),
			}
			if ev.Err != nil {
				eattrs = append(eattrs, keyRetryError.String(ev.Err.Error()))
			}
			span.AddEvent(retryEventName, trace.WithTimestamp(r.at[i]), trace.WithAttributes(eattrs...))
		}
	}
	if res.InDoubt {
		span.AddEvent(inDoubtEventName, trace.WithTimestamp(end),
			trace.WithAttributes(keyInDoubtOutcome.String(inDoubtOutcomeValue)))
	}
	span.End(trace.WithTimestamp(end))
}

// lastCommitOf returns when the hooks saw job's last batch commit.
func (inst *Instrumentation) lastCommitOf(job string) (time.Time, bool) {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	t, ok := inst.lastCommit[job]
	return t, ok
}

// attrSet returns kv with the Instrumentation's own attributes as a set.
func (inst *Instrumentation) attrSet(kv ...attribute.KeyValue) attribute.Set {
	return attribute.NewSet(slices.Concat(kv, inst.attrs)...)
}
