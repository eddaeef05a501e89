package pgetl

import (
	"encoding/binary"
	"math/bits"
	"sync"
	"unsafe"
)

// rowHashes is the key cache of a sync ([BatchConfig.Sync]): for each key of the
// target table, a 64-bit hash of the key's encoded bytes and a 64-bit hash of the
// row's encoded tuple (the bytes Add encodes, as the server's binary COPY sends them
// back), and where the preload found the row (its ctid, so that Sweep fetches the
// keys of the rows to delete without reading the whole table again). It is an
// open-addressing table of 24-byte entries (linear probing, at most 3/4 full), so it
// holds a key in 32 to 64 bytes (not counting the moments it grows), whatever the
// key's length: 10M keys take 384 MiB (40 B/key).
//
// The key is not kept, only its hash. Two keys whose hashes collide share one entry;
// that fails safe: a row hash covers its key's bytes too, so a colliding key never
// matches the other key's row (it is sent, not skipped), and a sweep deletes a row
// only when its key hash was not seen, which the colliding seen key prevents (a row
// that should go may stay). A changed row is skipped only if its 64-bit row hash
// equals the old one (probability 2^-64 per changed row).
//
// Entries in a batch in flight hold rowDirty, which matches no row: a later row of
// the same key is sent whatever it holds, until the batch commits and the entry
// takes the hash of the row it wrote.
type rowHashes struct {
	mu    sync.RWMutex // guards the fields below
	slots []hashSlot   // len is a power of two; key 0 marks a free slot
	n     int          // keys held
}

type hashSlot struct {
	key uint64 // hash of the key's encoded bytes (never 0 once set)
	row uint64 // rowHash of the row's tuple, rowDirty, with rowSeen if seen
	loc uint64 // where the preload found the row (its ctid, see packTID), 0 if unknown
}

const (
	rowSeen  = 1 << 63 // set on an entry whose key the sync's source held
	rowDirty = 0       // a row of this key is in flight: match nothing
)

// hashBytes returns a 64-bit hash of b, the same in every process (the seen set is
// persisted): FNV-1a over 8-byte words with a final avalanche, fast enough for
// tuples (about 1 ns per 8 bytes).
func hashBytes(b []byte) uint64 {
	const prime = 0x100000001b3
	h := uint64(0xcbf29ce484222325) ^ uint64(len(b))
	for len(b) >= 8 {
		h = (h ^ binary.LittleEndian.Uint64(b)) * prime
		h = bits.RotateLeft64(h, 31) * 0x9e3779b97f4a7c15
		b = b[8:]
	}
	for _, c := range b {
		h = (h ^ uint64(c)) * prime
	}
	// murmur3's fmix64.
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// keyHash returns the key hash of a key's encoded bytes (0 is reserved).
func keyHash(b []byte) uint64 {
	if h := hashBytes(b); h != 0 {
		return h
	}
	return 1
}

// rowHash returns the row hash of a tuple's fields (each with its length prefix,
// after the field count): never rowDirty, never with rowSeen.
func rowHash(fields []byte) uint64 { return (hashBytes(fields) | 1) &^ rowSeen }

func newRowHashes(n int) *rowHashes {
	t := &rowHashes{}
	t.slots = make([]hashSlot, slotsFor(n))
	return t
}

// slotsFor returns the table size for n keys: a power of two, n at most 3/4 of it.
func slotsFor(n int) int {
	s := 16
	for s*3/4 < n {
		s *= 2
	}
	return s
}

// find returns the slot of key k, or the free slot where it would go. Caller must
// hold mu.
func (t *rowHashes) find(k uint64) int {
	mask := len(t.slots) - 1
	i := int(k) & mask
	for {
		s := t.slots[i].key
		if s == k || s == 0 {
			return i
		}
		i = (i + 1) & mask
	}
}

// get returns the row hash of key k (with its rowSeen bit) and whether k is held.
func (t *rowHashes) get(k uint64) (uint64, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	s := t.slots[t.find(k)]
	return s.row, s.key != 0
}

// set sets the row hash of key k, keeping its rowSeen bit, adding k if missing;
// it reports whether k was held. A held key's location is forgotten: the row was
// written again, elsewhere. Caller must hold mu for writing.
func (t *rowHashes) set(k, row uint64) bool {
	i := t.find(k)
	if t.slots[i].key != 0 {
		t.slots[i].row = row | t.slots[i].row&rowSeen
		t.slots[i].loc = 0
		return true
	}
	if (t.n+1)*4 > len(t.slots)*3 {
		t.grow()
		i = t.find(k)
	}
	t.slots[i] = hashSlot{key: k, row: row}
	t.n++
	return false
}

// put adds key k with row hash row found at loc (the preload). Caller must hold mu
// for writing.
func (t *rowHashes) put(k, row, loc uint64) {
	i := t.find(k)
	if t.slots[i].key == 0 && (t.n+1)*4 > len(t.slots)*3 {
		t.grow()
		i = t.find(k)
	}
	if t.slots[i].key == 0 {
		t.n++
	}
	t.slots[i] = hashSlot{key: k, row: row | t.slots[i].row&rowSeen, loc: loc}
}

// unseen returns the locations of the rows held but not seen (at most max of
// them, if max > 0) and how many such rows there are.
func (t *rowHashes) unseen() (locs []uint64, n int) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, s := range t.slots {
		if s.key != 0 && s.row&rowSeen == 0 {
			n++
			if s.loc != 0 {
				locs = append(locs, s.loc)
			}
		}
	}
	return locs, n
}

// check looks key k up for a row whose hash is row: if k is held it marks it
// seen, and reports unchanged if its hash is row, else marks it in flight
// (rowDirty) until the row's batch commits and returns where the preload found
// the row (0 if unknown, or if a batch of the run has written the key since or is
// writing it). Caller must hold mu for writing.
func (t *rowHashes) check(k, row uint64) (held, unchanged bool, loc uint64) {
	i := t.find(k)
	s := &t.slots[i]
	if s.key == 0 {
		return false, false, 0
	}
	if s.row&^rowSeen == row {
		s.row |= rowSeen
		return true, true, 0
	}
	loc = s.loc
	if s.row&^rowSeen == rowDirty {
		loc = 0 // an earlier row of the key is in flight: the row will move
	}
	s.row = rowDirty | rowSeen
	return true, false, loc
}

// markSeen sets rowSeen on the entry of key k, if held.
func (t *rowHashes) markSeen(k uint64) {
	if i := t.find(k); t.slots[i].key != 0 {
		t.slots[i].row |= rowSeen
	}
}

func (t *rowHashes) grow() {
	old := t.slots
	t.slots = make([]hashSlot, 2*len(old))
	mask := len(t.slots) - 1
	for _, s := range old {
		if s.key == 0 {
			continue
		}
		i := int(s.key) & mask
		for t.slots[i].key != 0 {
			i = (i + 1) & mask
		}
		t.slots[i] = s
	}
}

// len returns the number of keys held.
func (t *rowHashes) len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.n
}

// bytes returns the memory the table holds.
func (t *rowHashes) bytes() int64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return int64(len(t.slots)) * int64(unsafe.Sizeof(hashSlot{}))
}
