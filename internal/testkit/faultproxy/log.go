package faultproxy

import (
	"strings"
	"sync"
	"testing"
)

// logWriter forwards lines to t.Log until closed (t.Log after a test ends panics).
type logWriter struct {
	mu     sync.Mutex
	t      testing.TB
	prefix string
	closed bool
}

func newLogWriter(t testing.TB, prefix string) *logWriter {
	w := &logWriter{t: t, prefix: prefix}
	t.Cleanup(w.close)
	return w
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.t.Log(w.prefix + strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *logWriter) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}
