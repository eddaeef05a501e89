# pgetl's everyday commands. The tests and benchmarks need PostgreSQL: see README.md
# (Testing); bash .ci/run starts PostgreSQL and a PgBouncer and runs what CI runs.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

GO ?= go
# staticcheck runs through go run, so no binary needs installing.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

# Packages holding the benchmark suite that make bench measures.
BENCH_PKGS ?= .
# Benchmarks to run (go test -bench regexp), runs of each, and the report's baseline.
BENCH ?= .
BENCH_COUNT ?= 5
BENCH_BASELINE ?= Baseline.*one_?tx
BENCH_OUT ?= bench.out

# The demo job: examples/products once it exists, else examples/demo.
DEMO := $(if $(wildcard examples/products),products,demo)

.PHONY: all test bench bench-ci lint fmt demo tidy

all: lint test

## test: the whole test suite (core and contrib/river) with the race detector, against real PostgreSQL.
test:
	$(GO) test -race -count=1 -timeout 60m ./...
	cd contrib/river && $(GO) test -race -count=1 -timeout 10m ./...

## bench: the benchmark suite, -count $(BENCH_COUNT), then the ratio table.
bench:
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchmem -count $(BENCH_COUNT) -timeout 120m $(BENCH_PKGS) | tee $(BENCH_OUT)
	$(GO) run ./internal/benchreport -baseline '$(BENCH_BASELINE)' $(BENCH_OUT)

## bench-ci: every benchmark once at reduced sizes: checked to work, not timed.
bench-ci:
	PGETL_BENCH_SMALL=1 $(GO) test -run '^$$' -bench . -benchtime=1x -timeout 30m ./...

## lint: gofmt, go vet and staticcheck.
lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt: these files need formatting (make fmt):"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	cd contrib/river && $(GO) vet ./... && $(GO) run $(STATICCHECK) ./...

## fmt: format every Go file.
fmt:
	gofmt -w .

## demo: run the example job against DATABASE_URL or libpq defaults.
demo:
	$(GO) run ./examples/$(DEMO)

## tidy: tidy go.mod and go.sum.
tidy:
	$(GO) mod tidy
	cd contrib/river && $(GO) mod tidy
