package faultproxy

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// withHostPort returns connString with its host and port replaced (URL or
// keyword=value form; "" means libpq defaults and yields keyword=value).
func withHostPort(connString, host string, port int) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		scheme, rest, _ := strings.Cut(connString, "://")
		authority, tail := rest, ""
		if i := strings.IndexAny(rest, "/?"); i >= 0 {
			authority, tail = rest[:i], rest[i:]
		}
		userinfo := ""
		if at := strings.LastIndex(authority, "@"); at >= 0 {
			userinfo = authority[:at+1]
		}
		path, query, hasQuery := strings.Cut(tail, "?")
		if hasQuery {
			// Drop host= and port= parameters: they would override the authority.
			var keep []string
			for _, kv := range strings.Split(query, "&") {
				if k, _, _ := strings.Cut(kv, "="); kv != "" && k != "host" && k != "port" {
					keep = append(keep, kv)
				}
			}
			if len(keep) > 0 {
				path += "?" + strings.Join(keep, "&")
			}
		}
		return scheme + "://" + userinfo + net.JoinHostPort(host, strconv.Itoa(port)) + path
	}
	// keyword=value: later keywords override earlier ones.
	s := fmt.Sprintf("host=%s port=%d", host, port)
	if strings.TrimSpace(connString) == "" {
		return s
	}
	return connString + " " + s
}
