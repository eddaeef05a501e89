// Command benchreport summarizes `go test -bench` output for pgetl's benchmark
// suite: the median of each benchmark's rows/s across -count runs and its ratio to
// the one-transaction CopyFrom baseline of the same run.
//
// Usage:
//
//	go run ./internal/benchreport [-baseline regexp] [bench.out]
//
// It reads the file named by its argument, or standard input. Results are grouped
// by package (the `pkg:` lines) and benchmark name, without the -GOMAXPROCS
// suffix. Benchmarks that report rows/s are listed with their median rows/s, the
// spread of the runs around it, the ratio to the baseline's median and, when
// reported, the median B/row. Other benchmarks (cache lookups, for example) are
// listed with their median ns/op and any other custom metric such as B/key.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Units of the metrics given columns of their own.
const (
	unitRows   = "rows/s"
	unitBRow   = "B/row"
	unitNsOp   = "ns/op"
	defaultRgx = `Baseline.*one_?tx`
)

// standard are the units go test itself reports, left out of the "other" column.
var standard = map[string]bool{unitNsOp: true, "B/op": true, "allocs/op": true, "MB/s": true}

func main() {
	baseline := flag.String("baseline", defaultRgx, "regexp matching the baseline benchmark's name")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: benchreport [-baseline regexp] [bench.out]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := run(os.Stdout, flag.Args(), *baseline); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}

func run(w io.Writer, args []string, baseline string) error {
	re, err := regexp.Compile(baseline)
	if err != nil {
		return fmt.Errorf("-baseline: %w", err)
	}
	var in io.Reader = os.Stdin
	switch len(args) {
	case 0:
	case 1:
		f, err := os.Open(args[0])
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	default:
		return errors.New("at most one file argument")
	}
	results, err := parse(in)
	if err != nil {
		return err
	}
	if len(results) == 0 {
		return errors.New("no benchmark results in input")
	}
	return report(w, results, re)
}

// result is one benchmark's runs.
type result struct {
	pkg     string
	name    string               // without the -GOMAXPROCS suffix
	metrics map[string][]float64 // unit → one value per run
	units   []string             // units in order of first appearance
}

// parse reads go test -bench output and returns the results in order of first
// appearance.
func parse(r io.Reader) ([]*result, error) {
	type line struct {
		pkg, name string
		vals      []float64
		units     []string
	}
	var lines []line
	pkg := ""
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		text := sc.Text()
		if p, ok := strings.CutPrefix(text, "pkg: "); ok {
			pkg = strings.TrimSpace(p)
			continue
		}
		if !strings.HasPrefix(text, "Benchmark") {
			continue
		}
		f := strings.Fields(text)
		// Name, iterations, then value-unit pairs; anything else (a benchmark's
		// own log line, a name printed alone under -v) is not a result.
		if len(f) < 4 || len(f)%2 != 0 {
			continue
		}
		if _, err := strconv.ParseInt(f[1], 10, 64); err != nil {
			continue
		}
		l := line{pkg: pkg, name: f[0]}
		ok := true
		for i := 2; i < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				ok = false
				break
			}
			l.vals = append(l.vals, v)
			l.units = append(l.units, f[i+1])
		}
		if ok {
			lines = append(lines, l)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}

	// go test appends -GOMAXPROCS to every name unless it is 1, so strip the
	// suffix only when every line has the same one: "chunk-1000" and
	// "chunk-10000" run at GOMAXPROCS=1 keep their names, and so do the runs of
	// -cpu 2,4, which stay apart.
	suffix := ""
	strip := len(lines) > 0
	for _, l := range lines {
		s := procs.FindString(l.name)
		if s == "" || (suffix != "" && s != suffix) {
			strip = false
			break
		}
		suffix = s
	}
	var results []*result
	byKey := map[[2]string]*result{}
	for _, l := range lines {
		name := l.name
		if strip {
			name = procs.ReplaceAllString(name, "")
		}
		key := [2]string{l.pkg, name}
		res := byKey[key]
		if res == nil {
			res = &result{pkg: l.pkg, name: name, metrics: map[string][]float64{}}
			byKey[key] = res
			results = append(results, res)
		}
		for i, u := range l.units {
			if _, seen := res.metrics[u]; !seen {
				res.units = append(res.units, u)
			}
			res.metrics[u] = append(res.metrics[u], l.vals[i])
		}
	}
	return results, nil
}

// procs matches the -GOMAXPROCS suffix of a benchmark name.
var procs = regexp.MustCompile(`-\d+$`)

// median returns the median of vs (the mean of the middle two for an even count).
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// spread returns the largest distance of vs from m, relative to m, in percent.
func spread(vs []float64, m float64) float64 {
	d := 0.0
	for _, v := range vs {
		d = max(d, math.Abs(v-m))
	}
	if m == 0 {
		return 0
	}
	return 100 * d / m
}

func report(w io.Writer, results []*result, baseline *regexp.Regexp) error {
	var base *result
	for _, r := range results {
		if len(r.metrics[unitRows]) > 0 && baseline.MatchString(r.name) {
			base = r
			break
		}
	}
	baseRate := math.NaN()
	if base != nil {
		baseRate = median(base.metrics[unitRows])
	}

	var rates, others []*result
	for _, r := range results {
		if len(r.metrics[unitRows]) > 0 {
			rates = append(rates, r)
		} else {
			others = append(others, r)
		}
	}
	multiPkg := false
	for _, r := range results {
		if r.pkg != results[0].pkg {
			multiPkg = true
		}
	}
	label := func(r *result) string {
		if multiPkg && r.pkg != "" {
			return r.pkg[strings.LastIndex(r.pkg, "/")+1:] + "." + r.name
		}
		return r.name
	}
	// extra renders the medians of r's metrics that have no column of their own.
	extra := func(r *result, own ...string) string {
		var out []string
		for _, u := range r.units {
			if !standard[u] && !slices.Contains(own, u) {
				out = append(out, strconv.FormatFloat(median(r.metrics[u]), 'g', 4, 64)+" "+u)
			}
		}
		return strings.Join(out, "  ")
	}

	if len(rates) > 0 {
		if base != nil {
			fmt.Fprintf(w, "baseline: %s (median %s rows/s)\n\n", label(base), formatRate(baseRate))
		} else {
			fmt.Fprintf(w, "baseline: no benchmark with rows/s matches %q: ratios not shown\n\n", baseline)
		}
		t := table{header: []string{"benchmark", "runs", "rows/s", "±", "ratio", "B/row", "other"}}
		for _, r := range rates {
			rows := r.metrics[unitRows]
			m := median(rows)
			ratio := "-"
			if baseRate > 0 {
				ratio = fmt.Sprintf("%.2f", m/baseRate)
			}
			brow := "-"
			if b := r.metrics[unitBRow]; len(b) > 0 {
				brow = strconv.FormatFloat(median(b), 'f', 0, 64)
			}
			t.add(label(r), strconv.Itoa(len(rows)), formatRate(m), fmt.Sprintf("%.0f%%", spread(rows, m)),
				ratio, brow, extra(r, unitRows, unitBRow))
		}
		if err := t.write(w); err != nil {
			return err
		}
	}
	if len(others) > 0 {
		if len(rates) > 0 {
			fmt.Fprintln(w)
		}
		t := table{header: []string{"benchmark", "runs", "ns/op", "±", "other"}}
		for _, r := range others {
			ns := r.metrics[unitNsOp]
			m := median(ns)
			t.add(label(r), strconv.Itoa(len(ns)), strconv.FormatFloat(m, 'g', 4, 64),
				fmt.Sprintf("%.0f%%", spread(ns, m)), extra(r))
		}
		if err := t.write(w); err != nil {
			return err
		}
	}
	return nil
}

// table is a text table with its first and last columns aligned left and the
// others, numbers, aligned right.
type table struct {
	header []string
	rows   [][]string
}

func (t *table) add(cells ...string) { t.rows = append(t.rows, cells) }

func (t *table) write(w io.Writer) error {
	width := make([]int, len(t.header))
	for _, row := range append([][]string{t.header}, t.rows...) {
		for i, c := range row {
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	var b strings.Builder
	for _, row := range append([][]string{t.header}, t.rows...) {
		for i, c := range row {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			switch {
			case i == 0:
				b.WriteString(c + pad)
			case i == len(row)-1:
				b.WriteString("  " + c)
			default:
				b.WriteString("  " + pad + c)
			}
		}
		s := strings.TrimRight(b.String(), " ")
		b.Reset()
		if _, err := io.WriteString(w, s+"\n"); err != nil {
			return err
		}
	}
	return nil
}

// formatRate renders a rows/s value with thousands separators.
func formatRate(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	s := strconv.FormatFloat(math.Round(v), 'f', 0, 64)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
