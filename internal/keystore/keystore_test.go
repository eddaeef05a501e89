package keystore

import (
	"hash/maphash"
	"math/rand/v2"
	"strconv"
	"testing"
)

// TestTableAgainstMap runs random puts and deletes on a Table and a map and checks
// that they agree, including across growth and compaction.
func TestTableAgainstMap(t *testing.T) {
	seed := maphash.MakeSeed()
	b := NewBudget(1 << 40)
	tab := NewTable[int64](b)
	want := map[string]int64{}
	r := rand.New(rand.NewPCG(1, 2))
	for op := range 200_000 {
		k := "k" + strconv.Itoa(r.IntN(20_000))
		h := maphash.String(seed, k)
		switch r.IntN(3) {
		case 0, 1:
			v := int64(op)
			if !tab.Put(h, k, v, b) {
				t.Fatalf("put %q refused", k)
			}
			want[k] = v
		case 2:
			_, had := want[k]
			if got := tab.Delete(h, k, b); got != had {
				t.Fatalf("delete %q = %v, want %v", k, got, had)
			}
			delete(want, k)
		}
	}
	if tab.Len() != len(want) {
		t.Fatalf("len %d, want %d", tab.Len(), len(want))
	}
	for i := range 20_000 {
		k := "k" + strconv.Itoa(i)
		v, ok := tab.Get(maphash.String(seed, k), k)
		wv, wok := want[k]
		if ok != wok || v != wv {
			t.Fatalf("get %q = %d,%v, want %d,%v", k, v, ok, wv, wok)
		}
	}
	if b.Used() != tab.Bytes() || tab.Bytes() != tab.size() {
		t.Fatalf("accounted %d, table %d, size %d", b.Used(), tab.Bytes(), tab.size())
	}
	tab.Release(b)
	if b.Used() != 0 {
		t.Fatalf("after release: %d", b.Used())
	}
}

func TestTableBudget(t *testing.T) {
	seed := maphash.MakeSeed()
	b := NewBudget(64 << 10)
	tab := NewTable[int64](b)
	refused := 0
	for i := range 10_000 {
		k := "SKU-" + strconv.Itoa(i)
		if !tab.Put(maphash.String(seed, k), k, int64(i), b) {
			refused++
		}
	}
	if refused == 0 || tab.Len() == 0 {
		t.Fatalf("refused %d, len %d", refused, tab.Len())
	}
	if b.Used() > b.Max() {
		t.Fatalf("used %d > max %d", b.Used(), b.Max())
	}
	// Replacing a present key's value never needs memory.
	k := "SKU-0"
	if !tab.Put(maphash.String(seed, k), k, -1, b) {
		t.Fatal("replace refused")
	}
	if v, _ := tab.Get(maphash.String(seed, k), k); v != -1 {
		t.Fatalf("got %d", v)
	}
}

// TestTablePointerValues stores values holding pointers (kept in a []V, not in the
// arena), across deletes and compaction.
func TestTablePointerValues(t *testing.T) {
	seed := maphash.MakeSeed()
	b := NewBudget(1 << 40)
	tab := NewTable[string](b)
	if tab.inline {
		t.Fatal("string values inline")
	}
	for i := range 50_000 {
		k := strconv.Itoa(i)
		tab.Put(maphash.String(seed, k), k, "v"+k, b)
	}
	for i := 0; i < 50_000; i += 2 {
		k := strconv.Itoa(i)
		tab.Delete(maphash.String(seed, k), k, b)
	}
	for i := range 50_000 {
		k := strconv.Itoa(i)
		v, ok := tab.Get(maphash.String(seed, k), k)
		if ok != (i%2 == 1) || (ok && v != "v"+k) {
			t.Fatalf("get %q = %q,%v", k, v, ok)
		}
	}
	if len(tab.vals) >= 50_000 {
		t.Fatalf("not compacted: %d vals", len(tab.vals))
	}
	type pair struct {
		A int32
		B [3]byte
	}
	if !NewTable[pair](b).inline || NewTable[*int](b).inline {
		t.Fatal("pointerFree")
	}
	// Long keys need a multi-byte length.
	long := string(make([]byte, 300))
	tab.Put(maphash.String(seed, long), long, "long", b)
	if v, ok := tab.Get(maphash.String(seed, long), long); !ok || v != "long" {
		t.Fatal("long key")
	}
}
