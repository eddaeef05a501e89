package main

import (
	"fmt"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/pgetl/pgetl"
)

// progress shows the run's progress on stderr until stop: a bar on a terminal,
// else a log line every -progress-every.
type progress struct {
	done chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

func startProgress(j *job, sess *pgetl.Session, remaining, after int64) *progress {
	p := &progress{done: make(chan struct{})}
	mode := j.cfg.progress
	if mode == "auto" {
		mode = "log"
		if j.cfg.tty {
			mode = "bar"
		}
	}
	if mode == "off" {
		return p
	}
	status := func() string {
		st := sess.Stat()
		return fmt.Sprintf("committed %d · retries %d · rejects %d", st.Rows(), st.TotalRetries()+j.apiRetries.Load(), st.Rejects())
	}
	p.wg.Add(1)
	if mode == "bar" {
		desc := "loading"
		if after > 0 {
			desc = "resuming"
		}
		bar := progressbar.NewOptions64(remaining,
			progressbar.OptionSetWriter(j.stderr),
			progressbar.OptionSetDescription(desc),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString("rows"),
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
					_ = bar.Set64(j.read.Load())
					bar.Describe(status())
				case <-p.done:
					_ = bar.Set64(j.read.Load())
					bar.Describe(status())
					_ = bar.Exit()
					fmt.Fprintln(j.stderr)
					return
				}
			}
		}()
		return p
	}
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(j.cfg.progressEvery)
		defer t.Stop()
		start := time.Now()
		line := func() {
			n := j.read.Load()
			st := sess.Stat()
			rate := float64(n) / time.Since(start).Seconds()
			eta := "unknown"
			if rate > 0 && remaining >= n {
				eta = time.Duration(float64(remaining-n) / rate * float64(time.Second)).Round(time.Second).String()
			}
			j.log.Info("progress", "read", n, "of", remaining, "committed", st.Rows(),
				"rows_per_s", int64(rate), "eta", eta, "retries", st.TotalRetries()+j.apiRetries.Load(), "rejects", st.Rejects())
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

func (p *progress) stop() {
	p.once.Do(func() { close(p.done) })
	p.wg.Wait()
}
