package dsn

import (
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParse(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		want map[string]string
	}{
		{"", map[string]string{}},
		{"host=h connect_timeout=0", map[string]string{"host": "h", "connect_timeout": "0"}},
		{"  host = h   password='a b\\'c'  x=\\ y ", map[string]string{"host": "h", "password": "a b'c", "x": " y"}},
		{"a= b=2 c=3", map[string]string{"a": "b=2", "c": "3"}}, // whitespace after "=" is skipped, as in libpq
		{"a=''", map[string]string{"a": ""}},
		{"postgres://u:p%40ss@h:5/db?connect_timeout=0&x=1&x=2", map[string]string{"user": "u", "password": "p@ss", "connect_timeout": "0", "x": "2"}},
		{"postgresql://h/db", map[string]string{}},
	} {
		got, err := Parse(tc.in)
		require.NoError(t, err, tc.in)
		require.Equal(t, tc.want, got, tc.in)
	}
	for _, bad := range []string{"host", "a='unterminated", "a b=1", "=1", "postgres://u:p@h/db?%zz", "postgres://[::1"} {
		_, err := Parse(bad)
		require.Error(t, err, bad)
	}
}

func TestSecretsAndRedact(t *testing.T) {
	t.Parallel()
	require.Equal(t, []string{"pw", "sslpw"}, Secrets("password=pw sslpassword=sslpw"))
	require.Equal(t, []string{"pw"}, Secrets("postgres://u:pw@h/db"))
	require.Empty(t, Secrets("host=h"))
	require.Equal(t, "a xxxxx b xxxxx", Redact("a pw b pw", "pw", ""))
	require.False(t, IsURL("host=h"))
	require.True(t, IsURL("postgresql://h"))
}
