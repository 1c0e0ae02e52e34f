//! Collector metrics, the nginx-free part: the counters (plain atomics, so a [`Metrics`] placed in
//! memory shared by every worker is counted into by all of them without a lock), and their
//! exposition in the Prometheus text format (0.0.4) and as JSON.
//!
//! Label values come only from this module and the configuration: the outcomes are a fixed list,
//! and event names are those of `permitted_events` (every refused name is `other`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use serde_json::{json, Map, Value};

/// `outcome` label values of `nginx_analytics_beacons_total`, in index order.
pub const OUTCOMES: [&str; 10] = [
    "accepted",
    "invalid",
    "event_not_permitted",
    "domain_not_accepted",
    "body_too_large",
    "method_not_allowed",
    "bot",
    "write_failed",
    "spooled",
    "error",
];

/// Most distinct event names the counters hold (names configured beyond that count as `other`).
pub const MAX_EVENT_NAMES: usize = 1024;

/// Longest event name (as `permitted_events` accepts them).
pub const MAX_EVENT_NAME_LEN: usize = 64;

/// Upper bounds (seconds) of the write-duration histogram's buckets (`+Inf` follows).
pub const DURATION_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds of the batch-size histogram's buckets (`+Inf` follows).
pub const BATCH_BOUNDS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
];

/// Counts of a histogram with `N` finite buckets (not cumulative: each observation counts in
/// the first bucket whose bound it does not exceed, or in the last, `+Inf`, one).
#[repr(C)]
pub struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    overflow: AtomicU64,
    /// Sum of the observations, in millionths.
    sum_micros: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64; N], value: f64) {
        match bounds.iter().position(|b| value <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        let micros = (value.max(0.0) * 1e6).round() as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Cumulative counts per finite bound, then the total count, and the sum.
    fn snapshot(&self) -> ([u64; N], u64, f64) {
        let mut cumulative = [0u64; N];
        let mut running = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            running += bucket.load(Ordering::Relaxed);
            cumulative[i] = running;
        }
        let count = running + self.overflow.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, count, sum)
    }
}

/// One event name and its counter. The name is written once, by the master while it loads a
/// configuration, before the slot is published (`Metrics::event_names`, Release); workers only
/// read it.
#[repr(C)]
pub struct EventSlot {
    len: AtomicUsize,
    name: [AtomicU8; MAX_EVENT_NAME_LEN],
    count: AtomicU64,
}

impl Default for EventSlot {
    fn default() -> Self {
        EventSlot {
            len: AtomicUsize::new(0),
            name: std::array::from_fn(|_| AtomicU8::new(0)),
            count: AtomicU64::new(0),
        }
    }
}

impl EventSlot {
    fn is(&self, name: &[u8]) -> bool {
        self.len.load(Ordering::Acquire) == name.len()
            && self
                .name
                .iter()
                .zip(name)
                .all(|(cell, b)| cell.load(Ordering::Relaxed) == *b)
    }

    fn name(&self) -> String {
        let len = self.len.load(Ordering::Acquire).min(MAX_EVENT_NAME_LEN);
        let bytes: Vec<u8> = self.name[..len]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn set(&self, name: &[u8]) {
        for (cell, b) in self.name.iter().zip(name) {
            cell.store(*b, Ordering::Relaxed);
        }
        self.len.store(name.len(), Ordering::Release);
    }
}

/// Every counter of the collector. All zeroes is a valid, empty `Metrics`, so it can live in
/// zeroed shared memory; every field is an atomic, so every worker counts into it at once.
#[repr(C)]
pub struct Metrics {
    /// Unix time (seconds) the counters started from.
    start_time: AtomicU64,
    beacons: [AtomicU64; OUTCOMES.len()],
    events_other: AtomicU64,
    writes_ok: AtomicU64,
    writes_failed: AtomicU64,
    written_lines: AtomicU64,
    write_duration: Histogram<{ DURATION_BOUNDS.len() }>,
    batch_lines: Histogram<{ BATCH_BOUNDS.len() }>,
    waiting: AtomicI64,
    /// Slots of `events` in use; slots are only ever added (by the master, between cycles).
    event_names: AtomicUsize,
    events: [EventSlot; MAX_EVENT_NAMES],
}

/// The index of an outcome token in [`OUTCOMES`].
pub fn outcome_index(token: &str) -> Option<usize> {
    OUTCOMES.iter().position(|o| *o == token)
}

impl Metrics {
    /// Sets when the counters started, if not set yet (a zone reused across a reload keeps it).
    pub fn start(&self, unix_secs: u64) {
        let _ =
            self.start_time
                .compare_exchange(0, unix_secs, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Adds `names` that are not counted yet; returns how many did not fit.
    pub fn register_events<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> usize {
        let mut dropped = 0;
        for name in names {
            if self.event_slot(name).is_some() {
                continue;
            }
            let used = self.event_names.load(Ordering::Acquire);
            if used >= MAX_EVENT_NAMES || name.len() > MAX_EVENT_NAME_LEN || name.is_empty() {
                dropped += 1;
                continue;
            }
            self.events[used].set(name.as_bytes());
            self.event_names.store(used + 1, Ordering::Release);
        }
        dropped
    }

    fn event_slot(&self, name: &str) -> Option<&EventSlot> {
        let used = self
            .event_names
            .load(Ordering::Acquire)
            .min(MAX_EVENT_NAMES);
        self.events[..used]
            .iter()
            .find(|slot| slot.is(name.as_bytes()))
    }

    /// Counts a beacon's final outcome (a token of [`OUTCOMES`]; others are not beacons).
    pub fn count_outcome(&self, token: &str) {
        if let Some(i) = outcome_index(token) {
            self.beacons[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an accepted event beacon by name (`other` when the name is not registered).
    pub fn count_event(&self, name: &str) {
        match self.event_slot(name) {
            Some(slot) => slot.count.fetch_add(1, Ordering::Relaxed),
            None => self.events_other.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Counts a refused event name (always `other`: names from the network are never labels).
    pub fn count_refused_event(&self) {
        self.events_other.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished write of `lines` lines that took `seconds`.
    pub fn count_write(&self, stored: bool, lines: usize, seconds: f64) {
        if stored {
            self.writes_ok.fetch_add(1, Ordering::Relaxed);
            self.written_lines
                .fetch_add(lines as u64, Ordering::Relaxed);
        } else {
            self.writes_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.write_duration.observe(&DURATION_BOUNDS, seconds);
    }

    /// Counts a write as it starts, by its number of lines.
    pub fn count_batch(&self, lines: usize) {
        self.batch_lines.observe(&BATCH_BOUNDS, lines as f64);
    }

    /// Changes the number of requests waiting for room by `delta`.
    pub fn add_waiting(&self, delta: i64) {
        self.waiting.fetch_add(delta, Ordering::Relaxed);
    }

    fn events(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        let used = self
            .event_names
            .load(Ordering::Acquire)
            .min(MAX_EVENT_NAMES);
        self.events[..used]
            .iter()
            .map(|slot| (slot.name(), slot.count.load(Ordering::Relaxed)))
            .chain(std::iter::once((
                "other".to_string(),
                self.events_other.load(Ordering::Relaxed),
            )))
    }

    /// The counters in the Prometheus text exposition format, version 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        family(
            &mut out,
            "nginx_analytics_beacons_total",
            "counter",
            "Beacons received, by outcome.",
        );
        for (i, outcome) in OUTCOMES.iter().enumerate() {
            let n = self.beacons[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "nginx_analytics_beacons_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        family(
            &mut out,
            "nginx_analytics_events_total",
            "counter",
            "Event beacons accepted, by event name; refused and unlisted names count as other.",
        );
        for (name, n) in self.events() {
            let _ = writeln!(
                out,
                "nginx_analytics_events_total{{event=\"{}\"}} {n}",
                label_value(&name)
            );
        }
        family(
            &mut out,
            "nginx_analytics_writes_total",
            "counter",
            "Writes to the sink, by result.",
        );
        for (result, n) in [("ok", &self.writes_ok), ("failed", &self.writes_failed)] {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "nginx_analytics_writes_total{{result=\"{result}\"}} {n}"
            );
        }
        family(
            &mut out,
            "nginx_analytics_written_lines_total",
            "counter",
            "Lines (points) the sink stored.",
        );
        let lines = self.written_lines.load(Ordering::Relaxed);
        let _ = writeln!(out, "nginx_analytics_written_lines_total {lines}");
        family(
            &mut out,
            "nginx_analytics_write_duration_seconds",
            "histogram",
            "Time from the start of a write to the sink's answer.",
        );
        write_histogram(
            &mut out,
            "nginx_analytics_write_duration_seconds",
            &DURATION_BOUNDS,
            self.write_duration.snapshot(),
        );
        family(
            &mut out,
            "nginx_analytics_batch_lines",
            "histogram",
            "Lines per write.",
        );
        write_histogram(
            &mut out,
            "nginx_analytics_batch_lines",
            &BATCH_BOUNDS,
            self.batch_lines.snapshot(),
        );
        family(
            &mut out,
            "nginx_analytics_waiting_requests",
            "gauge",
            "Beacons waiting for room in a batch (every write slot busy).",
        );
        let waiting = self.waiting.load(Ordering::Relaxed).max(0);
        let _ = writeln!(out, "nginx_analytics_waiting_requests {waiting}");
        family(
            &mut out,
            "nginx_analytics_start_time_seconds",
            "gauge",
            "Unix time the counters started from (the metrics zone was created).",
        );
        let start = self.start_time.load(Ordering::Relaxed);
        let _ = writeln!(out, "nginx_analytics_start_time_seconds {start}");
        out
    }

    /// The counters as JSON (for the dashboard's health panel).
    pub fn to_json(&self) -> Value {
        let beacons: Map<String, Value> = OUTCOMES
            .iter()
            .enumerate()
            .map(|(i, o)| {
                (
                    o.to_string(),
                    json!(self.beacons[i].load(Ordering::Relaxed)),
                )
            })
            .collect();
        let events: Map<String, Value> = self.events().map(|(n, c)| (n, json!(c))).collect();
        let histogram = |bounds: &[f64], (cumulative, count, sum): (Vec<u64>, u64, f64)| {
            let buckets: Vec<Value> = bounds
                .iter()
                .zip(cumulative)
                .map(|(le, n)| json!({"le": le, "count": n}))
                .collect();
            json!({"buckets": buckets, "count": count, "sum": sum})
        };
        let (d, dc, ds) = self.write_duration.snapshot();
        let (b, bc, bs) = self.batch_lines.snapshot();
        json!({
            "beacons": beacons,
            "events": events,
            "writes": {
                "ok": self.writes_ok.load(Ordering::Relaxed),
                "failed": self.writes_failed.load(Ordering::Relaxed),
            },
            "written_lines": self.written_lines.load(Ordering::Relaxed),
            "write_duration_seconds": histogram(&DURATION_BOUNDS, (d.to_vec(), dc, ds)),
            "batch_lines": histogram(&BATCH_BOUNDS, (b.to_vec(), bc, bs)),
            "waiting_requests": self.waiting.load(Ordering::Relaxed).max(0),
            "start_time_seconds": self.start_time.load(Ordering::Relaxed),
        })
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn write_histogram<const N: usize>(
    out: &mut String,
    name: &str,
    bounds: &[f64; N],
    (cumulative, count, sum): ([u64; N], u64, f64),
) {
    for (le, n) in bounds.iter().zip(cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

/// A label value escaped for the text format (`\`, `"` and line feed).
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The empty state, as fresh (zeroed) shared memory holds it.
    fn zeroed() -> Box<Metrics> {
        Box::new(Metrics {
            start_time: AtomicU64::new(0),
            beacons: Default::default(),
            events_other: AtomicU64::new(0),
            writes_ok: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
            written_lines: AtomicU64::new(0),
            write_duration: Histogram::default(),
            batch_lines: Histogram::default(),
            waiting: AtomicI64::new(0),
            event_names: AtomicUsize::new(0),
            events: std::array::from_fn(|_| EventSlot::default()),
        })
    }

    #[test]
    fn counters_render_as_prometheus_text_and_json() {
        let m = zeroed();
        m.start(1_796_000_000);
        m.start(1);
        assert_eq!(
            m.register_events(["socialclick", "download", "socialclick"]),
            0
        );
        for token in [
            "accepted",
            "accepted",
            "bot",
            "invalid",
            "preflight",
            "incomplete",
        ] {
            m.count_outcome(token);
        }
        m.count_event("socialclick");
        m.count_event("unknown");
        m.count_refused_event();
        m.count_write(true, 10, 0.004);
        m.count_write(false, 5, 7.0);
        m.count_batch(10);
        m.add_waiting(3);
        m.add_waiting(-1);
        let text = m.to_prometheus();
        for line in [
            "# TYPE nginx_analytics_beacons_total counter",
            "nginx_analytics_beacons_total{outcome=\"accepted\"} 2",
            "nginx_analytics_beacons_total{outcome=\"bot\"} 1",
            "nginx_analytics_beacons_total{outcome=\"spooled\"} 0",
            "nginx_analytics_events_total{event=\"socialclick\"} 1",
            "nginx_analytics_events_total{event=\"download\"} 0",
            "nginx_analytics_events_total{event=\"other\"} 2",
            "nginx_analytics_writes_total{result=\"ok\"} 1",
            "nginx_analytics_writes_total{result=\"failed\"} 1",
            "nginx_analytics_written_lines_total 10",
            "nginx_analytics_write_duration_seconds_bucket{le=\"0.005\"} 1",
            "nginx_analytics_write_duration_seconds_bucket{le=\"5\"} 1",
            "nginx_analytics_write_duration_seconds_bucket{le=\"+Inf\"} 2",
            "nginx_analytics_write_duration_seconds_count 2",
            "nginx_analytics_write_duration_seconds_sum 7.004",
            "nginx_analytics_batch_lines_bucket{le=\"10\"} 1",
            "nginx_analytics_waiting_requests 2",
            "nginx_analytics_start_time_seconds 1796000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("preflight") && !text.contains("unknown"));
        let json = m.to_json();
        assert_eq!(json["beacons"]["accepted"], 2);
        assert_eq!(json["events"]["other"], 2);
        assert_eq!(json["writes"]["failed"], 1);
        assert_eq!(json["waiting_requests"], 2);
    }

    #[test]
    fn event_names_beyond_capacity_are_refused() {
        let m = zeroed();
        let names: Vec<String> = (0..MAX_EVENT_NAMES + 3).map(|i| format!("e{i}")).collect();
        assert_eq!(m.register_events(names.iter().map(String::as_str)), 3);
        assert_eq!(m.register_events(["x".repeat(65).as_str(), ""]), 2);
        m.count_event(&format!("e{}", MAX_EVENT_NAMES + 1));
        assert_eq!(m.to_json()["events"]["other"], 1);
    }
}
