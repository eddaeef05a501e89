package jobkit

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
)

// CSV reads the records of a CSV file (RFC 4180, as PostgreSQL's COPY … TO (FORMAT
// csv) and psql's \copy write them) with encoding/csv: a quoted field may hold
// commas, quotes ("") and line breaks, so a record may span lines. Records are
// numbered from 1 after the header, and each knows the line it ends on.
type CSV struct {
	r      *csv.Reader
	n      int64
	header []string
}

// CSVRecord is one record of a CSV file.
type CSVRecord struct {
	Fields []string // its fields; nil when Err is set
	N      int64    // its number: 1 for the first record after the header
	Line   int64    // the line it ends on (the header is line 1)
	Err    error    // why it cannot be read (a *csv.ParseError: a stray quote); the reader goes on after it
}

// NewCSV reads the header of r (a UTF-8 byte order mark before it is dropped) and
// returns the reader of the records after it.
func NewCSV(r io.Reader) (*CSV, error) {
	cr := csv.NewReader(r)
	cr.FieldsPerRecord = -1 // a record with too few or too many fields is the caller's to refuse
	h, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return nil, errors.New("empty file")
	}
	if err != nil {
		return nil, err
	}
	if len(h) > 0 {
		h[0] = strings.TrimPrefix(h[0], "\ufeff")
	}
	return &CSV{r: cr, header: h}, nil
}

// Header returns the header's fields joined by commas.
func (c *CSV) Header() string { return strings.Join(c.header, ",") }

// Next returns the next record, or io.EOF after the last one. A record that cannot
// be parsed is returned with Err set (and no error), so the caller can refuse it and
// go on; other errors (reading the file) are returned as the error.
func (c *CSV) Next() (CSVRecord, error) {
	f, err := c.r.Read()
	if errors.Is(err, io.EOF) {
		return CSVRecord{}, io.EOF
	}
	c.n++
	var perr *csv.ParseError
	if errors.As(err, &perr) {
		return CSVRecord{N: c.n, Line: int64(perr.Line), Err: perr}, nil
	}
	if err != nil {
		return CSVRecord{}, err
	}
	// The line the record ends on: its last field's first line plus the line breaks
	// inside that field (encoding/csv turns a quoted \r\n into \n).
	last := len(f) - 1
	line, _ := c.r.FieldPos(last)
	return CSVRecord{Fields: f, N: c.n, Line: int64(line + strings.Count(f[last], "\n")), Err: nil}, nil
}

// CSVIndex is what a first pass over a CSV file learns: how many records it holds,
// the line the last one ends on, and the line of each record.
type CSVIndex struct {
	Records  int64 // records after the header
	LastLine int64 // the line the last record ends on (1: only the header)
	// jumps holds, for each record after which records no longer end on the line
	// numbered N+1 (some record before spans lines or blank lines were skipped),
	// the record's number and how many lines records from there on are off by.
	jumps []csvJump
}

type csvJump struct{ n, extra int64 }

// IndexCSV reads r, a whole CSV file with a header, and returns its index. Its
// memory is one entry per record spanning lines (or blank line), not per record.
func IndexCSV(r io.Reader) (CSVIndex, error) {
	c, err := NewCSV(r)
	if err != nil {
		return CSVIndex{}, err
	}
	x := CSVIndex{LastLine: 1}
	var extra int64
	for {
		rec, err := c.Next()
		if errors.Is(err, io.EOF) {
			return x, nil
		}
		if err != nil {
			return x, fmt.Errorf("record %d: %w", c.n, err)
		}
		x.Records, x.LastLine = rec.N, rec.Line
		if e := rec.Line - (rec.N + 1); e != extra {
			extra = e
			x.jumps = append(x.jumps, csvJump{n: rec.N, extra: e})
		}
	}
}

// Line returns the line record n ends on.
func (x CSVIndex) Line(n int64) int64 {
	i := sort.Search(len(x.jumps), func(i int) bool { return x.jumps[i].n > n })
	if i == 0 {
		return n + 1
	}
	return n + 1 + x.jumps[i-1].extra
}
