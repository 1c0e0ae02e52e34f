//! Benchmark helper for `bench/reports.sh`: prints the InfluxQL statements the report API sends
//! for a report request, one per line, made by the module's own core (`parse_report_query`,
//! `statements`) with the default measurements and `analytics_session field`, so that the
//! benchmark can time the same statements straight against InfluxDB. A report that may read
//! the daily rollups starts with the probe that looks for them; with `rollups` as the second
//! argument the statements that follow are those for when it found them.
//!
//! ```sh
//! cargo run --release --example report_statements -- 'report=pages&domain=www.example.com&period=30d'
//! ```

// The nginx-free core, compiled straight from the module's sources (the module's rlib cannot be
// linked without nginx's symbols), as examples/sink_ceiling.rs does.
#[path = "../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

use crate::core::report::{parse_report_query, rollup_probe, rollups_apply, statements, Source};
use crate::core::{unix_now_ns, Measurements, SessionStorage};

fn main() {
    let Some(args) = std::env::args().nth(1) else {
        eprintln!("usage: report_statements 'report=NAME&domain=HOST&period=P' [rollups]");
        std::process::exit(2);
    };
    let now_ms = i64::try_from(unix_now_ns() / 1_000_000).unwrap_or(i64::MAX);
    match parse_report_query(args.as_bytes(), now_ms) {
        Ok(query) => {
            let m = Measurements::default();
            let rollups = std::env::args().nth(2).as_deref() == Some("rollups");
            let source = if rollups {
                Source::Rollups
            } else {
                Source::Raw
            };
            // The report API asks whether the rollups exist first, whether they do or not.
            if rollups_apply(&query) {
                println!("{}", rollup_probe(&query, &m));
            }
            for statement in statements(&query, &m, SessionStorage::Field, source) {
                println!("{statement}");
            }
        }
        Err(e) => {
            eprintln!("report_statements: {e}");
            std::process::exit(1);
        }
    }
}
