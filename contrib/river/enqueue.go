package pgetlriver

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// EnqueuePartitions inserts the partitions of job in tx with one InsertManyTx, so a
// job is enqueued whole or not at all (commit tx to enqueue). Each part's Job is set
// to job (a part naming another job is an error), and partition names must be
// unique. A partition already enqueued (pending, running or completed) is skipped,
// not duplicated: its result has UniqueSkippedAsDuplicate set. client may be an
// insert-only client (no Queues); its Config.Schema must be the River schema.
func EnqueuePartitions(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], job string, parts []PartitionArgs) ([]*rivertype.JobInsertResult, error) {
	if client == nil || tx == nil {
		return nil, errors.New("pgetlriver: EnqueuePartitions needs a client and a transaction")
	}
	if len(parts) == 0 {
		return nil, fmt.Errorf("pgetlriver: job %q: no partitions to enqueue", job)
	}
	seen := make(map[string]bool, len(parts))
	params := make([]river.InsertManyParams, 0, len(parts))
	for _, p := range parts {
		if p.Job == "" {
			p.Job = job
		}
		if p.Job != job {
			return nil, fmt.Errorf("pgetlriver: partition %q belongs to job %q, not %q", p.Partition, p.Job, job)
		}
		if err := p.Validate(); err != nil {
			return nil, err
		}
		if seen[p.Partition] {
			return nil, fmt.Errorf("pgetlriver: job %q: partition %q given twice", job, p.Partition)
		}
		seen[p.Partition] = true
		params = append(params, river.InsertManyParams{Args: p})
	}
	res, err := client.InsertManyTx(ctx, tx, params)
	if err != nil {
		return nil, fmt.Errorf("pgetlriver: enqueue job %q: %w", job, err)
	}
	return res, nil
}
