package faults

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgetl/pgetl/internal/pgtest"
)

// Standby is a hot standby streaming from a throwaway primary Cluster: made with
// pg_basebackup -R (asynchronous streaming replication, so the primary acknowledges
// commits the standby has not received), run like any Cluster (its own directory and
// free port, stopped and removed in t.Cleanup). With CutLink, StopImmediate of the
// primary and Promote it plays a failover that loses acknowledged commits.
type Standby struct {
	*Cluster
	primary  *Cluster
	name     string // cluster_name: the walreceiver's application_name on the primary
	conninfo string // primary_conninfo as written by pg_basebackup -R
}

// NewStandby makes a streaming standby of primary, which must be running: a base
// backup (pg_basebackup -R -X stream) into a new directory, started on a free port of
// 127.0.0.1. It returns once the standby streams from primary (WaitStreaming).
func NewStandby(t testing.TB, primary *Cluster) *Standby {
	t.Helper()
	if _, err := os.Stat(filepath.Join(primary.bin, "pg_basebackup")); err != nil {
		pgtest.Unavailable(t, "faults: no pg_basebackup next to initdb in "+primary.bin)
	}
	c := &Cluster{user: primary.user, bin: primary.bin, dir: primary.user.mkdirFor(t, "pgetl-standby-")}
	t.Cleanup(func() {
		c.stopImmediate()
		if err := os.RemoveAll(c.dir); err != nil {
			t.Errorf("faults: remove %s: %v", c.dir, err)
		}
	})
	s := &Standby{Cluster: c, primary: primary, name: "pgetl_standby_" + strings.TrimPrefix(filepath.Base(c.dir), "pgetl-standby-")}
	start := time.Now()
	c.run(t, "pg_basebackup", "-D", c.DataDir(), "-h", primary.Host(), "-p", strconv.Itoa(primary.Port()),
		"-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync")
	// The copied configuration is the primary's: move the socket to the standby's
	// own directory and name the walreceiver (the port comes from startOnFreePort).
	appendFile(t, filepath.Join(c.DataDir(), "postgresql.conf"), fmt.Sprintf(
		"\n# pgetl faults standby\nunix_socket_directories = '%s'\ncluster_name = '%s'\nhot_standby = on\n", c.dir, s.name))
	c.startOnFreePort(t)
	s.conninfo = s.showPrimaryConninfo(t)
	if s.conninfo == "" {
		t.Fatalf("faults: standby %s: pg_basebackup -R wrote no primary_conninfo", c.Addr())
	}
	s.WaitStreaming(t)
	t.Logf("faults: standby %s of %s streaming in %v (data %s)", c.Addr(), primary.Addr(),
		time.Since(start).Round(time.Millisecond), c.DataDir())
	return s
}

// Timeouts of replication operations.
const (
	replicationTimeout = 30 * time.Second // streaming, catching up, the link going down
	promoteTimeout     = 60 * time.Second // pg_promote's own wait
)

// WaitStreaming waits until the standby's walreceiver streams from the primary (status
// "streaming" on the standby, a walsender in state "streaming" on the primary).
func (s *Standby) WaitStreaming(t testing.TB) {
	t.Helper()
	var last string
	ok := poll(replicationTimeout, 20*time.Millisecond, func() bool {
		recv, err := s.queryString(`SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'no walreceiver')`)
		if err != nil || recv != "streaming" {
			last = fmt.Sprintf("standby: %s %v", recv, err)
			return false
		}
		send, err := s.primary.queryString(`SELECT coalesce((SELECT state FROM pg_stat_replication WHERE application_name = $1), 'no walsender')`, s.name)
		last = fmt.Sprintf("primary: %s %v", send, err)
		return err == nil && send == "streaming"
	})
	if !ok {
		t.Fatalf("faults: standby %s not streaming within %v (%s)\n%s", s.Addr(), replicationTimeout, last, s.LogTail(20))
	}
}

// WaitCaughtUp waits until the standby has replayed all WAL the primary has written
// so far (pg_current_wal_lsn): every transaction committed before the call is then
// visible on the standby. It returns that LSN.
func (s *Standby) WaitCaughtUp(t testing.TB) string {
	t.Helper()
	target, err := s.primary.queryString(`SELECT pg_current_wal_lsn()::text`)
	if err != nil {
		t.Fatalf("faults: primary %s: current WAL position: %v", s.primary.Addr(), err)
	}
	var replay string
	ok := poll(replicationTimeout, 10*time.Millisecond, func() bool {
		var done string
		done, err = s.queryString(`SELECT (coalesce(pg_last_wal_replay_lsn(), '0/0') >= $1::pg_lsn)::text || ' ' || coalesce(pg_last_wal_replay_lsn()::text, '-')`, target)
		ok, at, _ := strings.Cut(done, " ")
		replay = at
		return err == nil && ok == "true"
	})
	if !ok {
		t.Fatalf("faults: standby %s did not replay up to %s within %v (at %s, %v)\n%s",
			s.Addr(), target, replicationTimeout, replay, err, s.LogTail(20))
	}
	return target
}

// CutLink cuts the replication link: primary_conninfo is set to ” (ALTER SYSTEM) and
// the configuration reloaded, which stops the walreceiver and starts no other. The
// standby stays in recovery, readable, with what it had received; the primary goes on
// acknowledging commits the standby will never see (replication is asynchronous). It
// returns once no walreceiver runs on the standby and no walsender serves it on the
// primary. (pg_wal_replay_pause would not do: WAL is still received, and promotion
// replays it.)
func (s *Standby) CutLink(t testing.TB) {
	t.Helper()
	s.Exec(t, "ALTER SYSTEM SET primary_conninfo = ''")
	s.Exec(t, "SELECT pg_reload_conf()")
	var last string
	ok := poll(replicationTimeout, 10*time.Millisecond, func() bool {
		recv, err := s.queryString(`SELECT count(*)::text FROM pg_stat_wal_receiver`)
		if err != nil || recv != "0" {
			last = fmt.Sprintf("standby: %s walreceivers %v", recv, err)
			return false
		}
		send, err := s.primary.queryString(`SELECT count(*)::text FROM pg_stat_replication WHERE application_name = $1`, s.name)
		last = fmt.Sprintf("primary: %s walsenders %v", send, err)
		return err == nil && send == "0"
	})
	if !ok {
		t.Fatalf("faults: replication link to standby %s still up after %v (%s)\n%s", s.Addr(), replicationTimeout, last, s.LogTail(20))
	}
}

// Reconnect restores the link CutLink cut (primary_conninfo as pg_basebackup wrote
// it) and waits until the standby streams again.
func (s *Standby) Reconnect(t testing.TB) {
	t.Helper()
	s.Exec(t, "ALTER SYSTEM SET primary_conninfo = "+quoteLiteral(s.conninfo))
	s.Exec(t, "SELECT pg_reload_conf()")
	s.WaitStreaming(t)
}

// Promote promotes the standby (pg_promote, waiting for it): it ends recovery after
// replaying the WAL it has, switches to a new timeline and accepts writes. It returns
// once a new session is read-write (what target_session_attrs=read-write checks).
func (s *Standby) Promote(t testing.TB) {
	t.Helper()
	start := time.Now()
	promoted, err := s.queryString(fmt.Sprintf(`SELECT pg_promote(true, %d)::text`, int(promoteTimeout.Seconds())))
	if err != nil || promoted != "true" {
		t.Fatalf("faults: promote standby %s: %q %v\n%s", s.Addr(), promoted, err, s.LogTail(20))
	}
	var last string
	ok := poll(replicationTimeout, 10*time.Millisecond, func() bool {
		ro, err := s.queryString(`SELECT pg_is_in_recovery()::text || ' ' || current_setting('transaction_read_only')`)
		last = fmt.Sprintf("in recovery, read only: %s %v", ro, err)
		return err == nil && ro == "false off"
	})
	if !ok {
		t.Fatalf("faults: promoted standby %s not read-write within %v (%s)\n%s", s.Addr(), replicationTimeout, last, s.LogTail(20))
	}
	t.Logf("faults: standby %s promoted in %v", s.Addr(), time.Since(start).Round(time.Millisecond))
}

// showPrimaryConninfo returns the standby's primary_conninfo setting.
func (s *Standby) showPrimaryConninfo(t testing.TB) string {
	t.Helper()
	v, err := s.queryString(`SHOW primary_conninfo`)
	if err != nil {
		t.Fatalf("faults: standby %s: %v", s.Addr(), err)
	}
	return v
}

// queryString runs sql (one text value) on a new session of the cluster.
func (c *Cluster) queryString(sql string, args ...any) (string, error) {
	conn, err := c.connect(5 * time.Second)
	if err != nil {
		return "", err
	}
	defer closeQuietly(conn)
	ctx, cancel := context.WithTimeout(context.Background(), clusterOpTimeout+10*time.Second)
	defer cancel()
	var v string
	err = conn.QueryRow(ctx, sql, args...).Scan(&v)
	return v, err
}

// quoteLiteral quotes s as an SQL string literal (standard_conforming_strings on).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
