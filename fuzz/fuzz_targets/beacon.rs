//! Fuzz target `beacon`: any bytes as a beacon body. `parse_beacon` must not panic, and an
//! accepted beacon must encode to exactly one line that the `influxdb-line-protocol` crate reads
//! back to the same measurement, tags, fields and timestamp, for each `analytics_session`
//! setting (see `check_body` in src/core/roundtrip_tests.rs, which `cargo test` also runs with
//! proptest).
//!
//! Run it with scripts/fuzz.sh.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The nginx-free core, compiled straight from the module's sources.
#[path = "../../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

#[path = "../../src/core/roundtrip_tests.rs"]
#[allow(dead_code)]
mod roundtrip_tests;

fuzz_target!(|data: &[u8]| {
    let measurements = core::Measurements::default();
    // Every `analytics_session` setting: the body parses once per setting, which is cheap.
    for session in core::SessionStorage::ALL {
        roundtrip_tests::check_body(data, &measurements, session);
    }
});
