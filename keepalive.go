package pgetl

import (
	"fmt"
	"math"
	"net"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Defaults of [DefaultKeepalive], from field reports of long ETL jobs losing their
// connection to NAT gateways, load balancers and failovers: a dead peer is noticed
// after about KeepaliveIdleDefault + KeepaliveIntervalDefault × KeepaliveCountDefault
// (80 s) whether the connection is idle (keepalive probes) or has unacknowledged
// writes (TCP_USER_TIMEOUT), instead of Go's 15 s/15 s/9 and the kernel's ~15 min
// of write retransmissions.
const (
	// KeepaliveIdleDefault is the idle time before the first keepalive probe.
	KeepaliveIdleDefault = 30 * time.Second
	// KeepaliveIntervalDefault is the time between keepalive probes.
	KeepaliveIntervalDefault = 10 * time.Second
	// KeepaliveCountDefault is the number of unanswered probes before the
	// connection is dropped.
	KeepaliveCountDefault = 5
	// KeepaliveUserTimeoutDefault bounds how long written data may stay
	// unacknowledged (TCP_USER_TIMEOUT); it equals idle + interval × count so that
	// both ways of noticing a dead peer take the same time.
	KeepaliveUserTimeoutDefault = KeepaliveIdleDefault + KeepaliveIntervalDefault*KeepaliveCountDefault
)

// Upper bounds accepted by Linux for the keepalive options.
const (
	maxKeepaliveSecs  = 32767
	maxKeepaliveCount = 127
)

// Keepalive is the TCP liveness configuration of the client socket, and of the
// server's socket for the same connection (see [Keepalive.ServerSettings]).
//
// A zero field means "leave the operating system's setting alone", as 0 does for
// the libpq keys keepalives_idle, keepalives_interval, keepalives_count and
// tcp_user_timeout; so the zero Keepalive turns keepalives on with the OS
// defaults (on Linux 2 h/75 s/9, far too slow for ETL). Use [DefaultKeepalive] for
// pgetl's defaults; [ParseConfig] starts from it. Negative values are invalid
// (see [Keepalive.Validate]).
type Keepalive struct {
	// Idle is the time a connection must be idle before the first probe
	// (TCP_KEEPIDLE; libpq keepalives_idle). Whole seconds, rounded up. Zero leaves the OS setting;
	// DefaultKeepalive and ParseConfig use KeepaliveIdleDefault (30 s).
	Idle time.Duration
	// Interval is the time between probes (TCP_KEEPINTVL; libpq
	// keepalives_interval). Whole seconds, rounded up. Zero leaves the OS
	// setting; DefaultKeepalive and ParseConfig use KeepaliveIntervalDefault
	// (10 s).
	Interval time.Duration
	// Count is the number of unanswered probes after which the connection is
	// dropped (TCP_KEEPCNT; libpq keepalives_count). Zero leaves the OS
	// setting; DefaultKeepalive and ParseConfig use KeepaliveCountDefault (5).
	Count int
	// UserTimeout is how long written data may remain unacknowledged before the
	// connection is dropped (TCP_USER_TIMEOUT, Linux only; libpq
	// tcp_user_timeout). It bounds a write or a COMMIT sent into a dead
	// network, which keepalives do not cover. Whole milliseconds, rounded up.
	// It applies also when Disable is set. Zero leaves the OS setting (no
	// bound); DefaultKeepalive and ParseConfig use KeepaliveUserTimeoutDefault
	// (80 s).
	UserTimeout time.Duration
	// Disable turns TCP keepalives off (SO_KEEPALIVE=0; libpq keepalives=0).
	// Idle, Interval and Count are then ignored. Defaults to false.
	Disable bool
}

// DefaultKeepalive returns pgetl's defaults: [KeepaliveIdleDefault],
// [KeepaliveIntervalDefault], [KeepaliveCountDefault] and
// [KeepaliveUserTimeoutDefault].
func DefaultKeepalive() Keepalive {
	return Keepalive{
		Idle:        KeepaliveIdleDefault,
		Interval:    KeepaliveIntervalDefault,
		Count:       KeepaliveCountDefault,
		UserTimeout: KeepaliveUserTimeoutDefault,
	}
}

// Validate reports a field that is negative or above what Linux accepts
// (32767 s for Idle and Interval, 127 for Count, 2^31-1 ms for UserTimeout).
func (k Keepalive) Validate() error {
	checkDur := func(field string, d, maxD time.Duration) error {
		if d < 0 || d > maxD {
			return newConfigError("Keepalive."+field, d.String(), fmt.Errorf("must be between 0 and %s", maxD), nil)
		}
		return nil
	}
	if err := checkDur("Idle", k.Idle, maxKeepaliveSecs*time.Second); err != nil {
		return err
	}
	if err := checkDur("Interval", k.Interval, maxKeepaliveSecs*time.Second); err != nil {
		return err
	}
	if k.Count < 0 || k.Count > maxKeepaliveCount {
		return newConfigError("Keepalive.Count", strconv.Itoa(k.Count), fmt.Errorf("must be between 0 and %d", maxKeepaliveCount), nil)
	}
	return checkDur("UserTimeout", k.UserTimeout, math.MaxInt32*time.Millisecond)
}

// Apply makes cfg dial with k: it sets cfg.DialFunc to a [net.Dialer] with
// KeepAliveConfig from k, a Control function setting TCP_USER_TIMEOUT (Linux;
// nothing elsewhere) and Timeout cfg.ConnectTimeout (pgconn bounds each attempt by
// ConnectTimeout too). Options apply to TCP connections only; Unix sockets are
// dialed unchanged. Apply replaces any DialFunc already set.
//
// Apply does not validate: a negative field leaves that option to the OS, and a
// value the kernel refuses makes the dial fail. [ParseConfig] validates; call
// [Keepalive.Validate] for a Keepalive you build.
func (k Keepalive) Apply(cfg *pgconn.Config) {
	cfg.DialFunc = k.dialer(cfg.ConnectTimeout).DialContext
}

func (k Keepalive) dialer(timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	if k.Disable {
		d.KeepAlive = -1
	} else {
		// net.KeepAliveConfig: zero picks Go's defaults, negative leaves the
		// OS setting; pgetl's zero means the OS setting.
		osDefault := func(v int64) int64 {
			if v <= 0 {
				return -1
			}
			return v
		}
		d.KeepAliveConfig = net.KeepAliveConfig{
			Enable:   true,
			Idle:     time.Duration(osDefault(int64(k.Idle))),
			Interval: time.Duration(osDefault(int64(k.Interval))),
			Count:    int(osDefault(int64(k.Count))),
		}
	}
	if k.UserTimeout > 0 {
		d.Control = userTimeoutControl(ceilMillis(k.UserTimeout))
	}
	return d
}

// ServerSettings returns the server-side equivalents of k as "name = value"
// assignments of tcp_keepalives_idle, tcp_keepalives_interval,
// tcp_keepalives_count (seconds, count) and tcp_user_timeout (milliseconds),
// e.g. "tcp_keepalives_idle = 30", for SET LOCAL in a transaction (a plain SET
// outlives the transaction behind a transaction pooler, and pgetl puts nothing
// in the startup packet). With them the server notices a vanished client and
// ends its backend, instead of keeping it idle in transaction with its locks
// held. Zero fields are omitted (the server keeps its setting); a disabled
// Keepalive yields nothing.
func (k Keepalive) ServerSettings() []string {
	if k.Disable {
		return nil
	}
	var out []string
	add := func(name string, v int64) {
		if v > 0 {
			out = append(out, name+" = "+strconv.FormatInt(v, 10))
		}
	}
	add("tcp_keepalives_idle", ceilSeconds(k.Idle))
	add("tcp_keepalives_interval", ceilSeconds(k.Interval))
	add("tcp_keepalives_count", int64(k.Count))
	add("tcp_user_timeout", ceilMillis(k.UserTimeout))
	return out
}

func ceilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

func ceilMillis(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Millisecond - 1) / time.Millisecond)
}
