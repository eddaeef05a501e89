package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// syncBuffer is a bytes.Buffer safe for the job's writer and the test's reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestMetrics runs the job in-process with -metrics on a free port and scrapes
// /metrics while it runs: the pgetl series are there, labelled with the job, and
// the server is gone once the job has returned.
func TestMetrics(t *testing.T) {
	db := pgtest.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	url := "http://" + addr + "/metrics"

	job := "metrics-" + db.Schema
	args := []string{"-dsn", db.BaseURL, "-schema", db.Schema, "-job", job, "-rows", "6000", "-page-size", "100",
		"-page-delay", "20ms", "-commit-rows", "500", "-progress", "off", "-api-faults", "0", "-metrics", addr}
	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(args, &stdout, &stderr, make(chan os.Signal)) }()

	// Scrape until two batches are counted, while the job runs.
	var body string
	deadline := time.Now().Add(30 * time.Second)
	batches := regexp.MustCompile(`(?m)^pgetl_batches_committed_total\{[^}]*job="` + regexp.QuoteMeta(job) + `"[^}]*\} ([0-9]+)$`)
	for {
		body = scrape(t, url)
		if m := batches.FindStringSubmatch(body); m != nil && m[1] != "0" && m[1] != "1" {
			break
		}
		select {
		case code := <-done:
			t.Fatalf("the job ended (exit %d) before /metrics showed two batches:\n%s\nstderr:\n%s", code, body, stderr.String())
		default:
		}
		require.True(t, time.Now().Before(deadline), "no batches in /metrics:\n%s\nstderr:\n%s", body, stderr.String())
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	jobLabel := `job="` + job + `"`
	for _, series := range []string{
		"pgetl_rows_committed_total{", "pgetl_batches_committed_total{", `pgetl_retries_total{class="connection",`,
		"pgetl_batch_duration_seconds_bucket{", "pgetl_batch_duration_seconds_count{", "pgetl_since_last_commit_seconds{",
	} {
		require.True(t, hasSeries(body, series, jobLabel), "no %s…%s…} series in:\n%s", series, jobLabel, body)
	}
	require.Contains(t, body, "# TYPE pgetl_batch_duration_seconds histogram")
	require.Contains(t, body, "# TYPE pgetl_retries_total counter")
	require.True(t, hasSeries(body, "pgetl_cache_hits_total{", `cache="sku"`), "no SKU cache series in:\n%s", body)
	t.Logf("/metrics while the job ran (pgetl series, no buckets):\n%s", pgetlLines(body))

	select {
	case code := <-done:
		require.Equal(t, 0, code, "stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	case <-time.After(60 * time.Second):
		t.Fatal("the job did not end")
	}
	require.Contains(t, stderr.String(), "serving metrics")
	_, err = http.Get(url)
	require.Error(t, err, "the metrics server outlived the job")
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "" // not listening yet
	}
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

// hasSeries reports whether body has a line starting with prefix that contains label.
func hasSeries(body, prefix, label string) bool {
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, prefix) && strings.Contains(line, label) {
			return true
		}
	}
	return false
}

func pgetlLines(body string) string {
	var out []string
	for _, line := range strings.Split(body, "\n") {
		if strings.Contains(line, "pgetl_") && !strings.Contains(line, "_bucket{") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
