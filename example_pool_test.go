package pgetl_test

import (
	"context"
	"fmt"
	"time"

	"github.com/pgetl/pgetl"
)

// ExampleNewPool connects with DATABASE_URL (or PGETL_TEST_DATABASE_URL, or
// libpq's defaults when both are empty) and shows the pool settings in effect.
func ExampleNewPool() {
	connString := exampleDSN()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	pool, err := pgetl.NewPool(ctx, connString)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	var one int
	if err := pool.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		fmt.Println(err)
		return
	}

	cfg := pool.Config()
	fmt.Println("connected:", one == 1)
	fmt.Println("max conns:", cfg.MaxConns)
	fmt.Println("max conn lifetime:", cfg.MaxConnLifetime, "+ jitter", cfg.MaxConnLifetimeJitter)
	fmt.Println("max conn idle time:", cfg.MaxConnIdleTime)
	fmt.Println("health check period:", cfg.HealthCheckPeriod)
	fmt.Println("ping timeout:", cfg.PingTimeout)
	fmt.Println("connect timeout:", cfg.ConnConfig.ConnectTimeout)
	fmt.Println("exec mode:", cfg.ConnConfig.DefaultQueryExecMode)
	fmt.Printf("keepalive: %+v\n", pgetl.DefaultKeepalive())
	// Output:
	// connected: true
	// max conns: 4
	// max conn lifetime: 5m0s + jitter 30s
	// max conn idle time: 50s
	// health check period: 10s
	// ping timeout: 5s
	// connect timeout: 10s
	// exec mode: cache statement
	// keepalive: {Idle:30s Interval:10s Count:5 UserTimeout:1m20s Disable:false}
}

// ExampleParseConfig shows libpq's keepalive keys and pgetl's pooler key being
// consumed (nothing reaches the server's startup packet), and a bad value
// reported with its key and without the password.
func ExampleParseConfig() {
	cfg, err := pgetl.ParseConfig("postgres://etl:secret@db.example.com/warehouse" +
		"?keepalives_idle=60&tcp_user_timeout=120000&pgetl_pooler=pgbouncer&pool_max_conns=8")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("max conns:", cfg.MaxConns)
	fmt.Println("exec mode:", cfg.ConnConfig.DefaultQueryExecMode)
	fmt.Println("startup parameters:", len(cfg.ConnConfig.RuntimeParams))

	_, err = pgetl.ParseConfig("host=db.example.com user=etl password=secret keepalives_count=abc")
	fmt.Println(err)
	// Output:
	// max conns: 8
	// exec mode: cache describe
	// startup parameters: 0
	// pgetl: keepalives_count="abc": not an integer: invalid syntax
}

// ExampleKeepalive_ServerSettings prints the server-side settings that make the
// server drop a vanished client's backend; run them with SET LOCAL at the start
// of a transaction.
func ExampleKeepalive_ServerSettings() {
	for _, s := range pgetl.DefaultKeepalive().ServerSettings() {
		fmt.Println("SET LOCAL " + s)
	}
	// Output:
	// SET LOCAL tcp_keepalives_idle = 30
	// SET LOCAL tcp_keepalives_interval = 10
	// SET LOCAL tcp_keepalives_count = 5
	// SET LOCAL tcp_user_timeout = 80000
}
