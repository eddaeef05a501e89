package workload

import (
	"testing"
	"time"
)

func TestParseTimestamp(t *testing.T) {
	ist := time.FixedZone("", 5*3600+30*60)
	for _, tc := range []struct {
		in   string
		want time.Time
	}{
		{"2024-01-12T13:46:41Z", time.Date(2024, 1, 12, 13, 46, 41, 0, time.UTC)},
		{"2024-01-12T13:46:41.25+05:30", time.Date(2024, 1, 12, 13, 46, 41, 250e6, ist)},
		{"2024-01-12 13:46:41+00", time.Date(2024, 1, 12, 13, 46, 41, 0, time.UTC)},
		{"2024-01-12 13:46:41.123456+00", time.Date(2024, 1, 12, 13, 46, 41, 123456000, time.UTC)},
		{"2024-01-12 13:46:41+05:30", time.Date(2024, 1, 12, 13, 46, 41, 0, ist)},
		{"2024-01-12 13:46:41.5-03", time.Date(2024, 1, 12, 13, 46, 41, 5e8, time.FixedZone("", -3*3600))},
		{"1850-01-01 00:00:00+00:53:28", time.Date(1850, 1, 1, 0, 0, 0, 0, time.FixedZone("", 53*60+28))},
	} {
		got, err := ParseTimestamp(tc.in)
		if err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		if !got.Equal(tc.want) {
			t.Fatalf("%s: got %v, want %v", tc.in, got, tc.want)
		}
	}
	for _, bad := range []string{"", "2024-01-12", "2024-01-12 13:46:41", "12/01/2024 13:46", "2024-01-12T13:46:41", "yesterday"} {
		if _, err := ParseTimestamp(bad); err == nil {
			t.Fatalf("%q: parsed", bad)
		}
	}
}
