//! The nginx-free core of the module: beacon schema and validation, the 422-class policy checks,
//! InfluxDB line-protocol encoding, unique timestamps and the dashboard page's assembly.
//!
//! Nothing in here touches nginx types or uses `unsafe`, and no function panics on any input, so
//! all of it is tested with plain `cargo test`.

#![forbid(unsafe_code)]

pub mod batch;
pub mod beacon;
pub mod bots;
pub mod dashboard;
pub mod line_protocol;
pub mod metrics;
pub mod policy;
pub mod report;
#[cfg(test)]
mod roundtrip_tests;
pub mod spool;
pub mod timestamp;

pub use beacon::{parse_beacon, referrer_host, Beacon, BeaconError, Common, Event, PageView};
pub use line_protocol::{
    encode_point, sanitize_string_field, sanitize_tag_value, write_string_field, write_tag_value,
    SessionStorage,
};
pub use policy::{
    check_policy, host_without_port, parse_event_names, push_event_names, sanitize_snippet,
    validate_measurement_name, DomainPattern, Measurements, Refusal,
};
pub use timestamp::{unix_now_ns, UniqueClock, SLOT_BITS};
