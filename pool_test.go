package pgetl_test

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgetl/pgetl"
	"github.com/pgetl/pgetl/internal/pgtest"
	"github.com/pgetl/pgetl/internal/sockopt"
)

func TestParseConfigDefaults(t *testing.T) {
	t.Parallel()
	for _, dsn := range []string{"host=db.example.com dbname=x", "postgres://u@db.example.com/x"} {
		cfg := parse(t, dsn)
		require.EqualValues(t, pgetl.MaxConnsDefault, cfg.MaxConns)
		require.Equal(t, pgetl.MaxConnLifetimeDefault, cfg.MaxConnLifetime)
		require.Equal(t, pgetl.MaxConnLifetimeJitterDefault, cfg.MaxConnLifetimeJitter)
		require.Equal(t, pgetl.MaxConnIdleTimeDefault, cfg.MaxConnIdleTime)
		require.LessOrEqual(t, cfg.MaxConnIdleTime+cfg.HealthCheckPeriod, time.Minute, "idle connections are closed within 60 s")
		require.Equal(t, pgetl.HealthCheckPeriodDefault, cfg.HealthCheckPeriod)
		require.Equal(t, pgetl.PingTimeoutDefault, cfg.PingTimeout)
		require.Equal(t, pgetl.ConnectTimeoutDefault, cfg.ConnConfig.ConnectTimeout)
		require.Equal(t, pgx.QueryExecModeCacheStatement, cfg.ConnConfig.DefaultQueryExecMode)
		require.Empty(t, cfg.ConnConfig.RuntimeParams, "pgetl adds nothing to the startup packet")
		require.NotNil(t, cfg.ConnConfig.DialFunc)
	}
	require.Equal(t, 80*time.Second, pgetl.KeepaliveUserTimeoutDefault)
	require.Equal(t, pgetl.Keepalive{Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 5, UserTimeout: 80 * time.Second}, pgetl.DefaultKeepalive())
}

func TestParseConfigExplicitWins(t *testing.T) {
	t.Parallel()
	keys := []string{
		"pool_max_conns", "9", "pool_min_conns", "2", "pool_max_conn_lifetime", "1h",
		"pool_max_conn_lifetime_jitter", "0s", "pool_max_conn_idle_time", "3m",
		"pool_health_check_period", "1m", "pool_ping_timeout", "0s", "connect_timeout", "3",
	}
	for _, base := range []string{"host=db.example.com dbname=x", "postgres://u@db.example.com/x"} {
		cfg := parse(t, withParams(base, keys...))
		require.EqualValues(t, 9, cfg.MaxConns)
		require.EqualValues(t, 2, cfg.MinConns)
		require.Equal(t, time.Hour, cfg.MaxConnLifetime)
		require.Zero(t, cfg.MaxConnLifetimeJitter)
		require.Equal(t, 3*time.Minute, cfg.MaxConnIdleTime)
		require.Equal(t, time.Minute, cfg.HealthCheckPeriod)
		require.Zero(t, cfg.PingTimeout)
		require.Equal(t, 3*time.Second, cfg.ConnConfig.ConnectTimeout)
		require.Empty(t, cfg.ConnConfig.RuntimeParams)

		// connect_timeout=0 (wait forever) is explicit too, though pgconn
		// parses it to the same value as "unset".
		cfg = parse(t, withParams(base, "connect_timeout", "0"))
		require.Zero(t, cfg.ConnConfig.ConnectTimeout)
	}
}

// Not parallel: t.Setenv.
func TestParseConfigConnectTimeoutEnv(t *testing.T) {
	t.Setenv("PGCONNECT_TIMEOUT", "0")
	require.Zero(t, parse(t, "host=db.example.com").ConnConfig.ConnectTimeout)
	t.Setenv("PGCONNECT_TIMEOUT", "7")
	require.Equal(t, 7*time.Second, parse(t, "host=db.example.com").ConnConfig.ConnectTimeout)
}

func TestParseConfigConsumesKeys(t *testing.T) {
	t.Parallel()
	keys := []string{
		"keepalives", "1", "keepalives_idle", "5", "keepalives_interval", "2", "keepalives_count", "3",
		"tcp_user_timeout", "9000", "pgetl_pooler", "none", "pgetl_exec_mode", "exec", "application_name", "etl",
	}
	for _, base := range []string{"host=db.example.com", "postgres://u@db.example.com/x"} {
		cfg := parse(t, withParams(base, keys...))
		require.Equal(t, map[string]string{"application_name": "etl"}, cfg.ConnConfig.RuntimeParams)
	}
	// Quoted and escaped values in keyword/value form.
	cfg := parse(t, `host=db.example.com keepalives_idle = '5' application_name='it\'s etl' password='a b\'c'`)
	require.Equal(t, map[string]string{"application_name": "it's etl"}, cfg.ConnConfig.RuntimeParams)
	require.Equal(t, "a b'c", cfg.ConnConfig.Password)
}

// TestParseConfigServerRejectsLibpqKeys proves why the keys must be consumed: pgx
// alone sends them in the startup packet and the server refuses the connection.
func TestParseConfigServerRejectsLibpqKeys(t *testing.T) {
	t.Parallel()
	urlForm, kvForm := tcpDSNs(t)
	for form, base := range map[string]string{"url": urlForm, "kv": kvForm} {
		t.Run(form, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for _, kv := range [][2]string{
				{"keepalives", "1"}, {"keepalives_idle", "5"}, {"keepalives_interval", "5"}, {"keepalives_count", "5"},
				{"pgetl_pooler", "none"}, {"pgetl_exec_mode", "exec"},
			} {
				dsn := withParams(base, kv[0], kv[1])

				plain, err := pgxpool.New(ctx, dsn)
				require.NoError(t, err)
				err = plain.Ping(ctx)
				plain.Close()
				var pgErr *pgconn.PgError
				require.ErrorAs(t, err, &pgErr, "control: plain pgxpool with %s", kv[0])
				require.Equal(t, pgerrcode.UndefinedObject, pgErr.Code) // 42704
				require.Equal(t, "FATAL", pgErr.Severity)
				require.Contains(t, pgErr.Message, kv[0])

				pool, err := pgetl.NewPool(ctx, dsn)
				require.NoError(t, err)
				require.NoError(t, pool.Ping(ctx), kv[0])
				pool.Close()
			}
		})
	}
}

// TestParseConfigTCPUserTimeoutIsClientSide: tcp_user_timeout is also the name of
// a server setting, so pgx alone does not fail but silently sets the *server's*
// socket option (in the startup packet, which poolers refuse) and leaves the
// client's unset. pgetl applies it to the client socket, as libpq does.
func TestParseConfigTCPUserTimeoutIsClientSide(t *testing.T) {
	t.Parallel()
	requireLinux(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	urlForm, _ := tcpDSNs(t)
	dsn := withParams(urlForm, "tcp_user_timeout", "4500")
	serverSide := func(pool *pgxpool.Pool) string {
		var v string
		require.NoError(t, pool.QueryRow(ctx, "SHOW tcp_user_timeout").Scan(&v))
		return v
	}

	plain, err := pgxpool.New(ctx, dsn)
	require.NoError(t, err)
	defer plain.Close()
	require.Equal(t, "4500", serverSide(plain), "control: pgx sends it to the server")
	o, _ := pooledSocket(t, plain)
	require.Zero(t, o.UserTimeout, "control: pgx leaves the client socket alone")

	pool := newPool(t, parse(t, dsn))
	require.NotEqual(t, "4500", serverSide(pool))
	o, _ = pooledSocket(t, pool)
	require.Equal(t, 4500*time.Millisecond, o.UserTimeout)
}

func TestParseConfigExecMode(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		kv   []string
		want pgx.QueryExecMode
	}{
		{nil, pgx.QueryExecModeCacheStatement},
		{[]string{"pgetl_pooler", "none"}, pgx.QueryExecModeCacheStatement},
		{[]string{"pgetl_pooler", "pgbouncer"}, pgx.QueryExecModeCacheDescribe},
		{[]string{"pgetl_pooler", "transaction"}, pgx.QueryExecModeCacheDescribe},
		{[]string{"pgetl_pooler", "pgbouncer", "pgetl_exec_mode", "exec"}, pgx.QueryExecModeExec},
		{[]string{"pgetl_pooler", "pgbouncer", "default_query_exec_mode", "describe_exec"}, pgx.QueryExecModeDescribeExec},
		{[]string{"default_query_exec_mode", "exec", "pgetl_exec_mode", "simple_protocol"}, pgx.QueryExecModeSimpleProtocol},
		{[]string{"pgetl_exec_mode", "cache_statement", "pgetl_pooler", "pgbouncer"}, pgx.QueryExecModeCacheStatement},
		{[]string{"pgetl_exec_mode", "cache_describe"}, pgx.QueryExecModeCacheDescribe},
		{[]string{"pgetl_exec_mode", "describe_exec"}, pgx.QueryExecModeDescribeExec},
	} {
		for _, base := range []string{"host=db.example.com", "postgres://db.example.com/x"} {
			cfg := parse(t, withParams(base, tc.kv...))
			require.Equal(t, tc.want, cfg.ConnConfig.DefaultQueryExecMode, "%v", tc.kv)
		}
	}
}

const secret = "pw-S3CRET-9z"

func TestParseConfigBadValues(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ key, value, reason string }{
		{"keepalives", "2", "must be 0 or 1"},
		{"keepalives", "yes", "must be 0 or 1"},
		{"keepalives_idle", "-5", "between 0 and 32767"},
		{"keepalives_idle", "40000", "between 0 and 32767"},
		{"keepalives_interval", "1.5", "not an integer"},
		{"keepalives_count", "abc", "not an integer"},
		{"keepalives_count", "128", "between 0 and 127"},
		{"tcp_user_timeout", "99999999999", "between 0 and 2147483647"},
		{"tcp_user_timeout", "99999999999999999999", "out of range"},
		{"pgetl_pooler", "pgpool", "must be none, pgbouncer or transaction"},
		{"pgetl_exec_mode", "fast", "must be cache_statement"},
		{"pgetl_poolr", "pgbouncer", "unknown pgetl key"},
		{"pool_max_conns", "0", "at least 1"},
		{"pool_max_conns", "many", "not an integer"},
		{"pool_min_conns", "-1", "at least 0"},
		{"pool_max_conn_lifetime", "-5m", "must not be negative"},
		{"pool_max_conn_lifetime", "5", "not a duration"},
		{"pool_max_conn_idle_time", "-1s", "must not be negative"},
		{"pool_health_check_period", "0s", "must be positive"},
		{"pool_ping_timeout", "soon", "not a duration"},
		{"keepalives_idle", secret, "not an integer"}, // the value itself is redacted
	} {
		for _, base := range []string{
			"host=db.example.com user=etl password=" + secret,
			"host=db.example.com user=etl password='" + secret + "'",
			"postgres://etl:" + secret + "@db.example.com/x",
			"postgres://etl@db.example.com/x?password=" + secret,
		} {
			dsn := withParams(base, tc.key, tc.value)
			cfg, err := pgetl.ParseConfig(dsn)
			require.Error(t, err, dsn)
			require.Nil(t, cfg)
			msg := err.Error()
			require.NotContains(t, msg, secret)
			require.True(t, strings.HasPrefix(msg, "pgetl: "), msg)
			require.Contains(t, msg, tc.key)
			if tc.value != secret {
				require.Contains(t, msg, strconv.Quote(tc.value))
			}
			require.Contains(t, msg, tc.reason)
			var ce *pgetl.ConfigError
			require.ErrorAs(t, err, &ce)
			require.Equal(t, tc.key, ce.Key)
			require.NotContains(t, ce.Value, secret)
		}
	}

	// Errors from pgx's own parsing are prefixed, wrapped and redacted too.
	for _, dsn := range []string{
		"host=db.example.com password='" + secret + " connect_timeout=x",
		"host=db.example.com password=" + secret + " connect_timeout=-1",
		"postgres://etl:" + secret + "@db.example.com/x?connect_timeout=x",
		"postgres://etl:" + secret + "@db.example.com:99999/x",
		"postgres://etl:" + secret + "@db.example.com/x?default_query_exec_mode=fast",
	} {
		_, err := pgetl.ParseConfig(dsn)
		require.Error(t, err, dsn)
		require.True(t, strings.HasPrefix(err.Error(), "pgetl: "), err.Error())
		require.NotContains(t, err.Error(), secret)
		var pce *pgconn.ParseConfigError
		require.ErrorAs(t, err, &pce)
	}
}

func TestValidateConfig(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// Hand-built configs are errors, not pgx panics.
	for _, cfg := range []*pgxpool.Config{nil, {}, {ConnConfig: &pgx.ConnConfig{}}} {
		require.Error(t, pgetl.ValidateConfig(cfg))
		pool, err := pgetl.NewPoolWithConfig(ctx, cfg)
		require.Error(t, err)
		require.Nil(t, pool)
	}
	ok := func() *pgxpool.Config { return parse(t, "host=db.example.com password="+secret) }
	require.NoError(t, pgetl.ValidateConfig(ok()))
	plain, err := pgxpool.ParseConfig("host=db.example.com")
	require.NoError(t, err)
	require.NoError(t, pgetl.ValidateConfig(plain), "pgxpool's own configs are accepted")

	for _, tc := range []struct {
		field  string
		change func(*pgxpool.Config)
	}{
		{"MaxConns", func(c *pgxpool.Config) { c.MaxConns = 0 }},
		{"MinConns", func(c *pgxpool.Config) { c.MinConns = c.MaxConns + 1 }},
		{"MinIdleConns", func(c *pgxpool.Config) { c.MinIdleConns = -1 }},
		{"MaxConnLifetime", func(c *pgxpool.Config) { c.MaxConnLifetime = -time.Second }},
		{"MaxConnLifetimeJitter", func(c *pgxpool.Config) { c.MaxConnLifetimeJitter = -time.Second }},
		{"MaxConnIdleTime", func(c *pgxpool.Config) { c.MaxConnIdleTime = -time.Second }},
		{"PingTimeout", func(c *pgxpool.Config) { c.PingTimeout = -time.Second }},
		{"ConnectTimeout", func(c *pgxpool.Config) { c.ConnConfig.ConnectTimeout = -time.Second }},
		{"HealthCheckPeriod", func(c *pgxpool.Config) { c.HealthCheckPeriod = 0 }},
		{"DialFunc", func(c *pgxpool.Config) { c.ConnConfig.DialFunc = nil }},
		{"LookupFunc", func(c *pgxpool.Config) { c.ConnConfig.LookupFunc = nil }},
		{"DefaultQueryExecMode", func(c *pgxpool.Config) { c.ConnConfig.DefaultQueryExecMode = 99 }},
		{"DefaultQueryExecMode", func(c *pgxpool.Config) { c.ConnConfig.StatementCacheCapacity = 0 }},
		{`RuntimeParams["keepalives_idle"]`, func(c *pgxpool.Config) { c.ConnConfig.RuntimeParams["keepalives_idle"] = "5" }},
		{`RuntimeParams["pgetl_pooler"]`, func(c *pgxpool.Config) { c.ConnConfig.RuntimeParams["pgetl_pooler"] = secret }},
	} {
		cfg := ok()
		tc.change(cfg)
		err := pgetl.ValidateConfig(cfg)
		var ce *pgetl.ConfigError
		require.ErrorAs(t, err, &ce, tc.field)
		require.Equal(t, tc.field, ce.Key)
		require.True(t, strings.HasPrefix(err.Error(), "pgetl: "+tc.field+"="), err.Error())
		require.NotContains(t, err.Error(), secret)
		pool, err := pgetl.NewPoolWithConfig(ctx, cfg)
		require.Error(t, err)
		require.Nil(t, pool)
	}
}

// pgbouncerWork runs a pooler-unfriendly workload on pool: per iteration a query
// with arguments outside a transaction, and inside one a query with arguments,
// CopyFrom and an INSERT with arguments. It first runs iterations sequentially on
// three connections held in rotation, one of them keeping a transaction open so
// that PgBouncer must give the working connection another server connection than
// it had before; then workers goroutines run it concurrently. It returns the
// first error.
func pgbouncerWork(ctx context.Context, pool *pgxpool.Pool, table pgx.Identifier, workers, iterations int) error {
	one := func(db interface {
		Begin(context.Context) (pgx.Tx, error)
		QueryRow(context.Context, string, ...any) pgx.Row
	}, id int) error {
		var sum int
		if err := db.QueryRow(ctx, "SELECT $1::int + $2::int", id, 1).Scan(&sum); err != nil {
			return fmt.Errorf("query: %w", err)
		}
		if sum != id+1 {
			return fmt.Errorf("query: got %d want %d", sum, id+1)
		}
		return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
			var n int
			if err := tx.QueryRow(ctx, "SELECT count(*) FROM "+table.Sanitize()+" WHERE id < $1", id).Scan(&n); err != nil {
				return fmt.Errorf("query in tx: %w", err)
			}
			rows := [][]any{{id*10 + 1, "copy"}, {id*10 + 2, "copy"}}
			if _, err := tx.CopyFrom(ctx, table, []string{"id", "name"}, pgx.CopyFromRows(rows)); err != nil {
				return fmt.Errorf("copy: %w", err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+table.Sanitize()+" (id, name) VALUES ($1, $2)", id*10+3, "insert"); err != nil {
				return fmt.Errorf("insert: %w", err)
			}
			return nil
		})
	}

	// Sequential, with forced mixing of server connections.
	conns := make([]*pgxpool.Conn, 3)
	for i := range conns {
		c, err := pool.Acquire(ctx)
		if err != nil {
			return err
		}
		defer c.Release()
		conns[i] = c
	}
	for i := range iterations {
		holder, worker := conns[i%3], conns[(i+1)%3]
		held, err := holder.Begin(ctx)
		if err != nil {
			return fmt.Errorf("hold: %w", err)
		}
		if _, err := held.Exec(ctx, "SELECT 1"); err != nil {
			return fmt.Errorf("hold: %w", err)
		}
		err = one(worker, i)
		if rerr := held.Rollback(ctx); err == nil && rerr != nil {
			err = fmt.Errorf("hold: %w", rerr)
		}
		if err != nil {
			return err
		}
	}
	for _, c := range conns {
		c.Release()
	}

	// Concurrent.
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := range iterations {
				if err := one(pool, (w+1)*iterations+i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func TestPoolPgBouncer(t *testing.T) {
	t.Parallel()
	bouncer := pgtest.PgBouncerURL(t)
	db := pgtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	table := pgx.Identifier{db.Schema, "items"}
	db.Exec(t, "CREATE TABLE "+table.Sanitize()+" (id int PRIMARY KEY, name text NOT NULL)")

	const workers, iterations = 4, 50 // 50 sequential transactions on rotating connections, then 200 on 4 concurrent ones
	pool := newPool(t, parse(t, withParams(bouncer, "pgetl_pooler", "pgbouncer", "pool_max_conns", strconv.Itoa(workers))))
	var direct, viaBouncer string
	require.NoError(t, db.Pool.QueryRow(ctx, "SELECT current_database()").Scan(&direct))
	require.NoError(t, pool.QueryRow(ctx, "SELECT current_database()").Scan(&viaBouncer))
	require.Equal(t, direct, viaBouncer, "%s must front the test database (%s)", pgtest.EnvPgBouncerURL, pgtest.EnvURL)
	require.Equal(t, pgx.QueryExecModeCacheDescribe, pool.Config().ConnConfig.DefaultQueryExecMode)
	require.NoError(t, pgbouncerWork(ctx, pool, table, workers, iterations))
	require.EqualValues(t, (workers+1)*iterations*3, db.Int(t, "SELECT count(*) FROM "+table.Sanitize()))
	require.Positive(t, pool.Stat().TotalConns())

	t.Run("control: pgx default exec mode fails", func(t *testing.T) {
		control := pgx.Identifier{db.Schema, "items_control"}
		db.Exec(t, "CREATE TABLE "+control.Sanitize()+" (id int PRIMARY KEY, name text NOT NULL)")
		plain, err := pgxpool.New(ctx, withParams(bouncer, "pool_max_conns", strconv.Itoa(workers)))
		require.NoError(t, err)
		defer plain.Close()
		require.Equal(t, pgx.QueryExecModeCacheStatement, plain.Config().ConnConfig.DefaultQueryExecMode)
		err = pgbouncerWork(ctx, plain, control, workers, iterations)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr)
		require.Contains(t, []string{pgerrcode.InvalidSQLStatementName, pgerrcode.DuplicatePreparedStatement}, pgErr.Code, "%v", err) // 26000, 42P05
		t.Logf("default exec mode behind PgBouncer: %v", err)
	})
}

// FuzzParseConfig feeds arbitrary values for the keepalive keys and a pool key,
// in both forms: ParseConfig never panics, never prints the password, and what it
// accepts reaches the socket unchanged.
func FuzzParseConfig(f *testing.F) {
	f.Add("1", "30", "10", "5", "80000", "5m", false)
	f.Add("0", "0", "0", "0", "0", "0s", true)
	f.Add("1", "7", "3", "4", "12345", "200ms", true)
	f.Add("2", "-5", "abc", "128", "-1", "-5m", false)
	f.Add("", " 8 ", "+3", "0x10", "99999999999999999999", "1h1m", true)
	f.Add("1", secret, "'", `\`, "a b", "&x=y", false)
	f.Add("1", "32767", "32767", "127", "2147483647", "1ns", true)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()

	f.Fuzz(func(t *testing.T, keepalives, idle, interval, count, userTimeout, lifetime string, urlForm bool) {
		params := [][2]string{
			{"keepalives", keepalives}, {"keepalives_idle", idle}, {"keepalives_interval", interval},
			{"keepalives_count", count}, {"tcp_user_timeout", userTimeout}, {"pool_max_conn_lifetime", lifetime},
		}
		var dsn string
		if urlForm {
			q := url.Values{}
			for _, p := range params {
				q.Set(p[0], p[1])
			}
			dsn = "postgres://etl:" + url.QueryEscape(secret) + "@db.example.com/x?" + q.Encode()
		} else {
			dsn = "host=db.example.com user=etl password=" + secret
			for _, p := range params {
				dsn += " " + p[0] + "='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(p[1]) + "'"
			}
		}
		cfg, err := pgetl.ParseConfig(dsn)
		if err != nil {
			require.NotContains(t, err.Error(), secret)
			require.True(t, strings.HasPrefix(err.Error(), "pgetl: "), err.Error())
			return
		}
		for _, p := range params[:5] {
			require.NotContains(t, cfg.ConnConfig.RuntimeParams, p[0])
		}
		d, err := time.ParseDuration(lifetime)
		require.NoError(t, err, "accepted lifetime %q", lifetime)
		require.Equal(t, d, cfg.MaxConnLifetime)
		// Accepted integers round-trip to the socket (0 = the OS setting).
		num := func(s string) int {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			require.NoError(t, err, "accepted %q", s)
			return n
		}
		require.Contains(t, []string{"0", "1"}, strings.TrimSpace(keepalives))
		if runtime.GOOS != "linux" {
			return
		}
		c, err := cfg.ConnConfig.DialFunc(context.Background(), "tcp", ln.Addr().String())
		require.NoError(t, err)
		defer c.Close()
		o, err := sockopt.Read(c)
		require.NoError(t, err)
		require.Equal(t, strings.TrimSpace(keepalives) == "1", o.KeepAlive)
		require.Equal(t, time.Duration(num(userTimeout))*time.Millisecond, o.UserTimeout)
		if o.KeepAlive {
			if n := num(idle); n > 0 {
				require.Equal(t, time.Duration(n)*time.Second, o.Idle)
			}
			if n := num(interval); n > 0 {
				require.Equal(t, time.Duration(n)*time.Second, o.Interval)
			}
			if n := num(count); n > 0 {
				require.Equal(t, n, o.Count)
			}
		}
	})
}
