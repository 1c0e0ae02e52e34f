# Front door for building, testing and the demo (see README.md).
CARGO ?= cargo

.PHONY: deps build check test test-install deb demo bench bench-overload bench-reports bench-spool

deps:
	./scripts/install-deps.sh

build: deps
	$(CARGO) build --release

check:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Unit tests of the pure core, then integration tests against a real nginx with the module
# and a real InfluxDB (both started by the tests on free loopback ports), then the install
# tests: nginx's own build (--add-dynamic-module) and the Debian package (needs root or sudo:
# it installs and purges the package).
test: deps
	$(CARGO) test
	./tests/install/dynamic_module.sh
	./tests/install/deb.sh

test-install: deps
	./tests/install/dynamic_module.sh
	./tests/install/deb.sh

# target/debian/libnginx-mod-http-analytics_<version>_<arch>.deb for Debian's own nginx.
deb: deps
	./scripts/build-deb.sh

demo: deps
	./scripts/demo.sh

bench: deps
	./bench/run.sh
	./bench/hotpath.sh
	./bench/spool.sh

# Overload: 2,000 connections while InfluxDB is frozen for 10 s. With
# BASELINE_MODULE=/path/to/an/older/libngx_http_analytics_module.so it alternates that module and
# this one and prints ratios current/baseline.
bench-overload: deps
	./bench/overload.sh

# Reports: 1,000,000 synthetic page views over 30 days in a fresh InfluxDB; the latency of each
# report and of a whole dashboard view (period=30d), first and repeated.
bench-reports: deps
	./bench/reports.sh

# Spool: beacons/s and p99 with InfluxDB up (the write path) and down (the disk spool), in
# `wait` and `background` mode, with ratios; then the time to drain 1,000,000 spooled lines.
bench-spool: deps
	./bench/spool.sh
