// Command pgetl is pgetl's operator tool.
//
//	go -C cmd/pgetl run . doctor [-dsn DSN] [-middlebox-idle 60s] [-older-than 30s] [-app PATTERN] [-terminate [-yes]]
//
// doctor checks a connection string and its server the way an operator would
// before a three-hour job, and finds the sessions left idle in transaction:
//
//   - the client's TCP keepalive and TCP_USER_TIMEOUT as the kernel reports them on
//     a live socket of a [pgetl.NewPool] connection (getsockopt), against the
//     idle timeout of the middleboxes (NAT, load balancer, proxy) declared with
//     -middlebox-idle: the first keepalive probe must come before they drop an idle
//     flow;
//   - the server's tcp_keepalives_idle/interval/count and tcp_user_timeout (how
//     soon it notices a vanished client whose backend holds locks),
//     idle_in_transaction_session_timeout, idle_session_timeout and
//     statement_timeout;
//   - whether a pooler is in the way, and which exec mode to use (heuristics below);
//   - the sessions idle in transaction for longer than -older-than (pid,
//     application_name, user, how long idle, transaction age, last query); with
//     -terminate it ends them (pg_terminate_backend) after a confirmation read from
//     stdin, or at once with -yes. -app restricts the list (and so the
//     termination) to application names matching a LIKE pattern.
//
// # Pooler heuristics
//
// A pooler hands the client a BackendKeyData of its own (PgBouncer's cancel key
// is random), so the process id the client was told at connect differs from
// pg_backend_pid() on the server: direct connections always match. To tell
// transaction (or statement) pooling from session pooling, two client connections
// are held open at once and each asks pg_backend_pid() in its own transaction; if
// both were served by the same server backend, server connections are shared
// between clients, i.e. transaction pooling. Different backends mean session
// pooling, or transaction pooling whose other server connections were busy; the
// report says so.
//
// # Exit status
//
// 0: no problem found; 1: warnings (each line starting WARN says what to change);
// 2: the check could not run (bad flags, connection failed).
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage: pgetl <command> [flags]

commands:
  doctor   check a connection string and server for long ETL jobs, and find
           (and with -terminate end) sessions left idle in transaction

run "pgetl doctor -h" for the doctor's flags
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitError
	}
	switch args[0] {
	case "doctor":
		return doctor(ctx, args[1:], stdin, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "pgetl: unknown command %q\n\n%s", args[0], usage)
	return exitError
}
