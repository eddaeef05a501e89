// Package pgetlriver runs partitioned pgetl jobs on River
// (github.com/riverqueue/river), a Postgres-backed job queue, so one job can be
// loaded by many worker processes on many machines.
//
// A job is split into partitions (key ranges, files). Each partition is one River
// job of kind "pgetl_partition" ([PartitionArgs]), unique per (job, partition), and
// runs as one pgetl [pgetl.Session] whose job name is "<job>/<partition>", with its
// own checkpoint. [EnqueuePartitions] inserts all partitions of a job in one
// transaction; a [Worker] registered with a River client runs them; [ReadProgress]
// sums the partitions' checkpoints and River states.
//
// # Who guarantees what
//
// River distributes the partitions and re-delivers them (a retry after an error, a
// rescue of a job whose worker died). River's own job state is not owner-fenced: a
// stale worker can still update a job row another worker now runs. Correctness
// lives in pgetl's checkpoint instead: a re-delivered partition resumes after its
// checkpoint's cursor, and only the session holding the partition's lease can
// advance it, so a row range is committed once, whatever River does.
//
// # Re-delivery, fencing and backoff
//
// A Worker never passes [pgetl.SessionConfig.Takeover]. When River delivers a
// partition whose previous run still holds the lease (it is alive, or it died less
// than a lease ago), NewSession fails with [pgetl.ErrJobClaimed] and the worker
// returns [river.JobSnooze] for the rest of that lease: the job comes back when the
// lease can be claimed, and a snooze does not use up one of the job's attempts (a
// live duplicate is not a failure of the partition). A run that is fenced mid-way
// ([pgetl.ErrFenced]: someone took the partition over) snoozes for one lease the
// same way. A partition already finished completes at once. Any other error is
// returned as is: River retries it with its backoff and, after MaxAttempts,
// discards the partition (shown as failed by ReadProgress).
//
// # Time slices
//
// River rescues a job whose worker died only once the job's timeout (Client
// JobTimeout, or [WorkerConfig.Timeout]) and RescueStuckJobsAfter have passed since
// the attempt started; a job without a timeout is never rescued. A partition that
// runs for hours would need a timeout of hours, and a crash would stall it for
// hours. Instead, a Worker runs a partition in slices: when 80 % of the attempt's
// timeout has passed, the loader's [Partition.Add] returns [ErrYield], the worker
// commits what it buffered, releases the lease and returns JobSnooze(0), and the
// partition is available again at once, to this worker or another one, resuming
// from its checkpoint. A short timeout (minutes) thus bounds both the time to
// re-delivery after a crash and nothing else.
package pgetlriver
