package remotebench_test

import (
	"testing"

	"github.com/pgetl/pgetl/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }
