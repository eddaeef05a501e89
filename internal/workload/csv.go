package workload

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// CSVHeader is the header line [CSV] writes, without its newline.
const CSVHeader = "sku,name,price,inventory,updated_at"

// CSV writes rows from..to (inclusive) at version v to w as CSV with the header
// [CSVHeader]: price as in [Product.PriceString], updated_at in RFC 3339 UTC
// ("2024-01-12T13:46:41Z"). No field needs quoting. The output loads with
// COPY … FROM STDIN (FORMAT csv, HEADER) into [Columns].
func CSV(w io.Writer, from, to, v int64) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	if _, err := bw.WriteString(CSVHeader + "\n"); err != nil {
		return fmt.Errorf("workload: write csv: %w", err)
	}
	var line []byte
	for i := from; i <= to; i++ {
		line = AppendCSV(line[:0], Row(i, v))
		if _, err := bw.Write(line); err != nil {
			return fmt.Errorf("workload: write csv: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("workload: write csv: %w", err)
	}
	return nil
}

// AppendCSV appends p as one CSV record of [CSV], newline included, to b.
func AppendCSV(b []byte, p Product) []byte {
	b = append(b, p.SKU...)
	b = append(b, ',')
	b = append(b, p.Name...)
	b = append(b, ',')
	b = appendPrice(b, p.PriceCents)
	b = append(b, ',')
	b = strconv.AppendInt(b, int64(p.Inventory), 10)
	b = append(b, ',')
	b = p.UpdatedAt.UTC().AppendFormat(b, time.RFC3339)
	return append(b, '\n')
}

// ParseCSV parses one record of [CSV] (fields split on commas, no header) back into
// a Product, deriving I from the sku and V from the name.
func ParseCSV(fields []string) (Product, error) {
	if len(fields) != len(Columns) {
		return Product{}, fmt.Errorf("workload: csv record has %d fields, want %d", len(fields), len(Columns))
	}
	var p Product
	var err error
	p.SKU, p.Name = fields[0], fields[1]
	num, ok := strings.CutPrefix(p.SKU, "SKU-")
	if !ok {
		return Product{}, fmt.Errorf("workload: csv sku %q: want SKU-<n>", p.SKU)
	}
	if p.I, err = strconv.ParseInt(num, 10, 64); err != nil {
		return Product{}, fmt.Errorf("workload: csv sku %q: %w", p.SKU, err)
	}
	_, ver, ok := strings.Cut(p.Name, " v")
	if !ok {
		return Product{}, fmt.Errorf("workload: csv name %q: want \"Product <i> v<v>\"", p.Name)
	}
	if p.V, err = strconv.ParseInt(ver, 10, 64); err != nil {
		return Product{}, fmt.Errorf("workload: csv name %q: %w", p.Name, err)
	}
	units, frac, ok := strings.Cut(fields[2], ".")
	if !ok || len(frac) != 2 {
		return Product{}, fmt.Errorf("workload: csv price %q: want <units>.<cents>", fields[2])
	}
	u, err1 := strconv.ParseUint(units, 10, 63)
	c, err2 := strconv.ParseUint(frac, 10, 7)
	if err1 != nil || err2 != nil {
		return Product{}, fmt.Errorf("workload: csv price %q: not a decimal", fields[2])
	}
	p.PriceCents = int64(u)*100 + int64(c)
	inv, err := strconv.ParseInt(fields[3], 10, 32)
	if err != nil {
		return Product{}, fmt.Errorf("workload: csv inventory %q: %w", fields[3], err)
	}
	p.Inventory = int32(inv)
	if p.UpdatedAt, err = ParseTimestamp(fields[4]); err != nil {
		return Product{}, fmt.Errorf("workload: csv updated_at %q: %w", fields[4], err)
	}
	p.UpdatedAt = p.UpdatedAt.UTC()
	return p, nil
}
