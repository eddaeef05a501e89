package faultproxy

import (
	"sync/atomic"
	"testing"

	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
)

// One-shot faults: each strikes exactly one connection and then lets everything
// through, so that a test can count faults against failed attempts (a toxic left in
// force would also fail the retries that follow).

const onceType = "pgetl_once"

func init() { toxics.Register(onceType, new(onceToxic)) }

// CutOnce closes the first connection through which more than n bytes pass in
// direction dir (counted per connection from when the toxic is added, or from its
// start for later connections) after letting n bytes through; with reset, it closes
// with a TCP RST on both sides instead of a FIN. Every other connection, and that
// one's successors, pass untouched. The toxic is called "once_<dir>"; Fired reports
// whether it struck. n = 0 with reset is a one-shot connection reset at the next
// data in dir.
func (p *Proxy) CutOnce(t testing.TB, dir Direction, n int64, reset bool) string {
	t.Helper()
	name := "once_" + string(dir)
	if reset {
		// relayConn.Close closes with an RST while a reset toxic is registered.
		defer func() {
			p.mu.Lock()
			p.resets[name] = true
			p.mu.Unlock()
		}()
	}
	return p.AddToxic(t, name, onceType, dir, map[string]any{"bytes": n})
}

// Fired reports whether the one-shot toxic name (see CutOnce) has struck.
func (p *Proxy) Fired(name string) bool {
	w := p.px.Toxics.GetToxic(name)
	if w == nil {
		return false
	}
	o, ok := w.Toxic.(*onceToxic)
	return ok && o.fired.Load()
}

// onceToxic cuts the first connection to pass Bytes bytes, then passes everything.
type onceToxic struct {
	Bytes int64       `json:"bytes"`
	fired atomic.Bool // shared by every link of the toxic
}

// NewState implements toxics.StatefulToxic.
func (o *onceToxic) NewState() any { return new(cutState) }

// Pipe implements toxics.Toxic.
func (o *onceToxic) Pipe(stub *toxics.ToxicStub) {
	state := stub.State.(*cutState)
	for {
		select {
		case <-stub.Interrupt:
			return
		case chunk := <-stub.Input:
			if chunk == nil {
				stub.Close()
				return
			}
			left := o.Bytes - state.sent
			if o.fired.Load() || int64(len(chunk.Data)) <= left || !o.fired.CompareAndSwap(false, true) {
				state.sent += int64(len(chunk.Data))
				stub.Output <- chunk
				continue
			}
			if left > 0 {
				stub.Output <- &stream.StreamChunk{Data: chunk.Data[:left], Timestamp: chunk.Timestamp}
			}
			stub.Close()
			drain(stub)
			return
		}
	}
}
