// Package faultproxy is the network half of pgetl's fault kit: Proxy, Toxiproxy
// (github.com/Shopify/toxiproxy/v2) as an in-process library between a client and a
// server, for resets, cuts, lost replies or requests, latency and refused
// connections, each started on loopback and stopped in t.Cleanup.
//
// It lives in the test-kit module (github.com/pgetl/pgetl/internal/testkit), not in
// the core module's internal/faults, so that Toxiproxy and what it brings (zerolog,
// prometheus) stay out of the go.sum of programs that import pgetl. The rest of the
// fault kit (clusters, PgBouncer, black holes, the activity sampler, TCPAddr) is
// internal/faults of the core module.
//
// What a pgx v5 client sees (measured by this package's tests on Debian 12,
// PostgreSQL 15):
//   - Proxy.ResetPeer: "read: connection reset by peer" at once (< 2 ms), on open
//     connections and on new ones.
//   - Proxy.CutAfter: "unexpected EOF" once the byte budget is spent.
//   - Proxy.LoseReplies / LoseRequests: nothing until the client's own deadline
//     (context.DeadlineExceeded); a lost reply's statement did run on the server.
//   - Proxy.Disable: existing connections fail, new ones get "connection refused".
package faultproxy
