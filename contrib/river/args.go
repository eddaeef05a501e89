package pgetlriver

import (
	"errors"
	"fmt"
	"strings"

	"github.com/riverqueue/river"
)

// Kind is the River job kind of a partition.
const Kind = "pgetl_partition"

// PartitionArgs are the arguments of one partition's River job. A partition is a
// source range (From..To, inclusive) or a File, or anything a [LoadFunc] reads from
// Source; Job and Partition name it and are its River unique key.
type PartitionArgs struct {
	// Job names the whole job; every partition of a job shares it. It must not be
	// empty.
	Job string `json:"job" river:"unique"`
	// Partition names the partition within the job, unique per job. It must not be
	// empty nor contain '/'. The partition runs as the pgetl job "<Job>/<Partition>".
	Partition string `json:"partition" river:"unique"`
	// From and To bound a key-range partition: source rows From..To, inclusive.
	// Both zero means the partition is not a range.
	From int64 `json:"from,omitempty"`
	To   int64 `json:"to,omitempty"`
	// File names the source file of a file partition.
	File string `json:"file,omitempty"`
	// Source is free-form configuration for the LoadFunc (a URL, a query, a
	// version).
	Source string `json:"source,omitempty"`
}

// Kind returns [Kind].
func (PartitionArgs) Kind() string { return Kind }

// InsertOpts makes partitions unique by (Job, Partition) while the previous one is
// pending, running or completed: enqueueing a job twice inserts its partitions
// once. A discarded or cancelled partition can be enqueued again.
func (PartitionArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{UniqueOpts: river.UniqueOpts{ByArgs: true}}
}

// Name returns the pgetl job name of the partition: "<Job>/<Partition>".
func (a PartitionArgs) Name() string { return a.Job + "/" + a.Partition }

// Rows returns the number of rows of a range partition (0 for others).
func (a PartitionArgs) Rows() int64 {
	if a.From == 0 && a.To == 0 {
		return 0
	}
	return a.To - a.From + 1
}

// Validate checks the partition's names and range.
func (a PartitionArgs) Validate() error {
	switch {
	case a.Job == "":
		return errors.New("pgetlriver: PartitionArgs.Job is required")
	case a.Partition == "":
		return fmt.Errorf("pgetlriver: job %q: PartitionArgs.Partition is required", a.Job)
	case strings.Contains(a.Partition, "/"):
		return fmt.Errorf("pgetlriver: job %q: partition %q must not contain '/'", a.Job, a.Partition)
	case strings.IndexByte(a.Job, 0) >= 0 || strings.IndexByte(a.Partition, 0) >= 0:
		return fmt.Errorf("pgetlriver: job %q: names must not contain a NUL byte", a.Job)
	case (a.From != 0 || a.To != 0) && (a.From < 1 || a.To < a.From):
		return fmt.Errorf("pgetlriver: partition %q: bad range %d..%d (want 1 <= from <= to)", a.Name(), a.From, a.To)
	}
	return nil
}

// SplitRange splits rows 1..rows into n key-range partitions of job, named "p000",
// "p001", … (zero-padded so they sort), as even as possible. n is capped at rows.
func SplitRange(job string, rows int64, n int) []PartitionArgs {
	if rows < 1 || n < 1 {
		return nil
	}
	if int64(n) > rows {
		n = int(rows)
	}
	width := len(fmt.Sprint(n - 1))
	if width < 3 {
		width = 3
	}
	parts := make([]PartitionArgs, 0, n)
	from := int64(1)
	for i := 0; i < n; i++ {
		size := rows / int64(n)
		if int64(i) < rows%int64(n) {
			size++
		}
		parts = append(parts, PartitionArgs{Job: job, Partition: fmt.Sprintf("p%0*d", width, i), From: from, To: from + size - 1})
		from += size
	}
	return parts
}
