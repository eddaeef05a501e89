package pgetlriver_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgetl/pgetl/contrib/river/internal/products"
	"github.com/pgetl/pgetl/internal/pgtest"
)

// envHelper, when set in a subprocess of the test binary, makes TestMain run a
// worker process (helperSpec in JSON) instead of the tests.
const envHelper = "PGETLRIVER_TEST_WORKER"

// helperSpec configures a worker subprocess.
type helperSpec struct {
	Config  products.Config
	Options products.WorkerOptions
	// Trace prints "row <partition> <i>" on stdout for every 10th row added, so
	// the test knows how far a worker read before it was killed.
	Trace bool
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(envHelper); spec != "" {
		os.Exit(runHelperWorker(spec))
	}
	pgtest.Main(m)
}

// runHelperWorker is a worker process: products.Work (what the command's worker
// subcommand runs) until SIGTERM or SIGINT.
func runHelperWorker(spec string) int {
	var h helperSpec
	if err := json.Unmarshal([]byte(spec), &h); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	if h.Trace {
		var mu sync.Mutex
		h.Options.OnRow = func(partition string, i int64) {
			if i%10 == 0 {
				mu.Lock()
				fmt.Fprintf(os.Stdout, "row %s %d\n", partition, i) // unbuffered: seen up to a SIGKILL
				mu.Unlock()
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := products.Work(ctx, h.Config, h.Options); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	return 0
}

// proc is a worker subprocess.
type proc struct {
	id     string
	cmd    *exec.Cmd
	stderr bytes.Buffer
	done   chan struct{}
	err    error // of Wait, once done is closed

	mu   sync.Mutex
	last map[string]int64 // partition → last row traced
	buf  []byte
}

// Write parses the subprocess's trace lines.
func (p *proc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			break
		}
		f := strings.Fields(string(p.buf[:i]))
		p.buf = p.buf[i+1:]
		if len(f) == 3 && f[0] == "row" {
			if n, err := strconv.ParseInt(f[2], 10, 64); err == nil {
				p.last[f[1]] = max(p.last[f[1]], n)
			}
		}
	}
	return len(b), nil
}

func (p *proc) lastRow(partition string) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last[partition]
}

// startWorker starts a worker subprocess; it is stopped (SIGTERM, then SIGKILL
// after 30s) at cleanup unless the test ended it.
func startWorker(t *testing.T, h helperSpec) *proc {
	t.Helper()
	spec, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{id: h.Options.ClientID, done: make(chan struct{}), last: map[string]int64{}}
	p.cmd = exec.Command(os.Args[0], "-test.run=^$")
	p.cmd.Env = append(os.Environ(), envHelper+"="+string(spec))
	p.cmd.Stdout = p
	p.cmd.Stderr = &lockedWriter{w: &p.stderr, mu: &p.mu}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start worker %s: %v", p.id, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if err := p.stop(30 * time.Second); err != nil {
			t.Errorf("worker %s: %v", p.id, err)
		}
		if t.Failed() {
			t.Logf("worker %s stderr:\n%s", p.id, p.stderrText())
		}
	})
	return p
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (p *proc) stderrText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// stop ends the worker gracefully (SIGTERM) and reports a non-zero exit; after
// grace it kills it.
func (p *proc) stop(grace time.Duration) error {
	select {
	case <-p.done:
		return nil // already ended (killed by the test, or stopped before)
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("exited with %v", p.err)
		}
		return nil
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("did not stop within %v of SIGTERM; killed", grace)
	}
}

// kill SIGKILLs the worker and waits for it to be gone.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// eventually polls cond every interval until it returns true (returns nil), returns
// an error (returns it), or timeout passes (returns an error naming what).
func eventually(ctx context.Context, timeout, interval time.Duration, what string, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out after %v waiting for %s", timeout, what)
		case <-t.C:
		}
	}
}
