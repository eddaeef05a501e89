// Package faultsuite holds the fault-injection tests of pgetl that need the
// Toxiproxy-based faultproxy.Proxy: the in-doubt COMMIT tests (a lost reply, a lost
// request) and the seeded soak. They are black-box tests of pgetl's public API; the
// moment of a fault is timed with the beforeCommit hook that internal/testhook
// carries to a Session through NewSession's context. fault_inflight_test.go and
// TestFaultSoakInFlight strike the same faults, and a server restart, with four
// batches in flight, and check the checkpoint's order from another connection
// (ordering_test.go). The rest of the fault suite is in the core module
// (fault_*_test.go).
package faultsuite
