package pgtest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

// containerProcess is the running `go run ./cmd/pgcontainer` of the test-kit module
// (see the package doc): it holds a PostgreSQL container until its stdin closes.
type containerProcess struct {
	url    string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr *syncBuffer
}

// testkitDir returns the directory of the test-kit module, next to this package in
// pgetl's source tree.
func testkitDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate pgtest's source file")
	}
	dir := filepath.Join(filepath.Dir(file), "..", "testkit")
	if _, err := os.Stat(filepath.Join(dir, "cmd", "pgcontainer", "main.go")); err != nil {
		return "", fmt.Errorf("no test-kit module next to pgtest (a source checkout of pgetl is needed): %w", err)
	}
	return dir, nil
}

// startContainer runs the pgcontainer command and waits up to timeout (building it,
// pulling the image, starting the server) for the connection string it prints.
func startContainer(timeout time.Duration) (*containerProcess, error) {
	dir, err := testkitDir()
	if err != nil {
		return nil, err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("the container fallback runs the go command: %w", err)
	}
	cmd := exec.Command(goBin, "run", "./cmd/pgcontainer")
	cmd.Dir = dir
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr := new(syncBuffer)
	cmd.Stderr = stderr
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("go run ./cmd/pgcontainer: %w", err)
	}
	p := &containerProcess{cmd: cmd, stdin: stdin, stderr: stderr}

	type line struct {
		s   string
		err error
	}
	first := make(chan line, 1)
	go func() {
		s, err := bufio.NewReader(stdout).ReadString('\n')
		first <- line{strings.TrimSpace(s), err}
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case l := <-first:
		if l.err == nil && l.s != "" {
			p.url = l.s
			return p, nil
		}
		// EOF: the command failed; Wait reaps it and stderr says why.
		_ = stdin.Close()
		waitErr := cmd.Wait()
		return nil, fmt.Errorf("go run ./cmd/pgcontainer (in %s): %v: %s", dir, waitErr, tail(stderr.String(), 20))
	case <-timer.C:
		_ = cmd.Process.Kill()
		_ = cmd.Wait() // closes stdout, which ends the reader
		<-first
		return nil, fmt.Errorf("go run ./cmd/pgcontainer (in %s): no connection string within %v: %s", dir, timeout, tail(stderr.String(), 20))
	}
}

// stop closes the command's stdin, which stops and removes the container, and waits
// up to timeout for the command to exit (then kills it).
func (p *containerProcess) stop(timeout time.Duration) error {
	_ = p.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("pgcontainer: %v: %s", err, tail(p.stderr.String(), 20))
		}
		return nil
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-done
		return fmt.Errorf("pgcontainer did not stop within %v; killed (testcontainers' reaper removes the container)", timeout)
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// syncBuffer is a bytes.Buffer safe for the writer goroutine of exec.Cmd and a
// reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
