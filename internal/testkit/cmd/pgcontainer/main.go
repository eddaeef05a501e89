// Command pgcontainer starts a throwaway PostgreSQL in a Docker container with
// testcontainers-go, prints its connection string on one line of stdout, and stops
// and removes the container when its stdin reaches EOF (or on SIGINT/SIGTERM).
//
// It is the last resort of the core module's internal/pgtest for a machine with
// Docker but neither PGETL_TEST_DATABASE_URL nor a local server: pgtest runs it with
// `go run ./cmd/pgcontainer` in this module's directory and holds its stdin open
// while the tests run, so the container goes away when the test binary exits, even
// if it is killed (testcontainers' reaper container is a second line of defence).
// It lives here, in the test-kit module, so that testcontainers and the Docker
// client stay out of the core module's go.mod.
//
// Exit status: 0 after the container was stopped, 1 if it could not be started (the
// reason on stderr; nothing on stdout), 2 on bad usage.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
)

func main() {
	image := flag.String("image", "postgres:16-alpine", "the PostgreSQL image")
	startTimeout := flag.Duration("start-timeout", 3*time.Minute, "how long pulling and starting may take")
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*image, *startTimeout, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "pgcontainer: %v\n", err)
		os.Exit(1)
	}
}

func run(image string, startTimeout time.Duration, stdin io.Reader, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	c, err := tcpostgres.Run(ctx, image,
		tcpostgres.WithDatabase("test"), tcpostgres.WithUsername("postgres"),
		tcpostgres.WithPassword("postgres"), tcpostgres.BasicWaitStrategies())
	if err != nil {
		if c != nil {
			_ = c.Terminate(context.Background())
		}
		return fmt.Errorf("start %s: %w", image, err)
	}
	defer func() {
		stop, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.Terminate(stop); err != nil {
			fmt.Fprintf(os.Stderr, "pgcontainer: stop: %v\n", err)
		}
	}()
	dsn, err := c.ConnectionString(ctx, "sslmode=disable")
	if err != nil {
		return fmt.Errorf("connection string: %w", err)
	}
	w := bufio.NewWriter(stdout)
	fmt.Fprintln(w, dsn)
	if err := w.Flush(); err != nil {
		return fmt.Errorf("write connection string: %w", err)
	}

	// Wait for EOF on stdin (the parent is done or gone) or a signal.
	eof := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, stdin)
		close(eof)
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-eof:
	case <-sig:
	}
	return nil
}
