package workload

// Sync sources: the rows of a catalogue some of which changed or disappeared since
// the last load, for the sync mode of the products job and its tests.
//
// Row i of a sync source at version v with changedEvery C and missingEvery M is
// Row(i, SyncVersion(i, v, C)), absent when Missing(i, M).

// SyncVersion returns the version of row i in a sync source at version v: v if
// changedEvery is 0 or divides i, else 1.
func SyncVersion(i, v, changedEvery int64) int64 {
	if changedEvery == 0 || i%changedEvery == 0 {
		return v
	}
	return 1
}

// Missing reports whether row i is absent from a sync source with missingEvery:
// i%missingEvery == missingEvery-1 (never with missingEvery 0).
func Missing(i, missingEvery int64) bool {
	return missingEvery > 0 && i%missingEvery == missingEvery-1
}

// SyncChecksum returns the checksum ([Checksum]'s form) of the rows 1..n of a sync
// source at version v with changedEvery and missingEvery: what a table synced with
// it holds.
func SyncChecksum(n, v, changedEvery, missingEvery int64) (count int64, sum string) {
	var s Sum
	for i := int64(1); i <= n; i++ {
		if !Missing(i, missingEvery) {
			s.Add(Row(i, SyncVersion(i, v, changedEvery)))
		}
	}
	return s.Count(), s.String()
}
