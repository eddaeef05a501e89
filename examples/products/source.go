package main

import (
	"context"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/pgetl/pgetl/examples/internal/jobkit"
	"github.com/pgetl/pgetl/internal/workload"
)

// row is one source row: its position (the cursor committed with its batch) and its
// values in the order of workload.Columns.
type row struct {
	pos    int64 // row number (api, synthetic) or line number in the file (csv)
	sku    string
	values []any
}

// source yields the rows after a resume position, in increasing pos order.
type source interface {
	// Next returns the next row, or io.EOF after the last one.
	Next(ctx context.Context) (row, error)
	// Total returns the number of rows of the whole source, and the pos of its last
	// row (for a job that reaches it, every row is accounted for).
	Total() (rows, last int64)
	// Where describes pos for messages: "row 17", "file.csv line 18".
	Where(pos int64) string
	Close() error
}

// badValue stands for a source field that cannot be parsed. Its driver.Value fails
// with the reason, so BatchSession.Add refuses the row with its column: under
// pgetl.RejectToTable the row goes to the reject table (its raw text kept), under
// pgetl.RejectFail the job stops at it with its position.
type badValue struct{ err *fieldError }

// fieldError is why a source field was refused.
type fieldError struct {
	Column string
	Raw    string
	Reason string
}

func (e *fieldError) Error() string {
	return fmt.Sprintf("%s %q: %s", e.Column, truncate(e.Raw, 80), e.Reason)
}

func (b badValue) Value() (driver.Value, error) { return nil, b.err }
func (b badValue) String() string               { return b.err.Raw }
func (b badValue) GoString() string             { return strconv.Quote(truncate(b.err.Raw, 80)) }
func (b badValue) MarshalJSON() ([]byte, error) { return json.Marshal(b.err.Raw) }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// parseFields turns the five text fields of a product (from a CSV line or an API
// item) into values for the batch; a field that does not parse becomes a badValue.
// A record with the wrong number of fields is one badValue in the sku column
// holding the whole record.
func parseFields(f []string, raw string) (sku string, values []any) {
	if len(f) != len(workload.Columns) {
		return "", []any{badValue{&fieldError{Column: "record", Raw: raw,
			Reason: fmt.Sprintf("%d fields, want %d (%s)", len(f), len(workload.Columns), workload.CSVHeader)}},
			nil, nil, nil, nil}
	}
	values = make([]any, 5)
	bad := func(i int, reason string) {
		values[i] = badValue{&fieldError{Column: workload.Columns[i], Raw: f[i], Reason: reason}}
	}
	sku = f[0]
	if sku == "" {
		bad(0, "empty")
	} else {
		values[0] = sku
	}
	values[1] = f[1]
	var price pgtype.Numeric
	if err := price.Scan(f[2]); err != nil || !price.Valid || price.NaN || price.InfinityModifier != pgtype.Finite {
		bad(2, "not a decimal number")
	} else {
		values[2] = price
	}
	if inv, err := strconv.ParseInt(f[3], 10, 32); err != nil {
		bad(3, "not a 32-bit integer")
	} else {
		values[3] = int32(inv)
	}
	if t, err := workload.ParseTimestamp(f[4]); err != nil {
		bad(4, "not an RFC 3339 or PostgreSQL timestamp (2024-01-12T13:46:41Z, 2024-01-12 13:46:41+00)")
	} else {
		values[4] = t
	}
	return sku, values
}

// generator says which generated rows changed and which are missing (-changed-every,
// -missing-every): row i is at the run's version if changedEvery is 0 or divides
// i, else at version 1, and absent if i%missingEvery == missingEvery-1.
type generator struct{ changedEvery, missingEvery int64 }

// total returns the rows 1..n holds and the last of them (0 if none).
func (g generator) total(n int64) (rows, last int64) {
	rows = n
	switch m := g.missingEvery; {
	case m == 1:
		rows = 0
	case m > 1:
		rows = n - (n+1)/m
	}
	for last = n; last > 0 && workload.Missing(last, g.missingEvery); last-- {
	}
	return rows, last
}

// synthetic is the workload generator in memory: rows after..n at version v.
type synthetic struct {
	i, n, v int64
	gen     generator
}

func (s *synthetic) Next(context.Context) (row, error) {
	for s.i < s.n {
		s.i++
		if workload.Missing(s.i, s.gen.missingEvery) {
			continue
		}
		p := workload.Row(s.i, workload.SyncVersion(s.i, s.v, s.gen.changedEvery))
		return row{pos: s.i, sku: p.SKU, values: p.Values()}, nil
	}
	return row{}, io.EOF
}

func (s *synthetic) Total() (int64, int64)  { return s.gen.total(s.n) }
func (s *synthetic) Where(pos int64) string { return "row " + strconv.FormatInt(pos, 10) }
func (s *synthetic) Close() error           { return nil }

// csvSource reads a file of workload.CSVHeader columns (what psql's \copy … TO
// (FORMAT csv, HEADER) writes): quoted fields may hold commas, quotes and line
// breaks, so a record may span lines. The cursor is the line a record ends on (the
// header is line 1), so a record on one line has its line number.
type csvSource struct {
	path  string
	f     *os.File
	r     *jobkit.CSV
	after int64
	total int64 // records after the header
	last  int64 // the line the last one ends on
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
		return nil, fmt.Errorf("csv %s: %w (want the header %q)", path, err, workload.CSVHeader)
	}
	if h := r.Header(); h != workload.CSVHeader {
		f.Close()
		return nil, fmt.Errorf("csv %s line 1: header %q, want %q", path, truncate(h, 80), workload.CSVHeader)
	}
	return &csvSource{path: path, f: f, r: r, after: after, total: x.Records, last: x.LastLine}, nil
}

func (s *csvSource) Next(context.Context) (row, error) {
	for {
		rec, err := s.r.Next()
		if errors.Is(err, io.EOF) {
			return row{}, io.EOF
		}
		if err != nil {
			return row{}, fmt.Errorf("csv %s: %w", s.path, err)
		}
		if rec.Line <= s.after {
			continue
		}
		f, raw := rec.Fields, strings.Join(rec.Fields, ",")
		if rec.Err != nil {
			// A quoting error: the record is refused whole.
			raw = rec.Err.Error()
			f = []string{raw}
		}
		sku, values := parseFields(f, raw)
		return row{pos: rec.Line, sku: sku, values: values}, nil
	}
}

func (s *csvSource) Total() (int64, int64) { return s.total, s.last }
func (s *csvSource) Where(pos int64) string {
	return s.path + " line " + strconv.FormatInt(pos, 10)
}
func (s *csvSource) Close() error { return s.f.Close() }

// apiSource pages through the API. A goroutine fetches ahead (up to four pages),
// so the API's latency overlaps the loading; it is stopped by Close.
type apiSource struct {
	n, size int64
	gen     generator
	client  *apiClient
	pages   chan pageResult
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	cur   *apiPage
	k     int   // next item of cur
	first int64 // row number of cur.Items[0]
	after int64
	done  bool
}

type pageResult struct {
	p   *apiPage
	err error
}

func openAPI(c *apiClient, n, after int64, gen generator) *apiSource {
	ctx, cancel := context.WithCancel(context.Background())
	s := &apiSource{n: n, size: c.size, gen: gen, client: c, pages: make(chan pageResult, 4), cancel: cancel, after: after}
	start := after/c.size + 1 // the page holding row after+1
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(s.pages)
		for page := start; ; page++ {
			p, err := c.fetch(ctx, page)
			select {
			case s.pages <- pageResult{p, err}:
			case <-ctx.Done():
				return
			}
			if err != nil || p.NextPage == 0 {
				return
			}
		}
	}()
	return s
}

func (s *apiSource) Next(ctx context.Context) (row, error) {
	for {
		if s.cur != nil && s.k < len(s.cur.Items) {
			it := s.cur.Items[s.k]
			i := s.first + int64(s.k)
			if it.Row != 0 {
				i = it.Row // rows of the page are missing
			}
			s.k++
			if i <= s.after {
				continue
			}
			raw, _ := json.Marshal(it)
			sku, values := parseFields([]string{it.SKU, it.Name, it.Price, strconv.FormatInt(it.Inventory, 10), it.UpdatedAt}, string(raw))
			return row{pos: i, sku: sku, values: values}, nil
		}
		if s.done {
			return row{}, io.EOF
		}
		select {
		case <-ctx.Done():
			return row{}, ctx.Err()
		case r, ok := <-s.pages:
			if !ok {
				s.done = true
				return row{}, io.EOF
			}
			if r.err != nil {
				return row{}, r.err
			}
			s.cur, s.k, s.first = r.p, 0, (r.p.Page-1)*s.size+1
			if r.p.NextPage == 0 {
				s.done = true
			}
		}
	}
}

func (s *apiSource) Total() (int64, int64) { return s.gen.total(s.n) }
func (s *apiSource) Where(pos int64) string {
	return fmt.Sprintf("row %d (api page %d)", pos, (pos-1)/s.size+1)
}

func (s *apiSource) Close() error {
	s.cancel()
	for range s.pages {
		// Drain, so that the fetcher is not blocked on a send.
	}
	s.wg.Wait()
	s.client.http.CloseIdleConnections()
	return nil
}

// newAPIClient returns the client of the in-process API.
func newAPIClient(base string, size int64, onRetry func()) *apiClient {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 4
	return &apiClient{base: base, size: size, http: &http.Client{Timeout: 15 * time.Second, Transport: tr},
		attempts: 5, retries: onRetry}
}
