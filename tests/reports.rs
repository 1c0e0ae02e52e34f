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

// The data set and the expected numbers, shared with tests/dashboard_browser.rs.
#[path = "common/known_answers.rs"]
mod known_answers;

// The statements of nginx-conf/influxdb/rollups.influxql and their backfill.
#[path = "common/cq_files.rs"]
mod cq_files;

use std::time::Duration;

use serde_json::{json, Value};

use crate::core::report::{format_rfc3339_utc, parse_rfc3339_utc};
use common::{
    free_port, post_with_headers, query_location, request, urlencode, FakeSink, Influx, Nginx,
    Response,
};
use known_answers::{
    assert_json_eq, data_set, now_ms, rows_csv, rows_json, write_data_set, Expected,
    ExpectedRollups, GroupKey, Hit, DAY, DB, DOMAIN, HOUR, KEYED_TABLES, OTHER,
};

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
            assert_tables(port, &args, &|key, limit| expected.table(key, limit));
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

/// Fills the rollups the report API reads (the daily ones and the notes' copy of
/// nginx-conf/influxdb/rollups.influxql) from the raw points of `[from, to)` as the README's
/// backfill does: creates the retention policy, then runs each of those CQs' `SELECT ... INTO`
/// once with that time range. The CQs themselves are not
/// created (the test does not wait for InfluxDB to run them). Returns the statements run.
fn backfill_rollups(influx: &Influx, from_ms: i64, to_ms: i64) -> usize {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/nginx-conf/influxdb/rollups.influxql"
    );
    let text = std::fs::read_to_string(path).expect("rollups.influxql");
    let statements = cq_files::statements(&text);
    let policy = statements
        .iter()
        .filter(|s| s.starts_with("CREATE RETENTION POLICY"))
        .cloned();
    let daily = cq_files::continuous_queries(&statements)
        .into_iter()
        .filter(|cq| cq.name.ends_with("_1d") || cq.name == "cq_pf_analytics_event_note")
        .map(|cq| {
            cq_files::backfill(
                &cq.select,
                from_ms as u64 * 1_000_000,
                to_ms as u64 * 1_000_000,
            )
        });
    let all: Vec<String> = policy.chain(daily).collect();
    assert_eq!(
        all.len(),
        1 + 7,
        "the policy, six daily rollups and the notes' copy: {all:?}"
    );
    for q in &all {
        let body = format!("q={}", urlencode(q));
        let response = post_with_headers(
            influx.port(),
            &format!("/query?db={DB}"),
            "127.0.0.1",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        );
        assert_eq!(response.status, 200, "{q}: {}", response.body_text());
        assert!(
            !response.body_text().contains("\"error\""),
            "{q}: {}",
            response.body_text()
        );
    }
    all.len()
}

/// Every keyed table report (`pages`, `referrers`, ...) against `table(key, limit)`: the top 10
/// and `limit=1000` as JSON, and the top 10 as CSV.
fn assert_tables(
    port: u16,
    args: &dyn Fn(&str) -> String,
    table: &dyn Fn(GroupKey, usize) -> Vec<(String, usize, usize)>,
) {
    for (name, key) in KEYED_TABLES {
        let rows = table(key, 10);
        assert_json_eq(&report(port, &args(name)), &rows_json(&rows), &args(name));
        let all = table(key, 1000);
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
        assert_eq!(csv.body_text(), rows_csv(&rows), "{}", args(name));
    }
}

/// Compares every report of `[from, to)` (more than two days, no `page=`) with what the daily
/// rollups give for the whole UTC days it touches.
fn assert_rollup_answers(port: u16, hits: &[Hit], from: i64, to: i64, range: &str) {
    let expected = ExpectedRollups::new(hits, from, to);
    let args = |name: &str| format!("report={name}&domain={DOMAIN}&{range}");
    assert_json_eq(
        &report(port, &args("summary")),
        &expected.summary(),
        &args("summary"),
    );
    assert_json_eq(
        &report(port, &args("timeseries")),
        &expected.timeseries(),
        &args("timeseries"),
    );
    assert_tables(port, &args, &|key, limit| expected.table(key, limit));
    assert_json_eq(
        &report(port, &args("events")),
        &expected.events(),
        &args("events"),
    );
}

fn every_report_matches_the_known_answers_through_the_rollups() {
    let influx = Influx::start();
    influx.create_database(DB);
    let now = now_ms();
    let hits = data_set(now);
    write_data_set(&influx, &hits);
    let today = now - now.rem_euclid(DAY);
    backfill_rollups(&influx, today - 12 * DAY, today + 2 * DAY);
    let (nginx, port) = start_nginx(influx.port());

    // Longer than two days, no page: the whole UTC days, from the rollups.
    let ten_days = (now - 10 * DAY - HOUR, now + HOUR);
    let whole = (today - 5 * DAY, today - DAY);
    let odd = (now - 4 * DAY - 7 * HOUR, now - 20 * HOUR);
    for (from, to) in [ten_days, whole, odd] {
        let range = format!("from={}&to={}", rfc3339_ms(from), rfc3339_ms(to));
        assert_rollup_answers(port, &hits, from, to, &range);
    }
    // The widening is visible: the rollups' first day is whole, the raw points' is not.
    let raw = Expected::new(&hits, odd.0, odd.1, None).summary();
    let rolled = ExpectedRollups::new(&hits, odd.0, odd.1).summary();
    assert!(
        rolled["pageviews"].as_u64() > raw["pageviews"].as_u64(),
        "{rolled} vs {raw}"
    );
    // The visits summed over days differ from the exact count somewhere in the data set.
    let exact = Expected::new(&hits, whole.0, whole.1, None).table(KEYED_TABLES[0].1, 1000);
    let summed = ExpectedRollups::new(&hits, whole.0, whole.1).table(KEYED_TABLES[0].1, 1000);
    assert_ne!(
        exact, summed,
        "no visit spans midnight: the test would not see the difference"
    );

    // Relative periods: 7d reads the rollups too.
    let seven = ExpectedRollups::new(&hits, now - 7 * DAY, now + 1);
    let got = report(port, &format!("report=summary&domain={DOMAIN}&period=7d"));
    assert_json_eq(&got, &seven.summary(), "period=7d");

    // Two days or less, or one page: still the exact raw points.
    let middle = (now - 6 * DAY - 7 * HOUR, now - 6 * DAY + 29 * HOUR);
    for ((from, to), page) in [
        (middle, None),
        (ten_days, Some("/p/2")),
        (ten_days, Some("/a'b")),
    ] {
        let range = format!("from={}&to={}", rfc3339_ms(from), rfc3339_ms(to));
        let page_arg = page
            .map(|p| format!("&page={}", common::urlencode(p)))
            .unwrap_or_default();
        let expected = Expected::new(&hits, from, to, page);
        let args = |name: &str| format!("report={name}&domain={DOMAIN}&{range}{page_arg}");
        let mut want = expected.summary();
        want["previous"] = Expected::new(&hits, from - (to - from), from, page).summary();
        assert_json_eq(&report(port, &args("summary")), &want, &args("summary"));
        for (name, key) in KEYED_TABLES {
            let rows = expected.table(key, 1000);
            assert_json_eq(
                &report(port, &format!("{}&limit=1000", args(name))),
                &rows_json(&rows),
                &args(name),
            );
        }
        assert_json_eq(
            &report(port, &args("timeseries")),
            &expected.timeseries(from, to),
            &args("timeseries"),
        );
        assert_json_eq(
            &report(port, &args("events")),
            &expected.events(),
            &args("events"),
        );
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
        statement.starts_with("SELECT ")
            || statement.starts_with("SHOW TAG VALUES ")
            || statement.starts_with("SHOW MEASUREMENTS WITH MEASUREMENT =~ /^("),
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
            &format!("/analytics/report?report={name}&domain={DOMAIN}&period=30d"),
        );
        assert_eq!(response.status, 200, "{name}: {}", response.body_text());
    }
    let reports = [
        "summary",
        "timeseries",
        "pages",
        "referrers",
        "platforms",
        "timezones",
        "events",
        "realtime",
    ];
    let raw_sent = statements_sent(&sink).len();

    // The same reports again once the daily rollups exist: their probe finds them and they
    // read the rollups.
    let today = now - now.rem_euclid(DAY);
    backfill_rollups(&influx, today - 12 * DAY, today + 2 * DAY);
    for name in reports {
        let response = get(
            port,
            &format!("/analytics/report?report={name}&domain={DOMAIN}&period=30d"),
        );
        assert_eq!(response.status, 200, "{name}: {}", response.body_text());
    }
    let sent = statements_sent(&sink);
    assert!(raw_sent >= 6 + 12, "{raw_sent}");
    let rollup_reads = sent[raw_sent..]
        .iter()
        .filter(|s| s.contains(" FROM \"rollups\".\"pf_analytics_"))
        .count();
    assert_eq!(rollup_reads, 9, "{:?}", &sent[raw_sent..]);
    let probes = sent
        .iter()
        .filter(|s| s.starts_with("SHOW MEASUREMENTS "))
        .count();
    assert!(probes >= 7 + 7, "a probe before each long report: {probes}");
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

    // A body sent with a refused request is read and dropped, never run as the connection's
    // next request.
    for (method, target) in [
        ("POST", "/analytics/report?report=domains"),
        ("GET", "/analytics/report?report=nope"),
    ] {
        let inner = "GET /limited/report?report=domains HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
        let mut conn = common::Conn::open(port);
        let outer = format!(
            "{method} {target} HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        let first = conn.request(outer.as_bytes());
        assert!(matches!(first.status, 400 | 405), "{}", first.status);
        let next = conn.request(
            b"GET /nothing-here HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(next.status, 404, "the next answer is for the next request");
    }
}

/// An InfluxDB that answers the rollup probe with an error (one whose InfluxQL lacks
/// `SHOW MEASUREMENTS ... WITH`) gets the report from the raw points, not a 502.
fn a_rollup_probe_influxdb_refuses_falls_back_to_the_raw_points() {
    let influx = Influx::start();
    influx.create_database(DB);
    write_data_set(&influx, &data_set(now_ms())[..200]);
    let sink = FakeSink::start();
    sink.skip_privacy_audit();
    sink.set_forward(Some(&influx.addr()));
    let (nginx, port) = start_nginx(sink.port());
    let args = format!("report=summary&domain={DOMAIN}&period=30d");
    let raw = report(port, &args);
    assert!(raw["pageviews"].as_u64().is_some_and(|n| n > 0), "{raw}");
    sink.clear_requests();
    sink.push_response(
        400,
        r#"{"error":"error parsing query: found WITH, expected ; at line 1, char 19"}"#,
    );
    assert_eq!(
        report(port, &args),
        raw,
        "the same numbers, from the raw points"
    );
    let sent = statements_sent(&sink);
    assert!(
        sent.first()
            .is_some_and(|s| s.starts_with("SHOW MEASUREMENTS"))
            && sent.len() > 1,
        "the probe, then the raw statements: {sent:?}"
    );
    assert!(nginx.wait_for_log("rollup probe failed", Duration::from_secs(5)));
}

fn main() {
    let tests: [(&str, fn()); 5] = [
        (
            "every_report_matches_the_known_answers",
            every_report_matches_the_known_answers,
        ),
        (
            "every_report_matches_the_known_answers_through_the_rollups",
            every_report_matches_the_known_answers_through_the_rollups,
        ),
        (
            "hostile_parameters_are_refused_and_every_statement_is_a_single_escaped_select",
            hostile_parameters_are_refused_and_every_statement_is_a_single_escaped_select,
        ),
        (
            "influxdb_down_is_a_502_with_a_json_error",
            influxdb_down_is_a_502_with_a_json_error,
        ),
        (
            "a_rollup_probe_influxdb_refuses_falls_back_to_the_raw_points",
            a_rollup_probe_influxdb_refuses_falls_back_to_the_raw_points,
        ),
    ];
    common::run_tests(&tests);
}
