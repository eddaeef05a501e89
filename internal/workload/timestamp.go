package workload

import (
	"errors"
	"time"
)

// timestampLayouts are the forms ParseTimestamp takes: RFC 3339, and PostgreSQL's own
// timestamptz output (DateStyle ISO, what psql's \copy … TO and COPY … TO write):
// a space for the T, and an offset of hours ("+00"), hours and minutes ("+05:30")
// or, for historical zones, hours, minutes and seconds ("+00:53:28"). Fractional
// seconds are taken in every form (time.Parse accepts them after the seconds).
var timestampLayouts = []string{
	time.RFC3339,
	"2006-01-02 15:04:05-07",
	"2006-01-02 15:04:05-07:00",
	"2006-01-02 15:04:05-07:00:00",
}

// ErrTimestamp is returned by ParseTimestamp for text in none of its forms.
var ErrTimestamp = errors.New("not an RFC 3339 or PostgreSQL timestamp with time zone (2024-01-12T13:46:41Z, 2024-01-12 13:46:41+00)")

// ParseTimestamp parses a timestamp with time zone written as RFC 3339
// (2024-01-12T13:46:41Z, 2024-01-12T13:46:41.5+05:30) or as PostgreSQL writes it
// (2024-01-12 13:46:41+00, 2024-01-12 13:46:41.123456+05:30).
func ParseTimestamp(s string) (time.Time, error) {
	for _, layout := range timestampLayouts {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, ErrTimestamp
}
