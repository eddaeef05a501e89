//go:build !race

package pgetlriver_test

const raceEnabled = false
