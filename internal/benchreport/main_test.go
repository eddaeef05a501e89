package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParse(t *testing.T) {
	f, err := os.Open(filepath.Join("testdata", "sample.txt"))
	require.NoError(t, err)
	defer f.Close()
	results, err := parse(f)
	require.NoError(t, err)

	var names []string
	for _, r := range results {
		names = append(names, r.name)
	}
	require.Equal(t, []string{
		"BenchmarkBaseline/copyfrom_one_tx",
		"BenchmarkBaseline/copyfrom_chunk-1000",
		"BenchmarkInsert/rows=1000",
		"BenchmarkCacheLookup/keys=1M",
		"BenchmarkRow",
	}, names)
	require.Equal(t, "github.com/pgetl/pgetl", results[0].pkg)
	require.Equal(t, "github.com/pgetl/pgetl/internal/workload", results[4].pkg)
	require.Equal(t, []float64{500000, 480000, 520000}, results[0].metrics["rows/s"])
	require.Equal(t, []float64{110, 100}, results[3].metrics["ns/op"])
	require.Equal(t, []string{"ns/op", "B/key", "B/op", "allocs/op"}, results[3].units)
}

func TestParseKeepsNamesWithoutProcsSuffix(t *testing.T) {
	// GOMAXPROCS=1: go test adds no suffix, so "-1000" is part of the name.
	in := "BenchmarkChunk/copyfrom_chunk-1000 \t 1\t 100 ns/op\t 5 rows/s\n" +
		"BenchmarkChunk/copyfrom_chunk-10000 \t 1\t 100 ns/op\t 6 rows/s\n" +
		"BenchmarkChunk/copyfrom_chunk-1000 \t 1\t 100 ns/op\t 7 rows/s\n"
	results, err := parse(strings.NewReader(in))
	require.NoError(t, err)
	require.Len(t, results, 2)
	require.Equal(t, "BenchmarkChunk/copyfrom_chunk-1000", results[0].name)
	require.Equal(t, "BenchmarkChunk/copyfrom_chunk-10000", results[1].name)
	require.Equal(t, []float64{5, 7}, results[0].metrics["rows/s"])

	// -cpu 2,4: the runs at each setting stay apart.
	in = "BenchmarkX-2 1 100 ns/op\nBenchmarkX-4 1 50 ns/op\n"
	results, err = parse(strings.NewReader(in))
	require.NoError(t, err)
	require.Len(t, results, 2)
}

func TestMedian(t *testing.T) {
	require.Equal(t, 2.0, median([]float64{3, 1, 2}))
	require.Equal(t, 2.5, median([]float64{4, 1, 3, 2}))
	require.Equal(t, 7.0, median([]float64{7}))
}

func TestReport(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(&out, []string{filepath.Join("testdata", "sample.txt")}, defaultRgx))
	got := out.String()
	t.Log("\n" + got)
	want := `baseline: pgetl.BenchmarkBaseline/copyfrom_one_tx (median 500,000 rows/s)

benchmark                                    runs   rows/s   ±  ratio  B/row  other
pgetl.BenchmarkBaseline/copyfrom_one_tx         3  500,000  4%   1.00    181
pgetl.BenchmarkBaseline/copyfrom_chunk-1000     3  250,000  4%   0.50    191
pgetl.BenchmarkInsert/rows=1000                 3  400,000  2%   0.80    201

benchmark                           runs  ns/op   ±  other
pgetl.BenchmarkCacheLookup/keys=1M     2    105  5%  48 B/key
workload.BenchmarkRow                  1    200  0%
`
	require.Equal(t, want, got)
}

func TestReportNoBaseline(t *testing.T) {
	var out bytes.Buffer
	in := filepath.Join(t.TempDir(), "b.out")
	require.NoError(t, os.WriteFile(in, []byte("BenchmarkX-4 1 10 ns/op 3 rows/s\n"), 0o644))
	require.NoError(t, run(&out, []string{in}, defaultRgx))
	require.Contains(t, out.String(), "ratios not shown")
	require.Contains(t, out.String(), "BenchmarkX ")

	require.ErrorContains(t, run(&out, []string{filepath.Join(t.TempDir(), "missing")}, defaultRgx), "missing")
	require.NoError(t, os.WriteFile(in, []byte("PASS\n"), 0o644))
	require.ErrorContains(t, run(&out, []string{in}, defaultRgx), "no benchmark results")
	require.ErrorContains(t, run(&out, []string{in}, "("), "-baseline")
}
