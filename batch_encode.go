package pgetl

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"reflect"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

var copyHeader = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

var copyTrailer = []byte{0xff, 0xff}

// encode appends values as one binary COPY tuple to bt. On error it leaves bt as it
// was and returns the index of the failing column. Caller must hold mu.
func (b *BatchSession) encode(bt *batch, values []any) (int, error) {
	start := len(bt.buf)
	buf := binary.BigEndian.AppendUint16(bt.buf, uint16(len(values)))
	key := b.keyBuf[:0]
	nullKey := false
	for i, v := range values {
		sp := len(buf)
		buf = append(buf, 0, 0, 0, 0)
		out, err := b.encodeValue(b.oids[i], v, buf)
		if err != nil {
			bt.buf = buf[:start]
			return i, fmt.Errorf("pgetl: encode %T for column %q: %w", v, b.cfg.Columns[i], err)
		}
		if out == nil {
			buf = binary.BigEndian.AppendUint32(buf[:sp], 0xffffffff)
		} else {
			buf = out
			binary.BigEndian.PutUint32(buf[sp:], uint32(len(buf)-sp-4))
		}
		if b.keyIx != nil && indexOfInt(b.keyIx, i) >= 0 {
			if out == nil {
				nullKey = true
			}
			key = append(key, buf[sp:]...)
		}
	}
	bt.buf = buf
	bt.offs = append(bt.offs, int32(start))
	if b.keyIx != nil {
		if nullKey {
			// A key with a NULL never conflicts, so it is never merged with another
			// row: "" marks it (a real key holds at least a length prefix).
			key = key[:0]
		}
		b.keyBuf = key
		if b.sync != nil {
			// syncAdd hashes b.keyBuf; syncResolve sets the key of the rows it keeps
			// (most rows of a re-sync are unchanged: their key is never needed).
			bt.keys = append(bt.keys, "")
		} else {
			bt.keys = append(bt.keys, string(key))
		}
	}
	return -1, nil
}

// encodeValue appends v in the binary format of type oid to buf (nil for NULL). A
// string that the type's binary encoder does not take is parsed in the type's text
// format and the result encoded, as pgx's CopyFrom does, so "12.34" goes into a
// numeric column.
func (b *BatchSession) encodeValue(oid uint32, v any, buf []byte) ([]byte, error) {
	if out, ok := appendFast(oid, v, buf); ok {
		return out, nil
	}
	out, err := b.m.Encode(oid, pgtype.BinaryFormatCode, v, buf)
	if err == nil {
		return out, nil
	}
	s, ok := v.(string)
	if !ok {
		return nil, err
	}
	var x any
	if err := b.m.Scan(oid, pgtype.TextFormatCode, []byte(s), &x); err != nil {
		return nil, err
	}
	return b.m.Encode(oid, pgtype.BinaryFormatCode, x, buf)
}

func indexOfInt(xs []int, x int) int {
	for i, y := range xs {
		if y == x {
			return i
		}
	}
	return -1
}

func (b *BatchSession) decodeRow(bt *batch, i int) []any {
	row := bt.buf[bt.offs[i]:bt.end(i)]
	if len(row) < 2 {
		return nil
	}
	n := int(row[0])<<8 | int(row[1])
	p := 2
	vals := make([]any, 0, n)
	for c := 0; c < n && p+4 <= len(row); c++ {
		l := int32(uint32(row[p])<<24 | uint32(row[p+1])<<16 | uint32(row[p+2])<<8 | uint32(row[p+3]))
		p += 4
		if l < 0 {
			vals = append(vals, nil)
			continue
		}
		src := row[p : p+int(l)]
		p += int(l)
		var v any = fmt.Sprintf("\\x%x", src)
		if t, ok := b.m.TypeForOID(b.oids[c]); ok {
			if dv, err := t.Codec.DecodeValue(b.m, b.oids[c], pgtype.BinaryFormatCode, src); err == nil {
				v = dv
			}
		}
		vals = append(vals, v)
	}
	return vals
}

func valuesJSON(vals []any) string {
	out := make([]any, len(vals))
	for i, v := range vals {
		if _, err := json.Marshal(v); err != nil {
			v = fmt.Sprint(v)
		}
		out[i] = v
	}
	j, err := json.Marshal(out)
	if err != nil {
		return "null"
	}
	return string(j)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// ownValues returns a copy of values that shares no memory the caller may change
// after Add returns: see ownValue.
func ownValues(values []any) []any {
	out := make([]any, len(values))
	for i, v := range values {
		out[i] = ownValue(v)
	}
	return out
}

// ownValue returns v, or a copy of it if it holds memory the caller may reuse: a
// []byte (the common case: a read buffer) and any other slice, array, map, pointer
// or struct are copied deeply, through their exported fields. Values without such
// memory (strings, numbers, time.Time, …) are returned as they are. Memory held in
// unexported fields (a *big.Int's words) is shared: such values must not be
// modified after Add.
func ownValue(v any) any {
	switch x := v.(type) {
	case nil, string, bool, int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64,
		float32, float64, time.Time, time.Duration:
		return v
	case []byte:
		return bytes.Clone(x)
	}
	return deepCopy(reflect.ValueOf(v), 0).Interface()
}

// deepCopyDepth bounds the recursion of deepCopy (a cyclic value is copied that
// deep, then shared).
const deepCopyDepth = 32

// deepCopy returns a copy of v of the same type, sharing no slice, map or pointed-to
// memory reachable through exported fields, down to deepCopyDepth.
func deepCopy(v reflect.Value, depth int) reflect.Value {
	if depth > deepCopyDepth || !hasRefs(v.Type()) {
		return v
	}
	t := v.Type()
	switch v.Kind() {
	case reflect.Slice:
		if v.IsNil() {
			return v
		}
		out := reflect.MakeSlice(t, v.Len(), v.Len())
		if !hasRefs(t.Elem()) {
			reflect.Copy(out, v)
			return out
		}
		for i := range v.Len() {
			out.Index(i).Set(deepCopy(v.Index(i), depth+1))
		}
		return out
	case reflect.Array:
		out := reflect.New(t).Elem()
		for i := range v.Len() {
			out.Index(i).Set(deepCopy(v.Index(i), depth+1))
		}
		return out
	case reflect.Map:
		if v.IsNil() {
			return v
		}
		out := reflect.MakeMapWithSize(t, v.Len())
		for it := v.MapRange(); it.Next(); {
			out.SetMapIndex(it.Key(), deepCopy(it.Value(), depth+1))
		}
		return out
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		out := reflect.New(t.Elem())
		out.Elem().Set(deepCopy(v.Elem(), depth+1))
		return out
	case reflect.Interface:
		if v.IsNil() {
			return v
		}
		out := reflect.New(t).Elem()
		out.Set(deepCopy(v.Elem(), depth+1))
		return out
	case reflect.Struct:
		out := reflect.New(t).Elem()
		out.Set(v) // unexported fields as they are
		for i := range t.NumField() {
			if t.Field(i).IsExported() {
				out.Field(i).Set(deepCopy(v.Field(i), depth+1))
			}
		}
		return out
	}
	return v
}

// hasRefs reports whether values of t may hold slice, map, pointer or interface
// memory (chan and func values are shared: they are not data).
func hasRefs(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Slice, reflect.Map, reflect.Pointer, reflect.Interface:
		return true
	case reflect.Array:
		return hasRefs(t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			if hasRefs(t.Field(i).Type) {
				return true
			}
		}
	}
	return false
}
