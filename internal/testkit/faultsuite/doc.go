// Package faultsuite holds the fault-injection tests of pgetl that need the
// Toxiproxy-based faultproxy.Proxy: the in-doubt COMMIT tests (a lost reply, a lost
// request) and the seeded soak. They are black-box tests of pgetl's public API; the
// moment of a fault is timed with the beforeCommit hook that internal/testhook
// carries to a Session through NewSession's context. The rest of the fault suite is
// in the core module (fault_*_test.go).
package faultsuite
