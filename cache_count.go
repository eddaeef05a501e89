package pgetl

import "hash/maphash"

// Contains reports whether k is cached, as Get does, without counting a lookup in
// [CacheStat]: for a job's bookkeeping around its own lookups (was this key new when
// its row was added?), so that Hits and Misses count each lookup once.
func (c *Cache[K, V]) Contains(k K) bool {
	_, ok := c.peek(k)
	return ok
}

// peek is Get without counting.
func (c *Cache[K, V]) peek(k K) (V, bool) {
	if c.str {
		s := keyString(&k)
		h := maphash.String(c.seed, s)
		sh := &c.strs[h>>59]
		sh.mu.RLock()
		defer sh.mu.RUnlock()
		return sh.t.Get(h, s)
	}
	sh := &c.maps[maphash.Comparable(c.seed, k)>>59]
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	v, ok := sh.m[k]
	return v, ok
}

// containsKey is HasKey without counting a lookup: a batch's bookkeeping after its
// commit (which keys to add) is not a lookup; the one at Add was counted.
func (c *Cache[K, V]) containsKey(key any) bool {
	k, ok := key.(K)
	if !ok {
		return false
	}
	_, ok = c.peek(k)
	return ok
}

// keySetContains returns kc's uncounted membership test when it has one (a
// [Cache]), else its HasKey.
func keySetContains(kc KeySet) func(any) bool {
	if q, ok := kc.(interface{ containsKey(any) bool }); ok {
		return q.containsKey
	}
	return kc.HasKey
}
