package pgetl

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgetl/pgetl/internal/dsn"
)

// Pool defaults applied by [ParseConfig] to every setting the connection string
// does not set (pgxpool's own defaults are in parentheses).
const (
	// MaxConnsDefault is the pool size (pool_max_conns; pgxpool: max(4, NumCPU)).
	// An ETL session uses one connection per flush, so a few suffice and a job
	// never crowds out a shared server.
	MaxConnsDefault = 4
	// MaxConnLifetimeDefault is how long a connection is used before it is
	// replaced (pool_max_conn_lifetime; pgxpool: 1 h), so a multi-hour job
	// follows failovers, DNS changes and rebalanced poolers within minutes. A
	// checked-out connection is replaced only when released.
	MaxConnLifetimeDefault = 5 * time.Minute
	// MaxConnLifetimeJitterDefault spreads replacements over this extra time
	// (pool_max_conn_lifetime_jitter; pgxpool: 0) so the connections of a pool
	// are not all replaced at once. pgxpool applies it in whole seconds.
	MaxConnLifetimeJitterDefault = 30 * time.Second
	// MaxConnIdleTimeDefault closes connections idle for longer
	// (pool_max_conn_idle_time; pgxpool: 30 min). With
	// HealthCheckPeriodDefault it keeps idle connections below 60 s, under
	// the idle timeouts of common middleboxes (proxies 60 s, cloud load
	// balancers 4–6 min) that drop connections silently.
	MaxConnIdleTimeDefault = 50 * time.Second
	// HealthCheckPeriodDefault is how often idle connections are checked for
	// MaxConnIdleTime and MaxConnLifetime (pool_health_check_period; pgxpool:
	// 1 min).
	HealthCheckPeriodDefault = 10 * time.Second
	// PingTimeoutDefault bounds the liveness ping of a connection that was
	// idle before it is handed out (pool_ping_timeout; pgxpool: unbounded), so
	// a dead connection is discarded instead of hanging the acquire.
	PingTimeoutDefault = 5 * time.Second
	// ConnectTimeoutDefault bounds each connection attempt (connect_timeout, in
	// seconds; pgx: unbounded).
	ConnectTimeoutDefault = 10 * time.Second
)

// Connection-string keys of pgetl itself. Like the libpq keepalive keys they are
// consumed by [ParseConfig] and never sent to the server.
const (
	// PoolerKey ("pgetl_pooler") says what sits between pgetl and PostgreSQL:
	// "none" (the default) or "pgbouncer" (synonym "transaction") for a pooler
	// in transaction mode. Behind a pooler the default query exec mode becomes
	// [pgx.QueryExecModeCacheDescribe], which never leaves server-side state
	// between messages: every execution sends its unnamed Parse, Bind and
	// Execute in one message, and CopyFrom only describes its columns, so
	// statements and CopyFrom work whichever server connection the pooler
	// picks. It is preferred over [pgx.QueryExecModeExec] because it keeps
	// binary formats and exact parameter types (Exec mode guesses them from
	// Go types and rejects ambiguous ones) and caches CopyFrom's column
	// lookup; over [pgx.QueryExecModeDescribeExec] because that mode binds the
	// unnamed statement in a second round trip, which outside a transaction
	// may reach another server connection. Its cost: after DDL changes a
	// cached statement's result types, that statement fails once and is
	// described again. pgx's default, cache_statement, uses named prepared
	// statements and fails behind PgBouncer in transaction mode (SQLSTATE
	// 26000 or 42P05).
	PoolerKey = "pgetl_pooler"
	// ExecModeKey ("pgetl_exec_mode") sets the default query exec mode:
	// cache_statement, cache_describe, describe_exec, exec or
	// simple_protocol (pgx's names; see [pgx.QueryExecMode]). It wins over
	// the choice implied by PoolerKey and over pgx's own
	// default_query_exec_mode key.
	ExecModeKey = "pgetl_exec_mode"
)

// libpq's keepalive keys, consumed by ParseConfig.
const (
	keyKeepalives         = "keepalives"
	keyKeepalivesIdle     = "keepalives_idle"
	keyKeepalivesInterval = "keepalives_interval"
	keyKeepalivesCount    = "keepalives_count"
	keyTCPUserTimeout     = "tcp_user_timeout"
)

var keepaliveKeys = []string{keyKeepalives, keyKeepalivesIdle, keyKeepalivesInterval, keyKeepalivesCount, keyTCPUserTimeout}

// ConfigError reports a connection-string key or a Config field whose value
// pgetl cannot use. Its message names the key (or field) and the value, never
// a password.
type ConfigError struct {
	// Key is the connection-string key ("keepalives_idle") or the Config field
	// ("MaxConnLifetime"); empty when the connection string as a whole does not
	// parse.
	Key string
	// Value is the offending value with any password replaced by "xxxxx".
	Value string
	// Err is the cause.
	Err error

	msg string // redacted message
}

func newConfigError(key, value string, err error, secrets []string) *ConfigError {
	var b strings.Builder
	b.WriteString("pgetl: ")
	if key != "" {
		b.WriteString(key)
		b.WriteString("=")
		b.WriteString(strconv.Quote(value))
		b.WriteString(": ")
	}
	b.WriteString(err.Error())
	return &ConfigError{
		Key:   key,
		Value: dsn.Redact(value, secrets...),
		Err:   err,
		msg:   dsn.Redact(b.String(), secrets...),
	}
}

// Error implements error; the message names the key and value, never a password.
func (e *ConfigError) Error() string { return e.msg }

// Unwrap returns the cause.
func (e *ConfigError) Unwrap() error { return e.Err }

var (
	errNotInteger  = errors.New("not an integer")
	errNotDuration = errors.New("not a duration (e.g. 300ms, 30s, 5m)")
)

// ParseConfig is [pgxpool.ParseConfig] with ETL defaults, keepalives and pgetl's
// keys. It accepts everything pgxpool.ParseConfig accepts, in URL or keyword/value
// form, and:
//
//   - applies the *Default constants (MaxConnsDefault, MaxConnLifetimeDefault, …)
//     to every setting the connection string (or PGCONNECT_TIMEOUT, or a service
//     file for the pool keys) does not set; explicit values always win;
//   - consumes libpq's keepalives (0 or 1), keepalives_idle, keepalives_interval
//     (seconds), keepalives_count and tcp_user_timeout (milliseconds), starting
//     from [DefaultKeepalive], and applies them to the client socket with
//     [Keepalive.Apply]; as in libpq, 0 leaves the OS setting;
//   - consumes [PoolerKey] and [ExecModeKey].
//
// Consumed keys are removed from RuntimeParams: pgx would otherwise send them to
// the server as parameters, which refuses the connection (FATAL, SQLSTATE 42704).
// pgetl adds nothing to RuntimeParams, so nothing a pooler refuses reaches the
// startup packet.
//
// An unparsable or out-of-range value returns a [*ConfigError] naming the key and
// the value; passwords are never included. The result passes [ValidateConfig].
func ParseConfig(connString string) (*pgxpool.Config, error) {
	secrets := dsn.Secrets(connString)
	raw, err := pgconn.ParseConfig(connString)
	if err != nil {
		return nil, newConfigError("", "", err, secrets)
	}
	if raw.Password != "" {
		secrets = append(secrets, raw.Password)
	}
	// raw.RuntimeParams holds every key pgconn does not know: pgx's, pgxpool's,
	// libpq's keepalive keys and ours, exactly as set by the string or a
	// service file.
	params := raw.RuntimeParams
	for k, v := range params {
		if strings.HasPrefix(k, "pgetl_") && k != PoolerKey && k != ExecModeKey {
			return nil, newConfigError(k, v, fmt.Errorf("unknown pgetl key (known: %s, %s)", PoolerKey, ExecModeKey), secrets)
		}
	}
	if err := checkPoolParams(params, secrets); err != nil {
		return nil, err
	}
	ka, err := keepaliveFromParams(params, secrets)
	if err != nil {
		return nil, err
	}
	pooler, err := poolerFromParams(params, secrets)
	if err != nil {
		return nil, err
	}
	execMode, execModeSet, err := execModeFromParams(params, secrets)
	if err != nil {
		return nil, err
	}

	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, newConfigError("", "", err, secrets)
	}
	for _, k := range keepaliveKeys {
		delete(cfg.ConnConfig.RuntimeParams, k)
	}
	delete(cfg.ConnConfig.RuntimeParams, PoolerKey)
	delete(cfg.ConnConfig.RuntimeParams, ExecModeKey)

	set := func(key string) bool { _, ok := params[key]; return ok }
	if !set("pool_max_conns") {
		cfg.MaxConns = MaxConnsDefault
	}
	if !set("pool_max_conn_lifetime") {
		cfg.MaxConnLifetime = MaxConnLifetimeDefault
	}
	if !set("pool_max_conn_lifetime_jitter") {
		cfg.MaxConnLifetimeJitter = MaxConnLifetimeJitterDefault
	}
	if !set("pool_max_conn_idle_time") {
		cfg.MaxConnIdleTime = MaxConnIdleTimeDefault
	}
	if !set("pool_health_check_period") {
		cfg.HealthCheckPeriod = HealthCheckPeriodDefault
	}
	if !set("pool_ping_timeout") {
		cfg.PingTimeout = PingTimeoutDefault
	}
	if !connectTimeoutSet(connString, cfg.ConnConfig.ConnectTimeout) {
		cfg.ConnConfig.ConnectTimeout = ConnectTimeoutDefault
	}
	switch {
	case execModeSet:
		cfg.ConnConfig.DefaultQueryExecMode = execMode
	case pooler && !set("default_query_exec_mode"):
		cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeCacheDescribe
	}
	ka.Apply(&cfg.ConnConfig.Config)

	if err := validateConfig(cfg, secrets); err != nil {
		return nil, err
	}
	return cfg, nil
}

// connectTimeoutSet reports whether connect_timeout was given: pgconn turns both
// "unset" and connect_timeout=0 (wait forever) into ConnectTimeout 0.
func connectTimeoutSet(connString string, parsed time.Duration) bool {
	if parsed != 0 || os.Getenv("PGCONNECT_TIMEOUT") != "" {
		return true
	}
	keys, err := dsn.Parse(connString)
	if err != nil {
		return false
	}
	_, ok := keys["connect_timeout"]
	return ok
}

// NewPool is [pgxpool.New] with [ParseConfig]: it parses connString and creates
// the pool. Like pgxpool.New it does not connect; ctx bounds only the creation
// of MinConns connections. Call Ping to check the server is reachable.
func NewPool(ctx context.Context, connString string) (*pgxpool.Pool, error) {
	cfg, err := ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	return NewPoolWithConfig(ctx, cfg)
}

// NewPoolWithConfig is [pgxpool.NewWithConfig] for a config from [ParseConfig]
// (or pgxpool.ParseConfig) that the caller may have changed: it runs
// [ValidateConfig] first, so a bad config is an error rather than a panic or a
// connection the server refuses.
func NewPoolWithConfig(ctx context.Context, cfg *pgxpool.Config) (*pgxpool.Pool, error) {
	if err := ValidateConfig(cfg); err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgetl: new pool: %w", err)
	}
	return pool, nil
}

// ValidateConfig checks a pool config the way [ParseConfig] checks a connection
// string, returning a [*ConfigError] naming the field. It requires a config made
// by a ParseConfig function (pgxpool panics otherwise), MaxConns ≥ 1, 0 ≤
// MinConns, MinIdleConns ≤ MaxConns, non-negative durations
// (MaxConnLifetime, MaxConnLifetimeJitter, MaxConnIdleTime, PingTimeout,
// ConnectTimeout; 0 keeps pgxpool's meaning), HealthCheckPeriod > 0, a
// DialFunc, a known DefaultQueryExecMode with its cache enabled, and no
// client-side key (keepalive, pgetl_*, pool_*) left in RuntimeParams, where
// the server would refuse it. It cannot see a [Keepalive] inside DialFunc; use
// [Keepalive.Validate] for that.
func ValidateConfig(cfg *pgxpool.Config) error {
	var secrets []string
	if cfg != nil && cfg.ConnConfig != nil && cfg.ConnConfig.Password != "" {
		secrets = []string{cfg.ConnConfig.Password}
	}
	return validateConfig(cfg, secrets)
}

func validateConfig(cfg *pgxpool.Config, secrets []string) error {
	fail := func(field, value, format string, args ...any) error {
		return newConfigError(field, value, fmt.Errorf(format, args...), secrets)
	}
	if cfg == nil || cfg.ConnConfig == nil {
		return fail("ConnConfig", "nil", "config must be created by ParseConfig")
	}
	if !createdByParseConfig(cfg) || !createdByParseConfig(cfg.ConnConfig) || !createdByParseConfig(&cfg.ConnConfig.Config) {
		return fail("Config", "hand-built", "config must be created by ParseConfig (pgetl's or pgxpool's); pgx refuses others")
	}
	i32 := func(v int32) string { return strconv.FormatInt(int64(v), 10) }
	switch {
	case cfg.MaxConns < 1:
		return fail("MaxConns", i32(cfg.MaxConns), "must be at least 1")
	case cfg.MinConns < 0 || cfg.MinConns > cfg.MaxConns:
		return fail("MinConns", i32(cfg.MinConns), "must be between 0 and MaxConns (%d)", cfg.MaxConns)
	case cfg.MinIdleConns < 0 || cfg.MinIdleConns > cfg.MaxConns:
		return fail("MinIdleConns", i32(cfg.MinIdleConns), "must be between 0 and MaxConns (%d)", cfg.MaxConns)
	}
	for _, d := range []struct {
		field string
		v     time.Duration
	}{
		{"MaxConnLifetime", cfg.MaxConnLifetime},
		{"MaxConnLifetimeJitter", cfg.MaxConnLifetimeJitter},
		{"MaxConnIdleTime", cfg.MaxConnIdleTime},
		{"PingTimeout", cfg.PingTimeout},
		{"ConnectTimeout", cfg.ConnConfig.ConnectTimeout},
	} {
		if d.v < 0 {
			return fail(d.field, d.v.String(), "must not be negative")
		}
	}
	if cfg.HealthCheckPeriod <= 0 {
		return fail("HealthCheckPeriod", cfg.HealthCheckPeriod.String(), "must be positive")
	}
	if cfg.ConnConfig.DialFunc == nil {
		return fail("DialFunc", "nil", "must be set (see Keepalive.Apply)")
	}
	if cfg.ConnConfig.LookupFunc == nil {
		return fail("LookupFunc", "nil", "must be set")
	}
	mode := cfg.ConnConfig.DefaultQueryExecMode
	switch {
	case mode < pgx.QueryExecModeCacheStatement || mode > pgx.QueryExecModeSimpleProtocol:
		return fail("DefaultQueryExecMode", strconv.Itoa(int(mode)), "unknown query exec mode")
	case mode == pgx.QueryExecModeCacheStatement && cfg.ConnConfig.StatementCacheCapacity == 0:
		return fail("DefaultQueryExecMode", mode.String(), "needs StatementCacheCapacity > 0")
	case mode == pgx.QueryExecModeCacheDescribe && cfg.ConnConfig.DescriptionCacheCapacity == 0:
		return fail("DefaultQueryExecMode", mode.String(), "needs DescriptionCacheCapacity > 0")
	}
	for k, v := range cfg.ConnConfig.RuntimeParams {
		if slices.Contains(keepaliveKeys, k) || strings.HasPrefix(k, "pgetl_") || strings.HasPrefix(k, "pool_") {
			return fail("RuntimeParams["+strconv.Quote(k)+"]", v,
				"is a client-side key: the server would refuse it as a parameter (SQLSTATE 42704); pass it in the connection string to ParseConfig")
		}
	}
	return nil
}

// createdByParseConfig reads pgx's unexported createdByParseConfig flag of v (a
// pointer to a pgx config struct), which pgx checks with a panic. If a later pgx
// drops the flag, it reports true and leaves the check to pgx.
func createdByParseConfig(v any) bool {
	f := reflect.ValueOf(v).Elem().FieldByName("createdByParseConfig")
	if !f.IsValid() || f.Kind() != reflect.Bool {
		return true
	}
	return f.Bool()
}

// checkPoolParams checks pgxpool's keys with the same parsers pgxpool uses, so
// errors name the key and value and out-of-range values are caught.
func checkPoolParams(params map[string]string, secrets []string) error {
	ints := []struct {
		key string
		min int64
	}{{"pool_max_conns", 1}, {"pool_min_conns", 0}, {"pool_min_idle_conns", 0}}
	for _, k := range ints {
		v, ok := params[k.key]
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil {
			return newConfigError(k.key, v, numError(err), secrets)
		}
		if n < k.min {
			return newConfigError(k.key, v, fmt.Errorf("must be at least %d", k.min), secrets)
		}
	}
	durs := []struct {
		key      string
		positive bool
	}{
		{"pool_max_conn_lifetime", false}, {"pool_max_conn_lifetime_jitter", false},
		{"pool_max_conn_idle_time", false}, {"pool_health_check_period", true},
		{"pool_ping_timeout", false},
	}
	for _, k := range durs {
		v, ok := params[k.key]
		if !ok {
			continue
		}
		d, err := time.ParseDuration(v)
		switch {
		case err != nil:
			return newConfigError(k.key, v, errNotDuration, secrets)
		case d < 0:
			return newConfigError(k.key, v, errors.New("must not be negative"), secrets)
		case d == 0 && k.positive:
			return newConfigError(k.key, v, errors.New("must be positive"), secrets)
		}
	}
	return nil
}

func numError(err error) error {
	var ne *strconv.NumError
	if errors.As(err, &ne) {
		if errors.Is(ne.Err, strconv.ErrRange) {
			return fmt.Errorf("out of range: %w", ne.Err)
		}
		return fmt.Errorf("%w: %w", errNotInteger, ne.Err)
	}
	return err
}

// keepaliveFromParams returns DefaultKeepalive overridden by libpq's keys.
func keepaliveFromParams(params map[string]string, secrets []string) (Keepalive, error) {
	ka := DefaultKeepalive()
	intKey := func(key string, maxV int64) (int64, bool, error) {
		v, ok := params[key]
		if !ok {
			return 0, false, nil
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, false, newConfigError(key, v, numError(err), secrets)
		}
		if n < 0 || n > maxV {
			return 0, false, newConfigError(key, v, fmt.Errorf("must be between 0 and %d", maxV), secrets)
		}
		return n, true, nil
	}
	if v, ok := params[keyKeepalives]; ok {
		switch strings.TrimSpace(v) {
		case "0":
			ka.Disable = true
		case "1":
		default:
			return ka, newConfigError(keyKeepalives, v, errors.New("must be 0 or 1"), secrets)
		}
	}
	for _, k := range []struct {
		key  string
		maxV int64
		set  func(int64)
	}{
		{keyKeepalivesIdle, maxKeepaliveSecs, func(n int64) { ka.Idle = time.Duration(n) * time.Second }},
		{keyKeepalivesInterval, maxKeepaliveSecs, func(n int64) { ka.Interval = time.Duration(n) * time.Second }},
		{keyKeepalivesCount, maxKeepaliveCount, func(n int64) { ka.Count = int(n) }},
		{keyTCPUserTimeout, math.MaxInt32, func(n int64) { ka.UserTimeout = time.Duration(n) * time.Millisecond }},
	} {
		n, ok, err := intKey(k.key, k.maxV)
		if err != nil {
			return ka, err
		}
		if ok {
			k.set(n)
		}
	}
	return ka, nil
}

func poolerFromParams(params map[string]string, secrets []string) (bool, error) {
	v, ok := params[PoolerKey]
	if !ok {
		return false, nil
	}
	switch v {
	case "none":
		return false, nil
	case "pgbouncer", "transaction":
		return true, nil
	}
	return false, newConfigError(PoolerKey, v, errors.New("must be none, pgbouncer or transaction"), secrets)
}

func execModeFromParams(params map[string]string, secrets []string) (pgx.QueryExecMode, bool, error) {
	v, ok := params[ExecModeKey]
	if !ok {
		return 0, false, nil
	}
	switch v {
	case "cache_statement":
		return pgx.QueryExecModeCacheStatement, true, nil
	case "cache_describe":
		return pgx.QueryExecModeCacheDescribe, true, nil
	case "describe_exec":
		return pgx.QueryExecModeDescribeExec, true, nil
	case "exec":
		return pgx.QueryExecModeExec, true, nil
	case "simple_protocol":
		return pgx.QueryExecModeSimpleProtocol, true, nil
	}
	return 0, false, newConfigError(ExecModeKey, v,
		errors.New("must be cache_statement, cache_describe, describe_exec, exec or simple_protocol"), secrets)
}
