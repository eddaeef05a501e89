//go:build !linux

package sockopt

func read(uintptr) (Options, error) { return Options{}, ErrUnsupported }
