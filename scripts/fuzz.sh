#!/usr/bin/env bash
# Fuzzes the pure core (src/core/) with cargo-fuzz / libFuzzer for N minutes (default 5).
#
#   scripts/fuzz.sh [MINUTES]          e.g. scripts/fuzz.sh 10
#   FUZZ_JOBS=4 scripts/fuzz.sh 10     4 fuzzing processes in parallel (libFuzzer -fork)
#
# Target `beacon` (fuzz/fuzz_targets/beacon.rs): any bytes as a beacon body; parse_beacon must
# not panic, and an accepted beacon must encode to exactly one line that the
# influxdb-line-protocol crate reads back to the same measurement, tags, fields and timestamp,
# with each `analytics_session` setting (the checker is check_body in
# src/core/roundtrip_tests.rs, which `cargo test` also runs).
#
# Needs: cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain, or a stable one with
# RUSTC_BOOTSTRAP=1 (set here unless the active toolchain is nightly).
#
# The committed seed corpus fuzz/corpus/beacon/ is only read; inputs the fuzzer finds go to
# fuzz/corpus-work/beacon/ (kept between runs, not committed). A crash or failed check is saved
# under fuzz/artifacts/beacon/ and the script exits non-zero; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run beacon fuzz/artifacts/beacon/<file>   (from fuzz/)
# and add the input to fuzz/corpus/beacon/ once fixed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

minutes=${1:-5}
case "$minutes" in
    '' | *[!0-9]*) echo "usage: $0 [MINUTES]" >&2; exit 2 ;;
esac
seconds=$((minutes * 60))

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 1
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

mkdir -p corpus-work/beacon artifacts/beacon
log=$(mktemp)
trap 'rm -f "$log"' EXIT

extra=()
if [ -n "${FUZZ_JOBS:-}" ]; then
    extra+=("-fork=$FUZZ_JOBS" "-ignore_crashes=0")
fi

echo "==> fuzzing target beacon for $minutes min (seeds: fuzz/corpus/beacon, $(ls corpus/beacon | wc -l) files)"
start=$(date +%s)
set +e
cargo fuzz run beacon corpus-work/beacon corpus/beacon -- \
    -max_total_time="$seconds" \
    -max_len=16384 \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -dict=beacon.dict \
    -print_final_stats=1 \
    "${extra[@]}" 2>&1 | tee "$log" | grep -E '^#[0-9]+.*(pulse|DONE)|ERROR|panicked|SUMMARY|Test unit written' | tail -n 40
status=${PIPESTATUS[0]}
set -e
elapsed=$(($(date +%s) - start))

execs=$( (grep -E '^stat::number_of_executed_units' "$log" || true) | awk '{s += $2} END {print s + 0}')
if [ "$execs" = 0 ]; then
    # -fork mode prints no final stats: take the last progress line's count.
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)
fi
echo "==> ran ${elapsed}s, ${execs:-?} executions, corpus-work: $(ls corpus-work/beacon | wc -l) inputs"
crashes=$(ls artifacts/beacon 2>/dev/null | wc -l)
if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    echo "==> FOUND $crashes input(s) in fuzz/artifacts/beacon/ (exit status $status):" >&2
    ls -l artifacts/beacon >&2 || true
    exit 1
fi
echo "==> no crash, no failed check"
