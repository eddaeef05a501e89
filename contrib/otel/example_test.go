package pgetlotel_test

import (
	"context"
	"log"
	"net/http"
	"os"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/pgetl/pgetl"
	pgetlotel "github.com/pgetl/pgetl/contrib/otel"
)

// Example is the README's setup: batch spans to a tracer provider, metrics to
// Prometheus through the OpenTelemetry exporter.
func Example() {
	ctx := context.Background()
	tp := sdktrace.NewTracerProvider() // with your exporter: sdktrace.WithBatcher(…)
	defer tp.Shutdown(ctx)
	exp, err := otelprom.New() // registers with prometheus.DefaultRegisterer
	if err != nil {
		log.Fatal(err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	defer mp.Shutdown(ctx)
	go http.ListenAndServe("127.0.0.1:9464", promhttp.Handler()) //nolint:errcheck // example

	inst := pgetlotel.New(pgetlotel.WithTracerProvider(tp), pgetlotel.WithMeterProvider(mp))

	pool, err := pgetl.NewPool(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	cfg := pgetl.SessionConfig{Job: "events"}
	inst.Configure(&cfg) // a span and a duration point per batch
	s, err := pgetl.NewSession(ctx, pool, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close(ctx)
	reg, err := inst.Observe(s) // rows, batches, retries… read from s.Stat()
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Unregister()
	// … load the job's batches through s …
}
