//! The report API against a real InfluxDB: a generated data set (fixed seed, encoded by the
//! module's own core, spread over the last 10 days) is written straight to InfluxDB, every
//! expected number is computed here, and each report is compared, JSON and CSV, for several
//! periods, with and without `page=`. Hostile parameters are refused, and a capturing sink
//! between nginx and InfluxDB proves every statement sent is a single SELECT or SHOW.

mod common;

// The module's library cannot be linked without nginx: the nginx-free core is compiled from its
// sources (see `harness = false` in Cargo.toml).
#[path = "../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::core::line_protocol::{encode_point, SessionStorage};
use crate::core::report::{format_rfc3339_utc, parse_rfc3339_utc};
use crate::core::{parse_beacon, Measurements};
use common::{free_port, query_location, request, FakeSink, Influx, Nginx, Response};

const DB: &str = "analytics";
const DOMAIN: &str = "report.example.com";
const OTHER: &str = "other.example.com";
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// A small deterministic generator (xorshift64*), so the data set is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// An event's name, note ("" for none) and value.
type EventHit = (&'static str, String, Option<f64>);

/// How a table report groups page views.
type GroupKey = fn(&Hit) -> Option<String>;

/// One generated beacon, as the test knows it.
#[derive(Clone, Debug)]
struct Hit {
    time_ms: i64,
    domain: &'static str,
    page: String,
    referrer: Option<&'static str>,
    platform: Option<&'static str>,
    timezone: Option<i32>,
    sess: Option<String>,
    load_time: Option<f64>,
    event: Option<EventHit>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The data set: page views and events over the last 10 days, none within 30 minutes of the
/// 7-day boundary (so `period=7d` is exact whatever the few seconds between here and nginx),
/// plus fresh ones in the last two minutes for `realtime`.
fn data_set(now: i64) -> Vec<Hit> {
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
fn line(hit: &Hit, index: usize) -> Vec<u8> {
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

fn write_data_set(influx: &Influx, hits: &[Hit]) {
    for (n, chunk) in hits.chunks(500).enumerate() {
        let mut body = Vec::new();
        for (i, hit) in chunk.iter().enumerate() {
            body.extend(line(hit, n * 500 + i));
        }
        let response = influx.write_lines(DB, &String::from_utf8(body).unwrap());
        assert_eq!(response.status, 204, "{}", response.body_text());
    }
}

/// nginx with a report location (and a second one limited to DOMAIN) querying through
/// `query_port` (InfluxDB itself, or a capturing sink in front of it).
fn start_nginx(query_port: u16) -> (Nginx, u16) {
    let port = free_port();
    let conf = format!(
        r#"
upstream influxdb {{ server 127.0.0.1:{query_port}; keepalive 4; }}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    # Room for 10 KB parameters, so that the module (not nginx's 414) answers them.
    large_client_header_buffers 4 32k;
    location = /analytics/report {{ analytics_report; }}
    location = /limited/report {{
        analytics_report;
        analytics_domains {DOMAIN};
    }}
{}
}}
"#,
        query_location(&format!("http://influxdb/query?db={DB}"))
    );
    (Nginx::start(&conf), port)
}

fn get(port: u16, path: &str) -> Response {
    request(port, "GET", path, "www.example.com", None)
}

fn report(port: u16, args: &str) -> Value {
    let response = get(port, &format!("/analytics/report?{args}"));
    assert_eq!(response.status, 200, "{args}: {}", response.body_text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("cache-control"), Some("no-store"));
    serde_json::from_slice(&response.body).expect("JSON")
}

/// What the test expects over `[from, to)`, optionally for one page.
struct Expected<'a> {
    hits: Vec<&'a Hit>,
}

impl<'a> Expected<'a> {
    fn new(all: &'a [Hit], from: i64, to: i64, page: Option<&str>) -> Self {
        let hits = all
            .iter()
            .filter(|h| h.domain == DOMAIN && h.time_ms >= from && h.time_ms < to)
            .filter(|h| page.map_or(true, |p| h.page == p))
            .collect();
        Expected { hits }
    }

    fn views(&self) -> impl Iterator<Item = &&'a Hit> {
        self.hits.iter().filter(|h| h.event.is_none())
    }

    fn visits<'b>(hits: impl Iterator<Item = &'b &'a Hit>) -> usize
    where
        'a: 'b,
    {
        hits.filter_map(|h| h.sess.as_deref())
            .collect::<HashSet<_>>()
            .len()
    }

    fn summary(&self) -> Value {
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

    fn table(
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

    fn timeseries(&self, from: i64, to: i64) -> Value {
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

    fn events(&self) -> Value {
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

fn rows_json(rows: &[(String, usize, usize)]) -> Value {
    json!({"rows": rows.iter().map(|(k, p, v)| json!({"key": k, "pageviews": p, "visits": v})).collect::<Vec<_>>()})
}

/// Compares JSON, treating numbers as equal within a relative 1e-9 (float sums and medians).
fn assert_json_eq(actual: &Value, expected: &Value, what: &str) {
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

fn every_report_matches_the_known_answers() {
    let influx = Influx::start();
    influx.create_database(DB);
    let now = now_ms();
    let hits = data_set(now);
    write_data_set(&influx, &hits);
    let (nginx, port) = start_nginx(influx.port());

    let domains = report(port, "report=domains");
    assert_eq!(domains, json!({"domains": [OTHER, DOMAIN]}));
    let limited = get(port, "/limited/report?report=domains");
    assert_eq!(
        serde_json::from_slice::<Value>(&limited.body).unwrap(),
        json!({"domains": [DOMAIN]}),
        "analytics_domains limits the domains a location reports on"
    );
    let refused = get(
        port,
        &format!("/limited/report?report=summary&domain={OTHER}"),
    );
    assert_eq!(refused.status, 403, "{}", refused.body_text());

    let ten_days = (now - 10 * DAY - HOUR, now + HOUR);
    let middle = (now - 6 * DAY - 7 * HOUR, now - 6 * DAY + 29 * HOUR);
    let by_page: [(&str, GroupKey); 4] = [
        ("pages", |h| Some(h.page.clone())),
        ("referrers", |h| h.referrer.map(str::to_string)),
        ("platforms", |h| h.platform.map(str::to_string)),
        ("timezones", |h| h.timezone.map(|t| t.to_string())),
    ];
    for (from, to) in [ten_days, middle] {
        let range = format!("from={}&to={}", rfc3339_ms(from), rfc3339_ms(to));
        for page in [None, Some("/p/2"), Some("/a'b"), Some("/x\\y z")] {
            let page_arg = page
                .map(|p| format!("&page={}", common::urlencode(p)))
                .unwrap_or_default();
            let expected = Expected::new(&hits, from, to, page);
            let args = |name: &str| format!("report={name}&domain={DOMAIN}&{range}{page_arg}");

            let mut want = expected.summary();
            want["previous"] = Expected::new(&hits, from - (to - from), from, page).summary();
            assert_json_eq(&report(port, &args("summary")), &want, &args("summary"));
            assert_json_eq(
                &report(port, &args("timeseries")),
                &expected.timeseries(from, to),
                &args("timeseries"),
            );
            for (name, key) in by_page {
                let rows = expected.table(key, 10);
                assert_json_eq(&report(port, &args(name)), &rows_json(&rows), &args(name));
                let all = expected.table(key, 1000);
                assert_json_eq(
                    &report(port, &format!("{}&limit=1000", args(name))),
                    &rows_json(&all),
                    &args(name),
                );
                let csv = get(
                    port,
                    &format!("/analytics/report?{}&format=csv", args(name)),
                );
                assert_eq!(csv.status, 200);
                assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
                let mut want_csv = String::from("key,pageviews,visits\r\n");
                for (k, p, v) in &rows {
                    let k = if k.contains([',', '"']) {
                        format!("\"{}\"", k.replace('"', "\"\""))
                    } else {
                        k.clone()
                    };
                    want_csv.push_str(&format!("{k},{p},{v}\r\n"));
                }
                assert_eq!(csv.body_text(), want_csv, "{}", args(name));
            }
            assert_json_eq(
                &report(port, &args("events")),
                &expected.events(),
                &args("events"),
            );
        }
    }

    // Periods relative to now: the data set keeps clear of the 7-day boundary.
    let seven = Expected::new(&hits, now - 7 * DAY, now + DAY, None);
    let got = report(port, &format!("report=summary&domain={DOMAIN}&period=7d"));
    let want = seven.summary();
    for key in ["pageviews", "visits", "events", "load_time_ms_median"] {
        assert_json_eq(&got[key], &want[key], key);
    }
    let realtime = report(port, &format!("report=realtime&domain={DOMAIN}"));
    assert_eq!(realtime, json!({"visits": 2, "pageviews": 3}));
    nginx.assert_no_crash_in_log();
}

fn rfc3339_ms(ms: i64) -> String {
    // Whole seconds: the API takes RFC 3339; sub-second precision is not needed here.
    let text = format_rfc3339_utc(ms);
    assert_eq!(parse_rfc3339_utc(&text), Some(ms - ms.rem_euclid(1000)));
    text
}

/// The statements in the form bodies a capturing sink received.
fn statements_sent(sink: &FakeSink) -> Vec<String> {
    sink.requests()
        .iter()
        .map(|r| {
            let q: Vec<String> = form_urlencoded::parse(&r.body)
                .filter(|(k, _)| k == "q")
                .map(|(_, v)| v.into_owned())
                .collect();
            assert_eq!(q.len(), 1, "one statement per query: {:?}", r.body_text());
            assert_eq!(r.method, "POST");
            q.into_iter().next().unwrap()
        })
        .collect()
}

/// Checks InfluxQL's lexical structure: string literals are well formed (only the escapes the
/// scanner knows), and outside of them there is no `;`, no comment, no second statement.
fn assert_single_statement(statement: &str) {
    assert!(
        statement.starts_with("SELECT ") || statement.starts_with("SHOW TAG VALUES "),
        "{statement}"
    );
    let mut chars = statement.chars();
    let mut outside = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => loop {
                match chars.next() {
                    Some('\\') => {
                        let escaped = chars.next();
                        assert!(
                            matches!(escaped, Some('n' | '\\' | '\'' | '"')),
                            "bad escape in {statement}"
                        );
                    }
                    Some(end) if end == c => break,
                    Some('\n') | Some('\0') | None => panic!("unterminated literal: {statement}"),
                    Some(_) => {}
                }
            },
            c => outside.push(c),
        }
    }
    for forbidden in [
        ";", "--", "/*", "\n", "\0", "DROP", "DELETE", "CREATE", "GRANT", "INTO",
    ] {
        assert!(
            !outside.contains(forbidden),
            "{forbidden:?} outside literals: {statement}"
        );
    }
}

fn hostile_parameters_are_refused_and_every_statement_is_a_single_escaped_select() {
    let influx = Influx::start();
    influx.create_database(DB);
    let now = now_ms();
    write_data_set(&influx, &data_set(now)[..200]);
    let sink = FakeSink::start();
    sink.skip_privacy_audit();
    sink.set_forward(Some(&influx.addr()));
    let (nginx, port) = start_nginx(sink.port());

    let huge = "a".repeat(10 * 1024);
    let refused: Vec<String> = [
        "report=summary&domain=a'b".to_string(),
        "report=summary&domain=a%27%3B%20DROP%20DATABASE%20analytics".to_string(),
        "report=summary&domain=a%5Cb".to_string(),
        "report=summary&domain=a%0Ab".to_string(),
        "report=summary&domain=a%00b".to_string(),
        "report=summary&domain=%E2%80%AEexample.com".to_string(),
        "report=summary&domain=.*".to_string(),
        format!("report=summary&domain={huge}"),
        "report=DROP%20DATABASE%20analytics".to_string(),
        "report=summary;DROP".to_string(),
        format!("report=pages&domain={DOMAIN}&page=%2Fa%0A%3B%20DROP"),
        format!("report=pages&domain={DOMAIN}&page=%2Fa%00"),
        format!("report=pages&domain={DOMAIN}&page=/{huge}"),
        format!("report=pages&domain={DOMAIN}&page=relative"),
        format!("report=pages&domain={DOMAIN}&period=now()-1h"),
        format!("report=pages&domain={DOMAIN}&from=0&to=1"),
        format!("report=pages&domain={DOMAIN}&from=2026-01-01T00:00:00Z&to=2020-01-01T00:00:00Z"),
        format!("report=pages&domain={DOMAIN}&from=1970-01-01T00:00:00Z&to=9999-12-31T23:59:59Z"),
        format!("report=pages&domain={DOMAIN}&from=2026-01-01T00:00:00Z'&to=2026-01-02T00:00:00Z"),
        format!("report=pages&domain={DOMAIN}&limit=1e3"),
        format!("report=pages&domain={DOMAIN}&limit=%2F.*%2F"),
        format!("report=pages&domain={DOMAIN}&format=csv%0A"),
        format!("report=summary&domain={DOMAIN}&format=csv"),
    ]
    .to_vec();
    for args in &refused {
        let response = get(port, &format!("/analytics/report?{args}"));
        assert_eq!(response.status, 400, "{args}: {}", response.body_text());
        let body: Value = serde_json::from_slice(&response.body).expect("JSON error");
        assert!(
            body["error"].as_str().is_some_and(|e| e.starts_with('`')),
            "{body}"
        );
    }
    assert!(
        sink.requests().is_empty(),
        "nothing refused reached InfluxDB"
    );

    // Valid but unusual values reach InfluxDB only as escaped literals.
    for page in [
        "/a'b",
        "/a\\'; DROP DATABASE analytics; --",
        "/x\\",
        "/é/中/😀",
        "/(.*)/",
        "/a\"b",
    ] {
        let args = format!(
            "report=pages&domain={DOMAIN}&page={}",
            common::urlencode(page)
        );
        let response = get(port, &format!("/analytics/report?{args}"));
        assert_eq!(response.status, 200, "{args}: {}", response.body_text());
    }
    for name in [
        "summary",
        "timeseries",
        "pages",
        "referrers",
        "platforms",
        "timezones",
        "events",
        "realtime",
    ] {
        let response = get(
            port,
            &format!("/analytics/report?report={name}&domain={DOMAIN}"),
        );
        assert_eq!(response.status, 200, "{name}: {}", response.body_text());
    }
    let sent = statements_sent(&sink);
    assert!(sent.len() >= 6 + 12, "{}", sent.len());
    for statement in &sent {
        assert_single_statement(statement);
    }
    let databases = influx.query("", "SHOW DATABASES").to_string();
    assert!(
        databases.contains(DB),
        "the database is still there: {databases}"
    );
    nginx.assert_no_crash_in_log();
}

fn influxdb_down_is_a_502_with_a_json_error() {
    let mut influx = Influx::start();
    influx.create_database(DB);
    let (nginx, port) = start_nginx(influx.port());
    influx.stop();
    let response = get(
        port,
        &format!("/analytics/report?report=summary&domain={DOMAIN}"),
    );
    assert_eq!(response.status, 502);
    let body: Value = serde_json::from_slice(&response.body).expect("JSON error");
    assert!(body["error"].as_str().is_some(), "{body}");
    let post = request(
        port,
        "POST",
        "/analytics/report?report=domains",
        "www.example.com",
        Some(b"x"),
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET"));
    assert!(nginx.wait_for_log("report query failed", Duration::from_secs(5)));
}

fn main() {
    let tests: [(&str, fn()); 3] = [
        (
            "every_report_matches_the_known_answers",
            every_report_matches_the_known_answers,
        ),
        (
            "hostile_parameters_are_refused_and_every_statement_is_a_single_escaped_select",
            hostile_parameters_are_refused_and_every_statement_is_a_single_escaped_select,
        ),
        (
            "influxdb_down_is_a_502_with_a_json_error",
            influxdb_down_is_a_502_with_a_json_error,
        ),
    ];
    common::run_tests(&tests);
}
