package pgtest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// EnvPgBouncerTLSURL names the variable holding a connection string to a PgBouncer
// in transaction mode that accepts TLS from its clients (sslmode=require), in front
// of the test database. bash .ci/run starts one (the same PgBouncer as
// PGETL_TEST_PGBOUNCER_URL, with a self-signed certificate).
const EnvPgBouncerTLSURL = "PGETL_TEST_PGBOUNCER_TLS_URL"

// Transport is one way for a test to reach the test database: directly or through
// PgBouncer in transaction mode, over plain TCP or TLS.
type Transport struct {
	// Name names the transport as a subtest: "direct", "direct_tls", "pgbouncer" or
	// "pgbouncer_tls".
	Name string
	// URL is the connection string, without a search_path (qualify names with the
	// test's schema: a pooler does not keep session state). Its sslmode is disable
	// for the plain transports and require for the TLS ones. Empty when the
	// transport is unavailable.
	URL string
	// TLS reports that the client's connection is TLS.
	TLS bool
	// PgBouncer reports that the connection goes through PgBouncer in transaction
	// mode (connect with pgetl's pooler key so the exec mode suits it).
	PgBouncer bool

	unavailable string // why URL is empty
}

// Transports returns the four transports of the test database: plain and TLS, each
// direct and through PgBouncer. The direct TLS one is the test database's own URL
// with sslmode=require (the server must have ssl=on); the PgBouncer ones come from
// PGETL_TEST_PGBOUNCER_URL and PGETL_TEST_PGBOUNCER_TLS_URL. Each available one was
// checked once per process to connect and to be TLS exactly when it says so. One
// that is missing or unusable has an empty URL: RunTransports fails its subtest
// under CI=true and skips it otherwise, as for every pgtest resource.
func Transports(t testing.TB) []Transport {
	t.Helper()
	base := URL(t)
	trs := []Transport{
		{Name: "direct", URL: WithSSLMode(base, "disable")},
		{Name: "direct_tls", URL: WithSSLMode(base, "require"), TLS: true},
		{Name: "pgbouncer", URL: os.Getenv(EnvPgBouncerURL), PgBouncer: true},
		{Name: "pgbouncer_tls", URL: os.Getenv(EnvPgBouncerTLSURL), PgBouncer: true, TLS: true},
	}
	for i := range trs {
		tr := &trs[i]
		switch {
		case tr.URL == "" && tr.Name == "pgbouncer":
			tr.unavailable = "pgtest: no PgBouncer for tests: set " + EnvPgBouncerURL +
				" to a PgBouncer in transaction mode in front of the test database (bash .ci/run starts one)"
			continue
		case tr.URL == "":
			tr.unavailable = "pgtest: no PgBouncer with client TLS for tests: set " + EnvPgBouncerTLSURL +
				" (sslmode=require) to a PgBouncer in transaction mode with client_tls_sslmode on, in front of the test database (bash .ci/run starts one)"
			continue
		case tr.PgBouncer && tr.TLS:
			tr.URL = WithSSLMode(tr.URL, "require")
		case tr.PgBouncer:
			tr.URL = WithSSLMode(tr.URL, "disable")
		}
		if err := probeTransport(tr.URL, tr.TLS); err != nil {
			tr.unavailable = fmt.Sprintf("pgtest: transport %s unusable: %v", tr.Name, err)
			tr.URL = ""
		}
	}
	return trs
}

// Require fails (CI=true) or skips t when tr is unavailable.
func (tr Transport) Require(t testing.TB) {
	t.Helper()
	if tr.URL == "" {
		Unavailable(t, tr.unavailable)
	}
}

// RunTransports runs f as a subtest for each of Transports, like pgx's
// RunWithQueryExecModes; a subtest whose transport is unavailable fails under
// CI=true and is skipped otherwise.
func RunTransports(t *testing.T, f func(t *testing.T, tr Transport)) {
	t.Helper()
	for _, tr := range Transports(t) {
		t.Run(tr.Name, func(t *testing.T) {
			tr.Require(t)
			f(t, tr)
		})
	}
}

// WithSSLMode returns connString with its sslmode set to mode (replaced if
// present), in URL or key=value form.
func WithSSLMode(connString, mode string) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		if err == nil {
			q := u.Query()
			q.Set("sslmode", mode)
			u.RawQuery = q.Encode()
			return u.String()
		}
	}
	// In key=value form a later key wins.
	return WithParam(connString, "sslmode", mode)
}

var (
	probeMu sync.Mutex
	probes  = map[string]*probe{} // guarded by probeMu: by connection string
)

// probe is the once-per-process check of one transport.
type probe struct {
	once sync.Once
	err  error
}

// probeTransport connects to connString (once per process) and checks that the
// client's connection is TLS exactly when wantTLS.
func probeTransport(connString string, wantTLS bool) error {
	probeMu.Lock()
	p := probes[connString]
	if p == nil {
		p = &probe{}
		probes[connString] = p
	}
	probeMu.Unlock()
	p.once.Do(func() { p.err = checkTransport(connString, wantTLS) })
	return p.err
}

func checkTransport(connString string, wantTLS bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, connString)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	if err := c.Exec(ctx, "SELECT 1").Close(); err != nil {
		return err
	}
	if _, isTLS := c.Conn().(*tls.Conn); isTLS != wantTLS {
		return fmt.Errorf("connection is TLS: %v, want %v", isTLS, wantTLS)
	}
	return nil
}
