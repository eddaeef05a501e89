// Package dsn reads the keys of a PostgreSQL connection string, in URL
// (postgres://…?k=v) or keyword/value (k=v k='v w') form, with the same quoting
// rules as pgconn and libpq. It is for telling which keys a string sets
// explicitly and for finding the secrets that must never be printed; pgconn
// remains the parser of record for connecting.
package dsn

import (
	"errors"
	"net/url"
	"strings"
)

// IsURL reports whether s is in URL form.
func IsURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// Parse returns the keys that s sets and their (unquoted, unescaped) values. In
// URL form the user name and password of the authority are reported as "user"
// and "password", and the query parameters under their own names; host, port
// and database are not reported. A key given twice keeps its last value, as in
// libpq.
func Parse(s string) (map[string]string, error) {
	if IsURL(s) {
		return parseURL(s)
	}
	return parseKeywordValue(s)
}

func parseURL(s string) (map[string]string, error) {
	u, err := url.Parse(s)
	if err != nil {
		// Do not wrap: url.Error repeats the whole string, password included.
		return nil, errors.New("invalid URL")
	}
	m := make(map[string]string)
	if u.User != nil {
		m["user"] = u.User.Username()
		if pw, ok := u.User.Password(); ok {
			m["password"] = pw
		}
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, errors.New("invalid URL query")
	}
	for k, vs := range q {
		if len(vs) > 0 {
			m[k] = vs[len(vs)-1]
		}
	}
	return m, nil
}

const space = " \t\n\r\v\f"

func parseKeywordValue(s string) (map[string]string, error) {
	m := make(map[string]string)
	s = strings.TrimLeft(s, space)
	for len(s) > 0 {
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			return nil, errors.New("invalid keyword/value: missing \"=\"")
		}
		key := strings.Trim(s[:eq], space)
		if key == "" || strings.ContainsAny(key, space) {
			return nil, errors.New("invalid keyword/value: bad keyword")
		}
		s = strings.TrimLeft(s[eq+1:], space)
		var val strings.Builder
		switch {
		case len(s) == 0:
		case s[0] != '\'':
			i := 0
			for ; i < len(s) && !strings.ContainsRune(space, rune(s[i])); i++ {
				if s[i] == '\\' {
					i++
					if i == len(s) {
						break
					}
				}
				val.WriteByte(s[i])
			}
			s = strings.TrimLeft(s[i:], space)
		default:
			s = s[1:]
			i := 0
			for ; i < len(s) && s[i] != '\''; i++ {
				if s[i] == '\\' {
					i++
					if i == len(s) {
						break
					}
				}
				val.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, errors.New("invalid keyword/value: unterminated quoted string")
			}
			s = strings.TrimLeft(s[i+1:], space)
		}
		m[key] = val.String()
	}
	return m, nil
}

// Secrets returns the non-empty secret values (password, sslpassword) that s
// sets, for redaction. It returns what it can from a string that does not
// parse.
func Secrets(s string) []string {
	m, _ := Parse(s)
	var out []string
	for _, k := range []string{"password", "sslpassword"} {
		if v := m[k]; v != "" {
			out = append(out, v)
		}
	}
	return out
}

// Redact returns v with every occurrence of each non-empty secret replaced by
// "xxxxx".
func Redact(v string, secrets ...string) string {
	for _, s := range secrets {
		if s != "" {
			v = strings.ReplaceAll(v, s, "xxxxx")
		}
	}
	return v
}
