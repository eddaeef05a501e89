package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/workload"
)

// TestCSVSource: the CSV source reads what psql's \copy … TO (FORMAT csv, HEADER)
// writes: PostgreSQL's timestamptz output (with or without fractional seconds, any
// offset) as well as RFC 3339, and quoted fields with commas, quotes and line
// breaks; a record's cursor is the line it ends on, so a resumed run skips exactly
// the records before.
func TestCSVSource(t *testing.T) {
	file := workload.CSVHeader + "\n" + // line 1
		"SKU-1,Plain,1.50,3,2024-01-12T13:46:41Z\n" + // 2
		"SKU-2,\"Two\nlines, and a \"\"quote\"\"\",2.00,4,2024-01-12 13:46:41+00\n" + // 3-4
		"SKU-3,Fraction,3.00,5,2024-01-12 13:46:41.123456+05:30\r\n" + // 5
		"SKU-4,\"Three\r\nline\r\nname\",4.00,6,2024-01-12 13:46:41.5-03\n" + // 6-8
		"SKU-5,Bad time,5.00,7,12/01/2024\n" + // 9
		"SKU-6,Last,6.00,8,2024-01-12T13:46:41.25+05:30" // 10
	path := filepath.Join(t.TempDir(), "products.csv")
	require.NoError(t, os.WriteFile(path, []byte(file), 0o600))
	ist := time.FixedZone("", 5*3600+30*60)
	type want struct {
		pos  int64
		name string
		at   time.Time // zero: refused
	}
	all := []want{
		{2, "Plain", time.Date(2024, 1, 12, 13, 46, 41, 0, time.UTC)},
		{4, "Two\nlines, and a \"quote\"", time.Date(2024, 1, 12, 13, 46, 41, 0, time.UTC)},
		{5, "Fraction", time.Date(2024, 1, 12, 13, 46, 41, 123456000, ist)},
		{8, "Three\nline\nname", time.Date(2024, 1, 12, 13, 46, 41, 5e8, time.FixedZone("", -3*3600))},
		{9, "Bad time", time.Time{}},
		{10, "Last", time.Date(2024, 1, 12, 13, 46, 41, 250e6, ist)},
	}
	read := func(after int64) []row {
		s, err := openCSV(path, after)
		require.NoError(t, err)
		defer s.Close()
		rows, last := s.Total()
		require.Equal(t, int64(6), rows)
		require.Equal(t, int64(10), last, "the last record's cursor")
		var out []row
		for {
			r, err := s.Next(context.Background())
			if errors.Is(err, io.EOF) {
				return out
			}
			require.NoError(t, err)
			out = append(out, r)
		}
	}
	got := read(0)
	require.Len(t, got, len(all))
	for i, w := range all {
		r := got[i]
		require.Equal(t, w.pos, r.pos, "record %d", i+1)
		require.Equal(t, w.name, r.values[1], "record %d", i+1)
		if w.at.IsZero() {
			bv, ok := r.values[4].(badValue)
			require.True(t, ok, "record %d: %#v", i+1, r.values[4])
			require.Equal(t, "12/01/2024", bv.err.Raw)
			require.Contains(t, bv.err.Reason, "PostgreSQL timestamp")
			continue
		}
		at, ok := r.values[4].(time.Time)
		require.True(t, ok, "record %d: %#v", i+1, r.values[4])
		require.True(t, w.at.Equal(at), "record %d: %v, want %v", i+1, at, w.at)
	}
	// Resumed after record 2 (which ends on line 4): records 3.. only.
	resumed := read(4)
	require.Len(t, resumed, 4)
	require.Equal(t, int64(5), resumed[0].pos)
}

// TestCSVSourceStrayQuote: a record with a stray quote is refused alone (one bad
// value holding the parse error), and the records after it are read.
func TestCSVSourceStrayQuote(t *testing.T) {
	file := workload.CSVHeader + "\nSKU-1,Bad\"quote,1.00,1,2024-01-12T13:46:41Z\nSKU-2,Good,1.00,1,2024-01-12T13:46:41Z\n"
	path := filepath.Join(t.TempDir(), "products.csv")
	require.NoError(t, os.WriteFile(path, []byte(file), 0o600))
	s, err := openCSV(path, 0)
	require.NoError(t, err)
	defer s.Close()
	r, err := s.Next(context.Background())
	require.NoError(t, err)
	require.Equal(t, int64(2), r.pos)
	bv, ok := r.values[0].(badValue)
	require.True(t, ok, "%#v", r.values)
	require.Equal(t, "record", bv.err.Column)
	r, err = s.Next(context.Background())
	require.NoError(t, err)
	require.Equal(t, int64(3), r.pos)
	require.Equal(t, "Good", r.values[1])
}

// TestCommitRowsHelp: -commit-rows says the library's real default.
func TestCommitRowsHelp(t *testing.T) {
	var stderr bytes.Buffer
	_, _ = parseFlags([]string{"-h"}, &stderr)
	require.Contains(t, stderr.String(), "pgetl's default, 50000, reached after a slow start from 500")
	require.Equal(t, 50000, pgetl.CommitRowsDefault)
}
