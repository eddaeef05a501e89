package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/pgetl/pgetl"
	pgetlotel "github.com/pgetl/pgetl/contrib/otel"
)

// metrics serves the job's metrics on /metrics (-metrics ADDR) while it runs: the
// session's and the SKU cache's, through contrib/otel and the OpenTelemetry
// Prometheus exporter, with the Go runtime's. A nil *metrics (no -metrics) does
// nothing.
type metrics struct {
	inst *pgetlotel.Instrumentation
	mp   *sdkmetric.MeterProvider
	srv  *http.Server
	url  string
	done chan struct{} // closed when Serve returns

	mu   sync.Mutex // guards regs
	regs []metric.Registration
}

// startMetrics listens on addr and serves /metrics until stop.
func startMetrics(addr string, log *slog.Logger) (*metrics, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, fmt.Errorf("-metrics: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("-metrics: %w", err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	m := &metrics{
		inst: pgetlotel.New(pgetlotel.WithMeterProvider(mp)),
		mp:   mp,
		srv:  &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		url:  "http://" + ln.Addr().String() + "/metrics",
		done: make(chan struct{}),
	}
	go func() {
		defer close(m.done)
		if err := m.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics server stopped", "err", err)
		}
	}()
	log.Info("serving metrics", "url", m.url)
	return m, nil
}

// sessionConfig returns sc with the batch hooks (spans, batch durations) installed.
func (m *metrics) sessionConfig(sc pgetl.SessionConfig) pgetl.SessionConfig {
	if m != nil {
		m.inst.Configure(&sc)
	}
	return sc
}

// observe reports s's counters until stop.
func (m *metrics) observe(s *pgetl.Session) {
	if m != nil {
		m.keep(m.inst.Observe(s))
	}
}

// observeCache reports the cache c as name until stop.
func (m *metrics) observeCache(name string, c pgetlotel.CacheStater) {
	if m != nil {
		m.keep(m.inst.ObserveCache(name, c))
	}
}

func (m *metrics) keep(reg metric.Registration, err error) {
	if err != nil {
		return // only a nil session or cache fails, and the job has neither
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.regs = append(m.regs, reg)
}

// stop ends the server (after the requests in progress, for up to 5 s) and the
// meter provider.
func (m *metrics) stop() {
	if m == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(ctx); err != nil {
		_ = m.srv.Close()
	}
	<-m.done
	m.mu.Lock()
	for _, r := range m.regs {
		_ = r.Unregister()
	}
	m.regs = nil
	m.mu.Unlock()
	_ = m.mp.Shutdown(ctx)
}
