# Front door for building, testing and the demo (see README.md).
CARGO ?= cargo

.PHONY: deps build check test demo bench

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
	./bench/hotpath.sh
