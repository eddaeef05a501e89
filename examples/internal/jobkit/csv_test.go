package jobkit

import (
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCSV: quoted fields with commas, quotes and line breaks (\n and \r\n), as
// PostgreSQL's COPY … (FORMAT csv) writes them, come back whole, each record with the
// line it ends on; a record with a stray quote is refused alone; the index maps
// record numbers to those lines.
func TestCSV(t *testing.T) {
	file := "\ufeffsku,name,note\r\n" + // line 1
		"A,plain,x\r\n" + // 2
		"B,\"two\nlines\",y\n" + // 3-4
		"C,\"quote \"\" and, comma\",\"three\r\nline\r\nnote\"\n" + // 5-7
		"D,bad\"quote,z\n" + // 8
		"E,last,\"no newline at the end\"" // 9
	type rec struct {
		fields []string
		n      int64
		line   int64
		bad    bool
	}
	want := []rec{
		{[]string{"A", "plain", "x"}, 1, 2, false},
		{[]string{"B", "two\nlines", "y"}, 2, 4, false},
		{[]string{"C", "quote \" and, comma", "three\nline\nnote"}, 3, 7, false},
		{nil, 4, 8, true},
		{[]string{"E", "last", "no newline at the end"}, 5, 9, false},
	}
	c, err := NewCSV(strings.NewReader(file))
	require.NoError(t, err)
	require.Equal(t, "sku,name,note", c.Header())
	for _, w := range want {
		r, err := c.Next()
		require.NoError(t, err)
		require.Equal(t, w.fields, r.Fields, "record %d", w.n)
		require.Equal(t, w.n, r.N)
		require.Equal(t, w.line, r.Line, "record %d", w.n)
		require.Equal(t, w.bad, r.Err != nil, "record %d: %v", w.n, r.Err)
	}
	_, err = c.Next()
	require.True(t, errors.Is(err, io.EOF), "%v", err)

	x, err := IndexCSV(strings.NewReader(file))
	require.NoError(t, err)
	require.Equal(t, int64(5), x.Records)
	require.Equal(t, int64(9), x.LastLine)
	for _, w := range want {
		require.Equal(t, w.line, x.Line(w.n), "record %d", w.n)
	}

	plain, err := IndexCSV(strings.NewReader("h\n1\n2\n3\n"))
	require.NoError(t, err)
	require.Equal(t, CSVIndex{Records: 3, LastLine: 4}, plain)
	require.Equal(t, int64(3), plain.Line(2))

	_, err = NewCSV(strings.NewReader(""))
	require.Error(t, err)
}
