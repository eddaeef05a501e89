package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/pgetl/pgetl/internal/workload"
)

// apiItem is one product as the API serves it. The price travels as a decimal
// string, as money should in JSON.
type apiItem struct {
	SKU       string `json:"sku"`
	Name      string `json:"name"`
	Price     string `json:"price"`
	Inventory int64  `json:"inventory"`
	UpdatedAt string `json:"updated_at"`
	Row       int64  `json:"row,omitempty"` // the item's row number (set when rows are missing)
}

// apiPage is one page of GET /products?page=P&size=S (pages from 1).
type apiPage struct {
	Page     int64     `json:"page"`
	Size     int64     `json:"size"`
	Total    int64     `json:"total"`
	NextPage int64     `json:"next_page"`         // 0 on the last page
	Missing  int64     `json:"missing,omitempty"` // rows of the page absent from the catalogue
	Items    []apiItem `json:"items"`
}

// apiServer is the in-process product API: it serves rows 1..rows of the workload
// at version, with a per-page delay, and the faults of a real catalogue API: a
// fraction of pages answer 503 to their first request, the same fraction is served
// five times slower, and optionally one page is malformed (for testing).
type apiServer struct {
	rows, version int64
	gen           generator // rows changed and missing
	delay         time.Duration
	faultRate     float64
	malformedPage int64

	srv *http.Server
	ln  net.Listener
	wg  sync.WaitGroup

	mu     sync.Mutex     // guards failed
	failed map[int64]bool // pages that already answered their 503
}

// startAPI starts the server on 127.0.0.1 (an ephemeral port, loopback only).
func startAPI(rows, version int64, gen generator, delay time.Duration, faultRate float64, malformedPage int64) (*apiServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("api: listen: %w", err)
	}
	a := &apiServer{rows: rows, version: version, gen: gen, delay: delay, faultRate: faultRate,
		malformedPage: malformedPage, ln: ln, failed: map[int64]bool{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /products", a.products)
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		_ = a.srv.Serve(ln)
	}()
	return a, nil
}

// URL returns the base URL of the server.
func (a *apiServer) URL() string { return "http://" + a.ln.Addr().String() }

// Close stops the server and waits for its goroutines.
func (a *apiServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := a.srv.Shutdown(ctx)
	a.wg.Wait()
	return err
}

// faulty reports whether page p is one of the fraction rate of pages picked for a
// fault of kind k (deterministic: the same pages on every run).
func faulty(p int64, k string, rate float64) bool {
	if rate <= 0 {
		return false
	}
	h := fnv.New64a()
	fmt.Fprintf(h, "%s/%d", k, p)
	return float64(h.Sum64()%1_000_000) < rate*1_000_000
}

func (a *apiServer) products(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	page, err1 := strconv.ParseInt(q.Get("page"), 10, 64)
	size, err2 := strconv.ParseInt(q.Get("size"), 10, 64)
	if err1 != nil || err2 != nil || page < 1 || size < 1 || size > 10_000 {
		http.Error(w, "bad page or size", http.StatusBadRequest)
		return
	}
	delay := a.delay
	if faulty(page, "slow", a.faultRate) {
		delay *= 5
	}
	if delay > 0 {
		// The API's own latency (the server side of a slow catalogue).
		t := time.NewTimer(delay)
		select {
		case <-r.Context().Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
	if faulty(page, "503", a.faultRate) {
		a.mu.Lock()
		first := !a.failed[page]
		a.failed[page] = true
		a.mu.Unlock()
		if first {
			http.Error(w, "upstream busy, retry", http.StatusServiceUnavailable)
			return
		}
	}
	if page == a.malformedPage {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"page":`+strconv.FormatInt(page, 10)+`,"items":[{"sku":"SKU-`)
		return
	}
	out := apiPage{Page: page, Size: size, Total: a.rows}
	from := (page-1)*size + 1
	to := min(from+size-1, a.rows)
	if to < a.rows {
		out.NextPage = page + 1
	}
	out.Items = make([]apiItem, 0, max(to-from+1, 0))
	for i := from; i <= to; i++ {
		if workload.Missing(i, a.gen.missingEvery) {
			out.Missing++
			continue
		}
		p := workload.Row(i, workload.SyncVersion(i, a.version, a.gen.changedEvery))
		it := apiItem{SKU: p.SKU, Name: p.Name, Price: p.PriceString(),
			Inventory: int64(p.Inventory), UpdatedAt: p.UpdatedAt.Format(time.RFC3339)}
		if a.gen.missingEvery > 0 {
			it.Row = i
		}
		out.Items = append(out.Items, it)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

// apiClient fetches pages with a real HTTP client, retrying transient failures
// (network errors, timeouts, 429 and 5xx, truncated or malformed bodies) with
// jittered exponential backoff.
type apiClient struct {
	base     string
	size     int64
	http     *http.Client
	attempts int
	retries  func() // called before each retry (counted in the summary)
}

// errMalformed marks a page whose body is not the JSON the API promises.
var errMalformed = errors.New("malformed page")

type httpStatusError struct{ code int }

func (e *httpStatusError) Error() string { return "HTTP " + strconv.Itoa(e.code) }

func (c *apiClient) fetch(ctx context.Context, page int64) (*apiPage, error) {
	url := c.base + "/products?page=" + strconv.FormatInt(page, 10) + "&size=" + strconv.FormatInt(c.size, 10)
	var last error
	for n := 1; n <= c.attempts; n++ {
		p, err := c.get(ctx, url, page)
		if err == nil {
			return p, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		last = err
		var se *httpStatusError
		if errors.As(err, &se) && se.code < 500 && se.code != http.StatusTooManyRequests {
			break // a client error is not going to change
		}
		if n == c.attempts {
			break
		}
		if c.retries != nil {
			c.retries()
		}
		bound := 100 * time.Millisecond << (n - 1)
		t := time.NewTimer(bound/2 + rand.N(bound/2))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
	return nil, fmt.Errorf("api: page %d (GET %s): %w (after %d attempts)", page, url, last, c.attempts)
}

func (c *apiClient) get(ctx context.Context, url string, page int64) (*apiPage, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil, &httpStatusError{resp.StatusCode}
	}
	var p apiPage
	dec := json.NewDecoder(io.LimitReader(resp.Body, 64<<20))
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("%w: %v", errMalformed, err)
	}
	switch {
	case p.Page != page:
		return nil, fmt.Errorf("%w: it says page %d", errMalformed, p.Page)
	case int64(len(p.Items))+p.Missing > c.size || p.Missing < 0:
		return nil, fmt.Errorf("%w: %d items and %d missing for page size %d", errMalformed, len(p.Items), p.Missing, c.size)
	case p.NextPage != 0 && p.NextPage != page+1:
		return nil, fmt.Errorf("%w: next_page %d after page %d", errMalformed, p.NextPage, page)
	case p.NextPage != 0 && int64(len(p.Items))+p.Missing < c.size:
		return nil, fmt.Errorf("%w: short page (%d items) with a next page", errMalformed, len(p.Items))
	}
	return &p, nil
}
