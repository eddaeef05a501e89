package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql/driver"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

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

// csvSource reads a file with the header workload.OrdersCSVHeader, one record per
// line. A record's pos is its number (1 for the line after the header).
type csvSource struct {
	path  string
	f     *os.File
	sc    *bufio.Scanner
	pos   int64
	after int64
	total int64
}

func openCSV(path string, after int64) (*csvSource, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("csv: %w", err)
	}
	lines, err := countLines(f)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("csv %s: %w", path, err)
	}
	s := &csvSource{path: path, f: f, sc: bufio.NewScanner(f), after: after, total: max(lines-1, 0)}
	s.sc.Buffer(make([]byte, 64<<10), 1<<20)
	if !s.sc.Scan() {
		f.Close()
		if err := s.sc.Err(); err != nil {
			return nil, fmt.Errorf("csv %s line 1: %w", path, err)
		}
		return nil, fmt.Errorf("csv %s: empty file, want the header %q", path, workload.OrdersCSVHeader)
	}
	if h := strings.TrimSuffix(strings.TrimPrefix(s.sc.Text(), "\ufeff"), "\r"); h != workload.OrdersCSVHeader {
		f.Close()
		return nil, fmt.Errorf("csv %s line 1: header %q, want %q", path, truncate(h, 80), workload.OrdersCSVHeader)
	}
	return s, nil
}

// countLines counts the lines of r (a last line without a newline counts).
func countLines(r io.Reader) (int64, error) {
	buf := make([]byte, 256<<10)
	var n int64
	var last byte = '\n'
	for {
		k, err := r.Read(buf)
		if k > 0 {
			n += int64(bytes.Count(buf[:k], []byte{'\n'}))
			last = buf[k-1]
		}
		if errors.Is(err, io.EOF) {
			if last != '\n' {
				n++
			}
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

func (s *csvSource) Next(context.Context) (record, error) {
	for s.sc.Scan() {
		s.pos++
		if s.pos <= s.after {
			continue
		}
		text := strings.TrimSuffix(s.sc.Text(), "\r")
		var f []string
		if strings.IndexByte(text, '"') < 0 {
			f = strings.Split(text, ",")
		} else {
			r := csv.NewReader(strings.NewReader(text))
			r.FieldsPerRecord = -1
			var err error
			if f, err = r.Read(); err != nil {
				f = []string{text} // a quoting error: the record is refused whole
			}
		}
		l, err := workload.ParseOrderCSV(f)
		rec := record{pos: s.pos, line: l, raw: text}
		if err != nil {
			var fe *workload.FieldError
			if !errors.As(err, &fe) {
				return record{}, err
			}
			rec.bad = fe
		}
		return rec, nil
	}
	if err := s.sc.Err(); err != nil {
		return record{}, fmt.Errorf("csv %s line %d: %w", s.path, s.pos+2, err)
	}
	return record{}, io.EOF
}

func (s *csvSource) Total() int64 { return s.total }
func (s *csvSource) Where(pos int64) string {
	return fmt.Sprintf("%s line %d", s.path, pos+1) // the header is line 1
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
