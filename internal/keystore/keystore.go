// Package keystore holds the compact storage behind pgetl's Cache for string keys: an
// open-addressing hash table whose slots are 8 bytes (a 32-bit hash and a 32-bit arena
// offset), with all keys packed end to end in one []byte arena,
// each value stored beside its key. For short keys such as "SKU-0001234" that is about
// 1 (length) + 11 (key) + 8 (int64 value) + 8/load (slot) bytes per key, against Go's map[string]int64 which spends a 16-byte string header, a separately
// allocated string and the map's own slot overhead.
//
// Each arena entry is the key's length (uvarint), the key, and then, for values
// without pointers (int64, [16]byte, …), the value's bytes themselves, so a lookup
// touches two places (the slot and the arena); for other values a 4-byte index into a
// []V. Slots hold the entry's arena offset, so nothing else is kept per key.
//
// A Table is not safe for concurrent use; the caller shards and locks. Memory is
// accounted against a [Budget] shared by the tables of one cache: a Put that would
// need more than the budget allows is refused, never half done.
package keystore

import (
	"encoding/binary"
	"math"
	"reflect"
	"slices"
	"sync/atomic"
	"unsafe"
)

// Budget is a memory budget in bytes shared by several tables.
type Budget struct {
	max  int64
	used atomic.Int64
}

// NewBudget returns a budget of max bytes.
func NewBudget(max int64) *Budget { return &Budget{max: max} }

// Max returns the budget's limit.
func (b *Budget) Max() int64 { return b.max }

// Used returns the bytes accounted so far.
func (b *Budget) Used() int64 { return b.used.Load() }

// Reserve accounts n more bytes if that stays within the limit and reports whether it
// did. A non-positive n always succeeds.
func (b *Budget) Reserve(n int64) bool {
	if n <= 0 {
		b.used.Add(n)
		return true
	}
	for {
		cur := b.used.Load()
		if cur+n > b.max {
			return false
		}
		if b.used.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

// Adjust accounts n bytes (negative to release) without checking the limit: for the
// difference between a reservation and what the allocator actually handed out.
func (b *Budget) Adjust(n int64) { b.used.Add(n) }

const (
	minTableSlots = 16
	// A table grows when it would be more than maxLoadNum/maxLoadDen full.
	maxLoadNum = 3
	maxLoadDen = 4
	// maxArena bounds the arena so that end offsets fit in uint32.
	maxArena = math.MaxUint32
)

// Table maps strings to V. The zero value is not usable: use [NewTable].
type Table[V any] struct {
	// slots holds 0 for an empty slot, else hash32<<32 | (arena offset + 1). The home
	// slot of an entry is hash32 & (len(slots)-1), so the table can be rehashed and
	// entries moved on delete without reading keys.
	slots []uint64
	// arena holds the entries: uvarint key length, key, payload. The payload is the
	// value's bytes when inline, else a little-endian uint32 index into vals.
	arena  []byte
	vals   []V // only when !inline
	inline bool
	psize  int // payload size
	live   int // entries reachable from slots
	// deadBytes counts arena bytes of removed entries, reclaimed by compaction.
	deadBytes int
	bytes     int64 // bytes accounted to the budget for this table
}

// NewTable returns an empty table, accounting its initial size to b (which it may
// exceed: a table always has its minimal slot array).
func NewTable[V any](b *Budget) *Table[V] {
	t := &Table[V]{slots: make([]uint64, minTableSlots), inline: pointerFree(reflect.TypeFor[V]())}
	t.psize = 4
	if t.inline {
		var zero V
		t.psize = int(unsafe.Sizeof(zero))
	}
	t.bytes = t.size()
	b.Adjust(t.bytes)
	return t
}

// pointerFree reports whether values of t hold no pointers, so that their bytes can
// live in a []byte without hiding anything from the garbage collector.
func pointerFree(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr,
		reflect.Float32, reflect.Float64, reflect.Complex64, reflect.Complex128:
		return true
	case reflect.Array:
		return pointerFree(t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			if !pointerFree(t.Field(i).Type) {
				return false
			}
		}
		return true
	}
	return false
}

// Len returns the number of entries.
func (t *Table[V]) Len() int { return t.live }

// Bytes returns the bytes accounted for the table.
func (t *Table[V]) Bytes() int64 { return t.bytes }

// Release returns the table's bytes to b; the table must not be used afterwards.
func (t *Table[V]) Release(b *Budget) {
	b.Adjust(-t.bytes)
	t.bytes = 0
	t.slots, t.arena, t.vals = nil, nil, nil
}

// entry returns the key of the entry at arena offset off and the offset of its
// payload.
func (t *Table[V]) entry(off int) ([]byte, int) {
	n, w := int(t.arena[off]), 1
	if n >= 0x80 {
		u, uw := binary.Uvarint(t.arena[off:])
		n, w = int(u), uw
	}
	start := off + w
	return t.arena[start : start+n], start + n
}

func (t *Table[V]) value(p int) V {
	if t.inline {
		var v V
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&v)), t.psize), t.arena[p:p+t.psize])
		return v
	}
	return t.vals[binary.LittleEndian.Uint32(t.arena[p:])]
}

func (t *Table[V]) setValue(p int, v V) {
	if t.inline {
		copy(t.arena[p:p+t.psize], unsafe.Slice((*byte)(unsafe.Pointer(&v)), t.psize))
		return
	}
	t.vals[binary.LittleEndian.Uint32(t.arena[p:])] = v
}

// find returns the slot position of key and true, or the empty slot where it would go
// and false.
func (t *Table[V]) find(h uint64, key string) (int, bool) {
	h32 := uint32(h)
	mask := uint32(len(t.slots) - 1)
	i := h32 & mask
	for {
		e := t.slots[i]
		if e == 0 {
			return int(i), false
		}
		if uint32(e>>32) == h32 {
			if k, _ := t.entry(int(uint32(e)) - 1); string(k) == key {
				return int(i), true
			}
		}
		i = (i + 1) & mask
	}
}

// Get returns the value of key, whose hash is h.
func (t *Table[V]) Get(h uint64, key string) (V, bool) {
	i, ok := t.find(h, key)
	if !ok {
		var zero V
		return zero, false
	}
	_, p := t.entry(int(uint32(t.slots[i])) - 1)
	return t.value(p), true
}

// Put sets key (hash h) to v. It reports false, changing nothing, when a new key would
// take the table beyond the budget b (or beyond 4 GiB of arena). Replacing the value
// of a present key always succeeds.
func (t *Table[V]) Put(h uint64, key string, v V, b *Budget) bool {
	i, ok := t.find(h, key)
	if ok {
		_, p := t.entry(int(uint32(t.slots[i])) - 1)
		t.setValue(p, v)
		return true
	}
	need := uvarintLen(len(key)) + len(key) + t.psize
	if len(t.arena)+need >= maxArena || len(t.vals) >= math.MaxUint32 {
		return false
	}
	// Reserve everything this insert may allocate before changing anything.
	growSlots := (t.live+1)*maxLoadDen > len(t.slots)*maxLoadNum
	var reserve int64
	if growSlots {
		reserve += int64(len(t.slots)) * 8 // the table doubles
	}
	arenaCap := nextCap(cap(t.arena), len(t.arena), need, 1024)
	reserve += int64(arenaCap - cap(t.arena))
	valsCap := cap(t.vals)
	if !t.inline {
		var zero V
		valsCap = nextCap(cap(t.vals), len(t.vals), 1, 64)
		reserve += int64(valsCap-cap(t.vals)) * int64(unsafe.Sizeof(zero))
	}
	if !b.Reserve(reserve) {
		return false
	}
	before := t.bytes
	if growSlots {
		t.rehash(len(t.slots) * 2)
		i, _ = t.find(h, key)
	}
	t.arena = grow(t.arena, arenaCap)
	off := len(t.arena)
	t.arena = binary.AppendUvarint(t.arena, uint64(len(key)))
	t.arena = append(t.arena, key...)
	p := len(t.arena)
	t.arena = t.arena[:p+t.psize]
	if !t.inline {
		t.vals = grow(t.vals, valsCap)
		binary.LittleEndian.PutUint32(t.arena[p:], uint32(len(t.vals)))
		t.vals = append(t.vals, v)
	}
	t.setValue(p, v)
	t.slots[i] = uint64(uint32(h))<<32 | uint64(off+1)
	t.live++
	t.bytes = t.size()
	// The allocator may round capacities up to a size class: account what it gave.
	b.Adjust(t.bytes - before - reserve)
	return true
}

func uvarintLen(n int) int {
	w := 1
	for n >= 0x80 {
		n >>= 7
		w++
	}
	return w
}

// Delete removes key (hash h) and reports whether it was present. Its bytes stay in
// the arena until enough are dead to make compaction worth it.
func (t *Table[V]) Delete(h uint64, key string, b *Budget) bool {
	i, ok := t.find(h, key)
	if !ok {
		return false
	}
	off := int(uint32(t.slots[i])) - 1
	_, p := t.entry(off)
	if !t.inline {
		var zero V
		t.vals[binary.LittleEndian.Uint32(t.arena[p:])] = zero // let go of what V points to
	}
	t.deadBytes += p + t.psize - off
	// Backward-shift deletion keeps linear probing free of tombstones.
	mask := len(t.slots) - 1
	for {
		t.slots[i] = 0
		j := i
		for {
			j = (j + 1) & mask
			e := t.slots[j]
			if e == 0 {
				t.live--
				if t.deadBytes > 64<<10 && t.deadBytes*2 >= len(t.arena) {
					t.compact(b)
				}
				return true
			}
			home := int(uint32(e>>32)) & mask
			// Move e into the hole at i if its home is not cyclically in (i, j].
			if (j > i && (home <= i || home > j)) || (j < i && home <= i && home > j) {
				t.slots[i] = e
				i = j
				break
			}
		}
	}
}

// compact drops dead entries' bytes by copying the live ones into fresh arrays.
func (t *Table[V]) compact(b *Budget) {
	arena := make([]byte, 0, len(t.arena)-t.deadBytes)
	var vals []V
	if !t.inline {
		vals = make([]V, 0, t.live)
	}
	for i, e := range t.slots {
		if e == 0 {
			continue
		}
		off := int(uint32(e)) - 1
		_, p := t.entry(off)
		newOff := len(arena)
		arena = append(arena, t.arena[off:p+t.psize]...)
		if !t.inline {
			binary.LittleEndian.PutUint32(arena[len(arena)-4:], uint32(len(vals)))
			vals = append(vals, t.vals[binary.LittleEndian.Uint32(t.arena[p:])])
		}
		t.slots[i] = e&^math.MaxUint32 | uint64(newOff+1)
	}
	t.arena, t.vals = arena, vals
	t.deadBytes = 0
	before := t.bytes
	t.bytes = t.size()
	b.Adjust(t.bytes - before)
}

func (t *Table[V]) rehash(n int) {
	slots := make([]uint64, n)
	mask := uint32(n - 1)
	for _, e := range t.slots {
		if e == 0 {
			continue
		}
		i := uint32(e>>32) & mask
		for slots[i] != 0 {
			i = (i + 1) & mask
		}
		slots[i] = e
	}
	t.slots = slots
}

func (t *Table[V]) size() int64 {
	var zero V
	return int64(cap(t.slots))*8 + int64(cap(t.arena)) + int64(cap(t.vals))*int64(unsafe.Sizeof(zero))
}

// nextCap returns the capacity a slice of length n and capacity c should have to take
// add more elements: unchanged if they fit, else grown by a quarter (not doubled, to
// keep the slack of large tables small), at least to min.
func nextCap(c, n, add, min int) int {
	if n+add <= c {
		return c
	}
	return max(n+add, c+c/4, min)
}

func grow[T any](s []T, c int) []T {
	if c <= cap(s) {
		return s
	}
	return slices.Grow(s, c-len(s))
}
