# Front door for building, testing and the demo (see README.md).
CARGO ?= cargo

.PHONY: deps build check test demo bench bench-overload

deps:
	./scripts/install-deps.sh

build: deps
	$(CARGO) build --release

check:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Unit tests of the pure core, then integration tests against a real nginx with the module
# and a real InfluxDB (both started by the tests on free loopback ports).
test: deps
	$(CARGO) test

demo: deps
	./scripts/demo.sh

bench: deps
	./bench/run.sh

# Overload: 2,000 connections while InfluxDB is frozen for 10 s. With
# BASELINE_MODULE=/path/to/an/older/libngx_http_analytics_module.so it alternates that module and
# this one and prints ratios current/baseline.
bench-overload: deps
	./bench/overload.sh
