package jobkit

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/pgetl/pgetl"
)

// ProgressConfig says what Progress shows and where.
type ProgressConfig struct {
	Mode      string // auto (a bar on a terminal, else log lines), bar, log or off
	TTY       bool   // W is a terminal
	W         io.Writer
	Log       *slog.Logger
	Every     time.Duration // interval of the log lines
	Remaining int64         // source rows this run has to read
	Resuming  bool
	Unit      string // "rows", "lines"
	// Read returns the source rows read so far, Session the job's session.
	Read    func() int64
	Session *pgetl.Session
	// OtherRetries, if set, returns retries outside the database (an API's).
	OtherRetries func() int64
}

// Progress shows a run's progress until Stop: a bar on a terminal, else a log line
// every Every.
type Progress struct {
	done chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

// StartProgress starts showing progress as cfg says.
func StartProgress(cfg ProgressConfig) *Progress {
	p := &Progress{done: make(chan struct{})}
	mode := cfg.Mode
	if mode == "auto" {
		mode = "log"
		if cfg.TTY {
			mode = "bar"
		}
	}
	if mode == "off" {
		return p
	}
	if cfg.Unit == "" {
		cfg.Unit = "rows"
	}
	retries := func(st pgetl.Stat) int64 {
		n := st.TotalRetries()
		if cfg.OtherRetries != nil {
			n += cfg.OtherRetries()
		}
		return n
	}
	status := func() string {
		st := cfg.Session.Stat()
		return fmt.Sprintf("committed %d · retries %d · rejects %d", st.Rows(), retries(st), st.Rejects())
	}
	p.wg.Add(1)
	if mode == "bar" {
		desc := "loading"
		if cfg.Resuming {
			desc = "resuming"
		}
		bar := progressbar.NewOptions64(cfg.Remaining,
			progressbar.OptionSetWriter(cfg.W),
			progressbar.OptionSetDescription(desc),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString(cfg.Unit),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionShowDescriptionAtLineEnd(),
			progressbar.OptionSetRenderBlankState(true),
		)
		go func() {
			defer p.wg.Done()
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					_ = bar.Set64(cfg.Read())
					bar.Describe(status())
				case <-p.done:
					_ = bar.Set64(cfg.Read())
					bar.Describe(status())
					_ = bar.Exit()
					fmt.Fprintln(cfg.W)
					return
				}
			}
		}()
		return p
	}
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(cfg.Every)
		defer t.Stop()
		start := time.Now()
		line := func() {
			n := cfg.Read()
			st := cfg.Session.Stat()
			rate := float64(n) / time.Since(start).Seconds()
			eta := "unknown"
			if rate > 0 && cfg.Remaining >= n {
				eta = time.Duration(float64(cfg.Remaining-n) / rate * float64(time.Second)).Round(time.Second).String()
			}
			cfg.Log.Info("progress", "read", n, "of", cfg.Remaining, "committed", st.Rows(),
				"rows_per_s", int64(rate), "eta", eta, "retries", retries(st), "rejects", st.Rejects())
		}
		for {
			select {
			case <-t.C:
				line()
			case <-p.done:
				line() // the final state, also of a run shorter than the interval
				return
			}
		}
	}()
	return p
}

// Stop stops the display after showing the final state; it is idempotent.
func (p *Progress) Stop() {
	p.once.Do(func() { close(p.done) })
	p.wg.Wait()
}
