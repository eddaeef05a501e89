package pgetl

import (
	"encoding/binary"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5/pgtype"
)

var copyHeader = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

var copyTrailer = []byte{0xff, 0xff}

// encode appends values as one binary COPY tuple to bt. On error it leaves bt as it
// was and returns the index of the failing column. Caller must hold mu.
func (b *BatchSession) encode(bt *batch, values []any) (int, error) {
	start := len(bt.buf)
	buf := binary.BigEndian.AppendUint16(bt.buf, uint16(len(values)))
	var key []byte
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
		bt.keys = append(bt.keys, string(key))
	}
	return -1, nil
}

// encodeValue appends v in the binary format of type oid to buf (nil for NULL). A
// string that the type's binary encoder does not take is parsed in the type's text
// format and the result encoded, as pgx's CopyFrom does, so "12.34" goes into a
// numeric column.
func (b *BatchSession) encodeValue(oid uint32, v any, buf []byte) ([]byte, error) {
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
