# pgetl's everyday commands. The tests and benchmarks need PostgreSQL: see README.md
# (Testing); bash .ci/run starts PostgreSQL and a PgBouncer and runs what CI runs.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

GO ?= go
# staticcheck runs through go run, so no binary needs installing.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

# Every module of the repository (a directory with a go.mod): the core module ".",
# then the nested ones (test kit, examples, cmd/pgetl, contrib/river). Each target
# below runs in each of them; a failure in one still runs the others, then fails.
MODULES := . $(sort $(patsubst ./%/go.mod,%,$(shell find . -mindepth 2 -name go.mod -not -path './.git/*')))

# Packages, in every module, holding the benchmark suite that make bench measures.
BENCH_PKGS ?= ./...
# Benchmarks to run (go test -bench regexp), runs of each, and the report's baseline.
BENCH ?= .
BENCH_COUNT ?= 5
BENCH_BASELINE ?= Baseline.*one_?tx
BENCH_OUT ?= bench.out

# The demo job: examples/products once it exists, else examples/demo.
DEMO := $(if $(wildcard examples/products),products,demo)

# each runs its shell command in every module's directory (with $$m set to it), goes
# on after a failure, and fails at the end naming the modules that failed.
define each
	@failed=""; for m in $(MODULES); do \
		echo "== $$m: $(strip $(1))"; \
		( cd "$$m" && $(1) ) || failed="$$failed $$m"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed in:$$failed"; exit 1; fi
endef

.PHONY: all test bench bench-ci lint fmt demo tidy modules

all: lint test

## test: the whole test suite of every module with the race detector, against real PostgreSQL.
test:
	$(call each,$(GO) test -race -count=1 -timeout 60m ./...)

## bench: the benchmark suite of every module, -count $(BENCH_COUNT), then the ratio table.
bench:
	@rm -f $(BENCH_OUT)
	$(call each,$(GO) test -run '^$$' -bench '$(BENCH)' -benchmem -count $(BENCH_COUNT) -timeout 120m $(BENCH_PKGS) | tee -a "$(CURDIR)/$(BENCH_OUT)")
	$(GO) run ./internal/benchreport -baseline '$(BENCH_BASELINE)' $(BENCH_OUT)

## bench-ci: every benchmark of every module once at reduced sizes: checked to work, not timed.
bench-ci:
	$(call each,PGETL_BENCH_SMALL=1 $(GO) test -run '^$$' -bench . -benchtime=1x -timeout 30m ./...)

## lint: gofmt (every file), then go vet and staticcheck in every module.
lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt: these files need formatting (make fmt):"; echo "$$unformatted"; exit 1; fi
	$(call each,$(GO) vet ./... && $(GO) run $(STATICCHECK) ./...)

## fmt: format every Go file.
fmt:
	gofmt -w .

## demo: run the example job (module examples/) against DATABASE_URL or libpq defaults.
demo:
	$(GO) -C examples run ./$(DEMO)

## tidy: tidy go.mod and go.sum of every module.
tidy:
	$(call each,$(GO) mod tidy)

## modules: list the modules the targets loop over.
modules:
	@echo $(MODULES)
