//! The known answers of the report API: a generated data set (fixed seed, encoded by the
//! module's own core, spread over the last 10 days) written straight to InfluxDB, and every
//! number the reports should give for it, computed here from the data set itself.
//!
//! Shared by the tests that compile the nginx-free core from its sources (`harness = false`,
//! `#[path = "../src/core/mod.rs"] mod core;`), which include this file with
//! `#[path = "common/known_answers.rs"] mod known_answers;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::Influx;
use crate::core::line_protocol::{encode_point, SessionStorage};
use crate::core::report::format_rfc3339_utc;
use crate::core::{parse_beacon, Measurements};

/// The database the data set is written to.
pub const DB: &str = "analytics";
/// The domain the reports are asked about.
pub const DOMAIN: &str = "report.example.com";
/// A second domain in the data set, which no report on DOMAIN may count.
pub const OTHER: &str = "other.example.com";
/// An hour in milliseconds.
pub const HOUR: i64 = 3_600_000;
/// A day in milliseconds.
pub const DAY: i64 = 24 * HOUR;

/// The four keyed table reports and the key each groups page views by.
pub const KEYED_TABLES: [(&str, GroupKey); 4] = [
    ("pages", |h| Some(h.page.clone())),
    ("referrers", |h| h.referrer.map(str::to_string)),
    ("platforms", |h| h.platform.map(str::to_string)),
    ("timezones", |h| h.timezone.map(|t| t.to_string())),
];

/// A small deterministic generator (xorshift64*), so the data set is the same every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// An event's name, note ("" for none) and value.
pub type EventHit = (&'static str, String, Option<f64>);

/// How a table report groups page views.
pub type GroupKey = fn(&Hit) -> Option<String>;

/// One generated beacon, as the test knows it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub time_ms: i64,
    pub domain: &'static str,
    pub page: String,
    pub referrer: Option<&'static str>,
    pub platform: Option<&'static str>,
    pub timezone: Option<i32>,
    pub sess: Option<String>,
    pub load_time: Option<f64>,
    pub event: Option<EventHit>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The data set: page views and events over the last 10 days, none within 30 minutes of the
/// 7-day boundary (so `period=7d` is exact whatever the few seconds between here and nginx),
/// plus fresh ones in the last two minutes for `realtime`.
pub fn data_set(now: i64) -> Vec<Hit> {
    let mut rng = Rng(0x5EED_2026_1201);
    let pages = [
        "/", "/blog/", "/p/1", "/p/2", "/p/3", "/about", "/a'b", "/x\\y z",
    ];
    let referrers = ["news.example.org", "search.example.net", "social.example"];
    let platforms = ["Linux x86_64", "MacIntel", "iPhone", "Win32"];
    let notes = ["mastodon", "bluesky", "email", "", "=cmd"];
    let mut hits = Vec::new();
    while hits.len() < 2500 {
        let time_ms = now - 10 * DAY + rng.below((10 * DAY - 10 * 60_000) as u64) as i64;
        if (time_ms - (now - 7 * DAY)).abs() < 30 * 60_000 {
            continue;
        }
        let sess = (rng.below(10) > 0).then(|| format!("s{}", rng.below(600)));
        let is_event = rng.below(6) == 0;
        hits.push(Hit {
            time_ms,
            domain: if rng.below(10) == 0 { OTHER } else { DOMAIN },
            page: rng.pick(&pages).to_string(),
            referrer: (!is_event && rng.below(3) == 0).then(|| rng.pick(&referrers)),
            platform: (rng.below(8) > 0).then(|| rng.pick(&platforms)),
            timezone: (rng.below(5) > 0).then(|| [-60, 0, 300, -330][rng.below(4) as usize]),
            sess,
            load_time: (!is_event && rng.below(4) > 0).then(|| (rng.below(5000) as f64) / 4.0),
            event: is_event.then(|| {
                let name = ["socialclick", "download", "signup"][rng.below(3) as usize];
                let value = (rng.below(2) == 0).then(|| rng.below(100) as f64 / 8.0);
                (name, rng.pick(&notes).to_string(), value)
            }),
        });
    }
    for i in 0..3 {
        hits.push(Hit {
            time_ms: now - 60_000 - i * 1000,
            domain: DOMAIN,
            page: "/live".to_string(),
            referrer: None,
            platform: None,
            timezone: None,
            sess: Some(format!("live{}", i % 2)),
            load_time: None,
            event: None,
        });
    }
    hits
}

/// The line of `hit`, encoded by the module's core from the beacon the agent would send.
pub fn line(hit: &Hit, index: usize) -> Vec<u8> {
    let mut beacon = json!({"domain": hit.domain, "page": hit.page});
    if let Some(r) = hit.referrer {
        beacon["referrer"] = json!(format!("https://{r}/some/path?q=1"));
    }
    if let Some(p) = hit.platform {
        beacon["platform"] = json!(p);
    }
    if let Some(tz) = hit.timezone {
        beacon["timezone"] = json!(tz);
    }
    if let Some(s) = &hit.sess {
        beacon["sess_id"] = json!(s);
    }
    if let Some(l) = hit.load_time {
        beacon["load_time"] = json!(l);
    }
    if let Some((name, note, value)) = &hit.event {
        beacon["event"] = json!(name);
        if !note.is_empty() {
            beacon["note"] = json!(note);
        }
        if let Some(v) = value {
            beacon["value"] = json!(v);
        }
    }
    let json = beacon.to_string();
    let beacon = parse_beacon(json.as_bytes()).expect("a valid beacon");
    // Unique timestamps, as the module makes them (the index in the low bits).
    let ts = (hit.time_ms as u64) * 1_000_000 + index as u64;
    let mut out = Vec::new();
    encode_point(
        &beacon,
        &Measurements::default(),
        SessionStorage::Field,
        ts,
        &mut out,
    );
    out
}

pub fn write_data_set(influx: &Influx, hits: &[Hit]) {
    for (n, chunk) in hits.chunks(500).enumerate() {
        let mut body = Vec::new();
        for (i, hit) in chunk.iter().enumerate() {
            body.extend(line(hit, n * 500 + i));
        }
        let response = influx.write_lines(DB, &String::from_utf8(body).unwrap());
        assert_eq!(response.status, 204, "{}", response.body_text());
    }
}

/// What the test expects over `[from, to)`, optionally for one page.
pub struct Expected<'a> {
    pub hits: Vec<&'a Hit>,
}

impl<'a> Expected<'a> {
    pub fn new(all: &'a [Hit], from: i64, to: i64, page: Option<&str>) -> Self {
        let hits = all
            .iter()
            .filter(|h| h.domain == DOMAIN && h.time_ms >= from && h.time_ms < to)
            .filter(|h| page.is_none_or(|p| h.page == p))
            .collect();
        Expected { hits }
    }

    pub fn views(&self) -> impl Iterator<Item = &&'a Hit> {
        self.hits.iter().filter(|h| h.event.is_none())
    }

    pub fn visits<'b>(hits: impl Iterator<Item = &'b &'a Hit>) -> usize
    where
        'a: 'b,
    {
        hits.filter_map(|h| h.sess.as_deref())
            .collect::<HashSet<_>>()
            .len()
    }

    pub fn summary(&self) -> Value {
        let mut loads: Vec<f64> = self.views().filter_map(|h| h.load_time).collect();
        loads.sort_by(f64::total_cmp);
        let median = match loads.len() {
            0 => Value::Null,
            n if n % 2 == 1 => json!(loads[n / 2]),
            n => json!((loads[n / 2 - 1] + loads[n / 2]) / 2.0),
        };
        json!({
            "pageviews": self.views().count(),
            "visits": Self::visits(self.views()),
            "events": self.hits.iter().filter(|h| h.event.is_some()).count(),
            "load_time_ms_median": median,
        })
    }

    pub fn table(
        &self,
        key: impl Fn(&Hit) -> Option<String>,
        limit: usize,
    ) -> Vec<(String, usize, usize)> {
        let mut groups: BTreeMap<String, Vec<&&Hit>> = BTreeMap::new();
        for hit in self.views() {
            if let Some(k) = key(hit) {
                groups.entry(k).or_default().push(hit);
            }
        }
        let mut rows: Vec<(String, usize, usize)> = groups
            .into_iter()
            .map(|(k, hits)| {
                let visits = Self::visits(hits.iter().copied());
                (k, hits.len(), visits)
            })
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows.truncate(limit);
        rows
    }

    pub fn timeseries(&self, from: i64, to: i64) -> Value {
        let step = if to - from <= 2 * DAY { HOUR } else { DAY };
        let mut points = Vec::new();
        let mut t = from - from.rem_euclid(step);
        while t < to {
            let in_bucket: Vec<&&Hit> = self
                .views()
                .filter(|h| h.time_ms >= t && h.time_ms < t + step)
                .collect();
            points.push(json!({
                "time": format_rfc3339_utc(t),
                "pageviews": in_bucket.len(),
                "visits": Self::visits(in_bucket.iter().copied()),
            }));
            t += step;
        }
        json!({"interval": if step == HOUR { "1h" } else { "1d" }, "points": points})
    }

    pub fn events(&self) -> Value {
        let mut by_event: BTreeMap<&str, Vec<&EventHit>> = BTreeMap::new();
        for hit in &self.hits {
            if let Some(e) = &hit.event {
                by_event.entry(e.0).or_default().push(e);
            }
        }
        let mut rows: Vec<(usize, &str, Value)> = by_event
            .into_iter()
            .map(|(name, events)| {
                let values: Vec<f64> = events.iter().filter_map(|e| e.2).collect();
                let sum = if values.is_empty() {
                    Value::Null
                } else {
                    json!(values.iter().sum::<f64>())
                };
                let mut notes: HashMap<&str, usize> = HashMap::new();
                for e in events.iter().filter(|e| !e.1.is_empty()) {
                    *notes.entry(e.1.as_str()).or_default() += 1;
                }
                let mut notes: Vec<(&str, usize)> = notes.into_iter().collect();
                notes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
                notes.truncate(5);
                let notes: Vec<Value> = notes
                    .into_iter()
                    .map(|(n, c)| json!({"note": n, "count": c}))
                    .collect();
                (
                    events.len(),
                    name,
                    json!({"event": name, "count": events.len(), "value_sum": sum, "notes": notes}),
                )
            })
            .collect();
        rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        json!({"rows": rows.into_iter().map(|r| r.2).collect::<Vec<_>>()})
    }
}

pub fn rows_json(rows: &[(String, usize, usize)]) -> Value {
    json!({"rows": rows.iter().map(|(k, p, v)| json!({"key": k, "pageviews": p, "visits": v})).collect::<Vec<_>>()})
}

/// The CSV answer of a keyed table report for `rows` (a key with a comma or quote is quoted).
pub fn rows_csv(rows: &[(String, usize, usize)]) -> String {
    let mut csv = String::from("key,pageviews,visits\r\n");
    for (k, p, v) in rows {
        let k = if k.contains([',', '"']) {
            format!("\"{}\"", k.replace('"', "\"\""))
        } else {
            k.clone()
        };
        csv.push_str(&format!("{k},{p},{v}\r\n"));
    }
    csv
}

/// `[from, to)` widened to whole UTC days, as the report API reads the daily rollups.
pub fn whole_days(from: i64, to: i64) -> (i64, i64) {
    let end = if to.rem_euclid(DAY) == 0 {
        to
    } else {
        to - to.rem_euclid(DAY) + DAY
    };
    (from - from.rem_euclid(DAY), end)
}

/// The median of `values` (the mean of the two middle ones for an even number), as InfluxDB's
/// `median()`; `None` for none.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// What the report API answers from the daily rollups (rollups.influxql) for `[from, to)`:
/// the whole UTC days the range touches; visits are distinct sessions per UTC day, summed over
/// the days (per key for a table); the median load time is the median of the daily medians,
/// each counted as many times as its day had load times.
pub struct ExpectedRollups<'a> {
    pub all: &'a [Hit],
    pub from: i64,
    pub to: i64,
}

impl<'a> ExpectedRollups<'a> {
    pub fn new(all: &'a [Hit], from: i64, to: i64) -> Self {
        let (from, to) = whole_days(from, to);
        ExpectedRollups { all, from, to }
    }

    /// The exact numbers of each UTC day of the range.
    fn days(&self) -> Vec<Expected<'a>> {
        (self.from..self.to)
            .step_by(DAY as usize)
            .map(|day| Expected::new(self.all, day, day + DAY, None))
            .collect()
    }

    fn period(&self) -> Value {
        let days = self.days();
        let mut medians = Vec::new();
        for day in &days {
            let mut loads: Vec<f64> = day.views().filter_map(|h| h.load_time).collect();
            if let Some(m) = median(&mut loads) {
                medians.extend(std::iter::repeat_n(m, loads.len()));
            }
        }
        json!({
            "pageviews": days.iter().map(|d| d.views().count()).sum::<usize>(),
            "visits": days.iter().map(|d| Expected::visits(d.views())).sum::<usize>(),
            "events": days.iter().map(|d| d.hits.iter().filter(|h| h.event.is_some()).count()).sum::<usize>(),
            "load_time_ms_median": median(&mut medians).map_or(Value::Null, |m| json!(m)),
        })
    }

    /// The `summary` answer, `previous` included.
    pub fn summary(&self) -> Value {
        let mut now = self.period();
        let before = ExpectedRollups {
            all: self.all,
            from: self.from - (self.to - self.from),
            to: self.from,
        };
        now["previous"] = before.period();
        now
    }

    /// A keyed table: page views per key, visits per key summed over the days.
    pub fn table(&self, key: GroupKey, limit: usize) -> Vec<(String, usize, usize)> {
        let mut rows: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for day in self.days() {
            for (k, pageviews, visits) in day.table(key, usize::MAX) {
                let row = rows.entry(k).or_default();
                row.0 += pageviews;
                row.1 += visits;
            }
        }
        let mut rows: Vec<(String, usize, usize)> =
            rows.into_iter().map(|(k, (p, v))| (k, p, v)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows.truncate(limit);
        rows
    }

    /// The time series: one exact point per day.
    pub fn timeseries(&self) -> Value {
        Expected::new(self.all, self.from, self.to, None).timeseries(self.from, self.to)
    }

    /// The events of the whole days (their notes from the notes' copy, exact).
    pub fn events(&self) -> Value {
        Expected::new(self.all, self.from, self.to, None).events()
    }
}

/// Compares JSON, treating numbers as equal within a relative 1e-9 (float sums and medians).
pub fn assert_json_eq(actual: &Value, expected: &Value, what: &str) {
    fn close(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| close(a, b))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
            }
            _ => a == b,
        }
    }
    assert!(
        close(actual, expected),
        "{what}:\n got {actual}\nwant {expected}"
    );
}
