package main

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
)

// TestSummaryAfterLostCommits: after a failover that lost committed batches, the
// summary claims only the rows the database still has, names the loss, and points
// the rerun at the database's checkpoint.
func TestSummaryAfterLostCommits(t *testing.T) {
	var out bytes.Buffer
	j := &job{cfg: config{source: "synthetic", rows: 40000, version: 1, mode: "insert", job: "fo", checkpointSchema: "pgetl"},
		stdout: &out, table: `"s"."products"`}
	lost := &pgetl.CheckpointLostError{Job: "fo",
		Committed: pgetl.Checkpoint{Job: "fo", Seq: 19, Cursor: "19000", Rows: 19000},
		Database:  pgetl.Checkpoint{Job: "fo", Seq: 9, Cursor: "9000", Rows: 9000}}
	j.summary(outcome{status: "FAILED: the database lost committed batches (failover or restore)", lost: lost, cp: lost.Database})
	s := out.String()
	require.Contains(t, s, "loaded      0 (10000 more were committed but lost by the database")
	require.Contains(t, s, "lost        10000 rows (batches 10..19)")
	require.Contains(t, s, "job total: 9000 rows")
	require.NotContains(t, s, "19000")
}
