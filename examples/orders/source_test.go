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

	"github.com/pgetl/pgetl/internal/workload"
)

// TestOrdersCSVSource: the orders CSV source takes PostgreSQL's timestamptz output
// and quoted fields with line breaks (a customer name on two lines); a record's pos
// is its number, and Where names the line it ends on.
func TestOrdersCSVSource(t *testing.T) {
	file := workload.OrdersCSVHeader + "\n" + // line 1
		"1,1,a@example.com,Ann,SKU-1,2,1.50,2024-01-01T00:01:00Z\n" + // 2
		"1,2,a@example.com,\"Ann\nSmith, Jr.\",SKU-2,1,2.00,2024-01-01 00:01:00+00\n" + // 3-4
		"2,1,b@example.com,Bob,SKU-1,3,1.50,2024-01-01 00:02:00.5+05:30\n" // 5
	path := filepath.Join(t.TempDir(), "orders.csv")
	require.NoError(t, os.WriteFile(path, []byte(file), 0o600))
	s, err := openCSV(path, 0)
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, int64(3), s.Total())
	var got []record
	for {
		r, err := s.Next(context.Background())
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		require.Nil(t, r.bad, "record %d: %v", r.pos, r.bad)
		got = append(got, r)
	}
	require.Len(t, got, 3)
	require.Equal(t, "Ann\nSmith, Jr.", got[1].line.CustomerName)
	require.True(t, got[1].line.OrderedAt.Equal(time.Date(2024, 1, 1, 0, 1, 0, 0, time.UTC)))
	require.True(t, got[2].line.OrderedAt.Equal(time.Date(2024, 1, 1, 0, 2, 0, 5e8, time.FixedZone("", 5*3600+30*60))))
	require.Equal(t, []int64{1, 2, 3}, []int64{got[0].pos, got[1].pos, got[2].pos})
	require.Equal(t, path+" line 2", s.Where(1))
	require.Equal(t, path+" line 4", s.Where(2))
	require.Equal(t, path+" line 5", s.Where(3))

	// Resumed after record 2: record 3 only.
	s2, err := openCSV(path, 2)
	require.NoError(t, err)
	defer s2.Close()
	r, err := s2.Next(context.Background())
	require.NoError(t, err)
	require.Equal(t, int64(3), r.pos)
}

// TestOrdersCommitRowsHelp: -commit-rows says the library's real default.
func TestOrdersCommitRowsHelp(t *testing.T) {
	var stderr bytes.Buffer
	_, _ = parseFlags([]string{"-h"}, &stderr)
	require.Contains(t, stderr.String(), "pgetl's default, 50000, reached after a slow start from 500")
}
