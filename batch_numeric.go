package pgetl

import (
	"encoding/binary"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

// appendFast appends v in the binary format of type oid for the common pairs of
// a Go type and a column type, byte for byte as pgx's codecs encode them (numeric
// in the server's canonical form, see appendNumeric), and reports true; otherwise
// it reports false and the caller uses pgx's codec. A row's values go through
// here at Add, so this is the client's hot path.
func appendFast(oid uint32, v any, buf []byte) ([]byte, bool) {
	switch x := v.(type) {
	case string:
		if oid == pgtype.TextOID || oid == pgtype.VarcharOID {
			return append(buf, x...), true
		}
	case int32:
		if oid == pgtype.Int4OID {
			return binary.BigEndian.AppendUint32(buf, uint32(x)), true
		}
	case int64:
		if oid == pgtype.Int8OID {
			return binary.BigEndian.AppendUint64(buf, uint64(x)), true
		}
	case time.Time:
		if oid == pgtype.TimestamptzOID {
			// pgx: microseconds since 2000-01-01 UTC.
			us := x.Unix()*1_000_000 + int64(x.Nanosecond())/1000 - 946_684_800_000_000
			return binary.BigEndian.AppendUint64(buf, uint64(us)), true
		}
	case pgtype.Numeric:
		if oid == pgtype.NumericOID {
			return appendNumeric(buf, x)
		}
	}
	return buf, false
}

// appendNumeric appends n in PostgreSQL's binary numeric format, in the canonical
// form the server itself sends (numeric_send: no leading or trailing zero base-10,000
// digits), and reports true; it reports false, leaving buf alone, for the values it
// does not take (NULL, NaN, infinities, a mantissa beyond int64, an exponent beyond
// ±64), which pgx's codec then encodes. It is both faster than the codec (no
// big.Int arithmetic: BenchmarkSync spent half of Add there) and canonical, so the
// bytes a sync hashes at Add equal those the server sends back.
func appendNumeric(buf []byte, n pgtype.Numeric) ([]byte, bool) {
	if !n.Valid || n.NaN || n.InfinityModifier != pgtype.Finite || n.Int == nil || !n.Int.IsInt64() || n.Exp > 64 || n.Exp < -64 {
		return buf, false
	}
	m := n.Int.Int64()
	var sign uint16
	u := uint64(m)
	if m < 0 {
		sign, u = 0x4000, uint64(-m) // -MinInt64 wraps to its own magnitude as uint64
	}
	dscale := 0
	if n.Exp < 0 {
		dscale = int(-n.Exp)
	}
	// The decimal digits of u × 10^Exp, split at the decimal point.
	var ds [20]byte
	s := strconv.AppendUint(ds[:0], u, 10)
	var intPart, frac []byte
	var scratch [160]byte
	if n.Exp >= 0 {
		intPart = append(append(scratch[:0], s...), zeros[:n.Exp]...)
	} else if k := len(s) + int(n.Exp); k > 0 {
		intPart, frac = s[:k], s[k:]
	} else {
		frac = append(append(scratch[:0], zeros[:-k]...), s...)
	}
	// Base-10,000 digits: the integer part padded on the left, the fraction on the
	// right, to multiples of four.
	var digits [48]int16
	nd := 0
	lead := (4 - len(intPart)%4) % 4
	weight := (lead+len(intPart))/4 - 1
	for i := -lead; i < len(intPart); i += 4 {
		d := 0
		for j := i; j < i+4; j++ {
			d *= 10
			if j >= 0 {
				d += int(intPart[j] - '0')
			}
		}
		digits[nd] = int16(d)
		nd++
	}
	for i := 0; i < len(frac); i += 4 {
		d := 0
		for j := i; j < i+4; j++ {
			d *= 10
			if j < len(frac) {
				d += int(frac[j] - '0')
			}
		}
		digits[nd] = int16(d)
		nd++
	}
	first := 0
	for first < nd && digits[first] == 0 {
		first++
		weight--
	}
	for nd > first && digits[nd-1] == 0 {
		nd--
	}
	if first == nd {
		first, nd, weight, sign = 0, 0, 0, 0
	}
	buf = binary.BigEndian.AppendUint16(buf, uint16(nd-first))
	buf = binary.BigEndian.AppendUint16(buf, uint16(int16(weight)))
	buf = binary.BigEndian.AppendUint16(buf, sign)
	buf = binary.BigEndian.AppendUint16(buf, uint16(dscale))
	for _, d := range digits[first:nd] {
		buf = binary.BigEndian.AppendUint16(buf, uint16(d))
	}
	return buf, true
}

var zeros = []byte("0000000000000000000000000000000000000000000000000000000000000000")
