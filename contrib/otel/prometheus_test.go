package pgetlotel_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	pgetlotel "github.com/pgetl/pgetl/contrib/otel"
)

// TestPrometheus runs the test job with the OpenTelemetry Prometheus exporter and
// checks the names, types, labels and values it writes.
func TestPrometheus(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	require.NoError(t, err)
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	t.Cleanup(func() { require.NoError(t, mp.Shutdown(ctx)) })
	inst := pgetlotel.New(pgetlotel.WithMeterProvider(mp))

	var families []*dto.MetricFamily
	var text string
	r := runJob(t, inst, func(*jobRun) {
		var err error
		families, err = reg.Gather()
		require.NoError(t, err)
		srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		defer srv.Close()
		resp, err := http.Get(srv.URL)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		text = string(b)
	})
	st := r.stat
	byName := map[string]*dto.MetricFamily{}
	for _, f := range families {
		byName[f.GetName()] = f
	}
	// point returns the value of family name's series with the labels job and
	// extra (name=value pairs).
	point := func(name string, typ dto.MetricType, extra ...string) *dto.Metric {
		t.Helper()
		f := byName[name]
		require.NotNil(t, f, "%s not exported; got:\n%s", name, text)
		require.Equal(t, typ, f.GetType(), name)
		want := map[string]string{"job": r.job}
		for i := 0; i+1 < len(extra); i += 2 {
			want[extra[i]] = extra[i+1]
		}
		for _, m := range f.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			match := true
			for k, v := range want {
				match = match && got[k] == v
			}
			if match {
				return m
			}
		}
		t.Fatalf("%s: no series with %v:\n%s", name, want, text)
		return nil
	}
	counter := func(name string, extra ...string) int64 {
		t.Helper()
		return int64(point(name, dto.MetricType_COUNTER, extra...).GetCounter().GetValue())
	}
	require.Equal(t, st.Rows(), counter("pgetl_rows_committed_total"))
	require.Equal(t, st.Batches(), counter("pgetl_batches_committed_total"))
	require.Equal(t, st.Txs(), counter("pgetl_txs_committed_total"))
	require.Equal(t, st.Bytes(), counter("pgetl_bytes_committed_total"))
	require.Equal(t, st.Rejects(), counter("pgetl_rejects_total"))
	for class, n := range st.Retries() {
		require.Equal(t, n, counter("pgetl_retries_total", "class", class), "class %s", class)
	}
	h := point("pgetl_batch_duration_seconds", dto.MetricType_HISTOGRAM).GetHistogram()
	require.Equal(t, uint64(st.Batches()), h.GetSampleCount())
	require.NotEmpty(t, h.GetBucket())
	require.GreaterOrEqual(t, point("pgetl_since_last_commit_seconds", dto.MetricType_GAUGE).GetGauge().GetValue(), 0.0)

	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "pgetl_") && !strings.Contains(line, "_bucket{") {
			t.Log(line)
		}
	}
}
