package main

import (
	"context"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/pgetl/pgetl/examples/internal/jobkit"
	"github.com/pgetl/pgetl/internal/workload"
)

// record is one source line: its number (the cursor committed with its batch) and
// its fields, or why they do not parse.
type record struct {
	pos  int64
	line workload.OrderLine
	bad  *workload.FieldError // a field that does not parse
	raw  string               // csv: the line as read
}

// source yields the lines after a resume position, in increasing pos order.
type source interface {
	// Next returns the next line, or io.EOF after the last one.
	Next(ctx context.Context) (record, error)
	// Total returns the number of lines of the whole source (the last one's pos).
	Total() int64
	// Where describes pos for messages: "line 17", "file.csv line 18".
	Where(pos int64) string
	Close() error
}

// synthetic is the orders generator: lines after..n.
type synthetic struct {
	o workload.Orders
	i int64
}

func (s *synthetic) Next(context.Context) (record, error) {
	if s.i >= s.o.N {
		return record{}, io.EOF
	}
	s.i++
	return record{pos: s.i, line: s.o.Line(s.i)}, nil
}

func (s *synthetic) Total() int64           { return s.o.N }
func (s *synthetic) Where(pos int64) string { return "line " + strconv.FormatInt(pos, 10) }
func (s *synthetic) Close() error           { return nil }

// csvSource reads a file with the header workload.OrdersCSVHeader (what psql's
// \copy … TO (FORMAT csv, HEADER) writes): quoted fields may hold commas, quotes and
// line breaks, so a record may span lines. A record's pos is its number (1 for the
// record after the header).
type csvSource struct {
	path  string
	f     *os.File
	r     *jobkit.CSV
	after int64
	index jobkit.CSVIndex // for Where: the line each record ends on
}

func openCSV(path string, after int64) (*csvSource, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("csv: %w", err)
	}
	x, err := jobkit.IndexCSV(f)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	var r *jobkit.CSV
	if err == nil {
		r, err = jobkit.NewCSV(f)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("csv %s: %w (want the header %q)", path, err, workload.OrdersCSVHeader)
	}
	if h := r.Header(); h != workload.OrdersCSVHeader {
		f.Close()
		return nil, fmt.Errorf("csv %s line 1: header %q, want %q", path, truncate(h, 80), workload.OrdersCSVHeader)
	}
	return &csvSource{path: path, f: f, r: r, after: after, index: x}, nil
}

func (s *csvSource) Next(context.Context) (record, error) {
	for {
		rec, err := s.r.Next()
		if errors.Is(err, io.EOF) {
			return record{}, io.EOF
		}
		if err != nil {
			return record{}, fmt.Errorf("csv %s: %w", s.path, err)
		}
		if rec.N <= s.after {
			continue
		}
		f, raw := rec.Fields, strings.Join(rec.Fields, ",")
		if rec.Err != nil {
			// A quoting error: the record is refused whole.
			raw = rec.Err.Error()
			f = []string{raw}
		}
		l, err := workload.ParseOrderCSV(f)
		out := record{pos: rec.N, line: l, raw: raw}
		if err != nil {
			var fe *workload.FieldError
			if !errors.As(err, &fe) {
				return record{}, err
			}
			out.bad = fe
		}
		return out, nil
	}
}

func (s *csvSource) Total() int64 { return s.index.Records }
func (s *csvSource) Where(pos int64) string {
	return fmt.Sprintf("%s line %d", s.path, s.index.Line(pos))
}
func (s *csvSource) Close() error { return s.f.Close() }

// badValue stands for a source field that cannot be parsed. Its driver.Value fails
// with the reason, so BatchSet.Add refuses the line naming its column: under
// pgetl.RejectToTable it goes to the reject table (its raw text kept).
type badValue struct{ err *workload.FieldError }

func (b badValue) Value() (driver.Value, error) { return nil, b.err }
func (b badValue) String() string               { return b.err.Raw }
func (b badValue) MarshalJSON() ([]byte, error) { return json.Marshal(b.err.Raw) }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
