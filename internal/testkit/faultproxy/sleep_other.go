//go:build !unix

package faultproxy

import "time"

// sleepPrecise sleeps d; off Unix it is time.Sleep, as precise as the runtime's
// timers.
func sleepPrecise(d time.Duration) { time.Sleep(d) }
