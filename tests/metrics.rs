//! Collector metrics: counters in a shared memory zone, summed across workers, kept across a
//! reload, read through a real Prometheus text-format parser and as JSON.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use common::{
    free_port, post_with_headers, request, write_location, Conn, FakeSink, Nginx, NginxOptions,
};

const HOST: &str = "www.example.com";

fn conf(port: u16, sink_port: u16, extra_http: &str) -> String {
    format!(
        r#"
{extra_http}
upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 8; }}
server {{
    listen 127.0.0.1:{port};
    server_name {HOST};
    permitted_events socialclick download;
    location = /collect {{ analytics; analytics_write off; }}
    location = /stored {{ analytics; }}
    location = /metrics {{ analytics_metrics; }}
{}
}}
"#,
        write_location("http://sink/write?db=analytics&precision=ns", "5s")
    )
}

fn two_workers() -> NginxOptions {
    NginxOptions {
        master_process: true,
        worker_processes: 2,
        ..NginxOptions::default()
    }
}

fn beacon(extra: Value) -> Vec<u8> {
    let mut beacon = json!({"domain": HOST, "page": "/m"});
    beacon
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    beacon.to_string().into_bytes()
}

fn send(port: u16, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    post_with_headers(port, path, HOST, headers, body).status
}

/// Every sample of the exposition, parsed by the `prometheus-parse` crate, as
/// `name{label="value",...}` (labels sorted) -> value; histogram buckets as `name_bucket{le}`.
fn scrape(port: u16) -> HashMap<String, f64> {
    let response = request(port, "GET", "/metrics", HOST, None);
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.body_text();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not the text format: {e}\n{text}"));
    for family in [
        "beacons_total",
        "events_total",
        "writes_total",
        "write_duration_seconds",
    ] {
        let name = format!("nginx_analytics_{family}");
        assert!(scrape.docs.contains_key(&name), "# HELP for {name}");
    }
    let mut samples = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        labels.sort();
        let key = |name: &str, labels: &[String]| match labels.is_empty() {
            true => name.to_string(),
            false => format!("{name}{{{}}}", labels.join(",")),
        };
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => {
                samples.insert(key(&sample.metric, &labels), v);
            }
            prometheus_parse::Value::Histogram(buckets) => {
                for b in buckets {
                    let le = format!("le=\"{}\"", b.less_than);
                    samples.insert(key(&format!("{}_bucket", sample.metric), &[le]), b.count);
                }
            }
            prometheus_parse::Value::Summary(_) => {}
        }
    }
    samples
}

fn json(port: u16) -> Value {
    let response = request(port, "GET", "/metrics?format=json&x=1", HOST, None);
    assert_eq!(response.status, 200);
    serde_json::from_slice(&response.body).expect("JSON")
}

fn outcome(samples: &HashMap<String, f64>, outcome: &str) -> f64 {
    samples[&format!("nginx_analytics_beacons_total{{outcome=\"{outcome}\"}}")]
}

#[test]
fn every_counter_equals_what_was_sent_across_two_workers() {
    let sink = FakeSink::start();
    let port = free_port();
    let nginx = Nginx::start_with(two_workers(), &conf(port, sink.port(), ""));
    let expected = [
        ("accepted", 7.0),
        ("invalid", 2.0),
        ("event_not_permitted", 3.0),
        ("domain_not_accepted", 1.0),
        ("body_too_large", 1.0),
        ("method_not_allowed", 1.0),
        ("bot", 2.0),
        ("write_failed", 2.0),
        ("spooled", 0.0),
        ("error", 0.0),
    ];
    for _ in 0..3 {
        assert_eq!(send(port, "/collect", &[], &beacon(json!({}))), 204);
    }
    for _ in 0..2 {
        let click = beacon(json!({"event": "SocialClick", "note": "mastodon"}));
        assert_eq!(send(port, "/collect", &[], &click), 204);
    }
    for name in ["signup", "signup", "drop table"] {
        let refused = beacon(json!({ "event": name }));
        assert_eq!(send(port, "/collect", &[], &refused), 422);
    }
    assert_eq!(send(port, "/collect", &[], b"not json"), 400);
    assert_eq!(send(port, "/collect", &[], b"[]"), 400);
    let elsewhere = json!({"domain": "other.example.org", "page": "/"}).to_string();
    assert_eq!(send(port, "/collect", &[], elsewhere.as_bytes()), 422);
    assert_eq!(send(port, "/collect", &[], &vec![b' '; 9000]), 413);
    let get = request(port, "GET", "/collect", HOST, None);
    assert_eq!(get.status, 405);
    for agent in [
        "Googlebot/2.1 (+http://www.google.com/bot.html)",
        "curl/8.0",
    ] {
        let ua = [("User-Agent", agent)];
        assert_eq!(send(port, "/collect", &ua, &beacon(json!({}))), 204);
    }
    // Two stored, then two refused by the sink.
    assert_eq!(send(port, "/stored", &[], &beacon(json!({}))), 204);
    assert_eq!(send(port, "/stored", &[], &beacon(json!({}))), 204);
    sink.set_response(500, "{\"error\":\"down\"}");
    assert_eq!(send(port, "/stored", &[], &beacon(json!({}))), 502);
    assert_eq!(send(port, "/stored", &[], &beacon(json!({}))), 502);

    let samples = scrape(port);
    for (name, n) in expected {
        assert_eq!(outcome(&samples, name), n, "outcome {name}");
    }
    let events =
        |event: &str| samples[&format!("nginx_analytics_events_total{{event=\"{event}\"}}")];
    assert_eq!(events("socialclick"), 2.0);
    assert_eq!(events("download"), 0.0);
    assert_eq!(events("other"), 3.0, "refused names are never labels");
    assert!(!samples
        .keys()
        .any(|k| k.contains("signup") || k.contains("drop")));
    assert_eq!(samples["nginx_analytics_writes_total{result=\"ok\"}"], 2.0);
    assert_eq!(
        samples["nginx_analytics_writes_total{result=\"failed\"}"],
        2.0
    );
    assert_eq!(samples["nginx_analytics_written_lines_total"], 2.0);
    assert_eq!(
        samples["nginx_analytics_write_duration_seconds_bucket{le=\"inf\"}"], 4.0,
        "{samples:?}"
    );
    assert_eq!(samples["nginx_analytics_batch_lines_bucket{le=\"1\"}"], 4.0);
    assert_eq!(samples["nginx_analytics_waiting_requests"], 0.0);
    assert!(samples["nginx_analytics_start_time_seconds"] > 1.7e9);

    let json = json(port);
    for (name, n) in expected {
        assert_eq!(json["beacons"][name].as_f64(), Some(n), "JSON {name}");
    }
    assert_eq!(
        json["events"],
        json!({"socialclick": 2, "download": 0, "other": 3})
    );
    assert_eq!(json["writes"], json!({"ok": 2, "failed": 2}));
    assert_eq!(json["written_lines"], 2);
    nginx.assert_no_crash_in_log();
}

#[test]
fn a_reload_keeps_the_counters_and_a_restart_starts_from_zero() {
    let sink = FakeSink::start();
    let port = free_port();
    let config = conf(port, sink.port(), "");
    let mut nginx = Nginx::start_with(two_workers(), &config);
    for _ in 0..5 {
        assert_eq!(send(port, "/collect", &[], &beacon(json!({}))), 204);
    }
    let before = scrape(port);
    assert_eq!(outcome(&before, "accepted"), 5.0);
    nginx.reload();
    for _ in 0..3 {
        assert_eq!(send(port, "/collect", &[], &beacon(json!({}))), 204);
    }
    let after = scrape(port);
    assert_eq!(
        outcome(&after, "accepted"),
        8.0,
        "counting carries on after a reload"
    );
    assert_eq!(
        after["nginx_analytics_start_time_seconds"],
        before["nginx_analytics_start_time_seconds"]
    );
    nginx.assert_no_crash_in_log();
    nginx.quit();
    let restarted = Nginx::start_with(two_workers(), &config);
    assert_eq!(
        outcome(&scrape(port), "accepted"),
        0.0,
        "a restart starts from zero"
    );
    restarted.assert_no_crash_in_log();
}

#[test]
fn concurrent_beacons_on_two_workers_sum_exactly() {
    let port = free_port();
    let sink = FakeSink::start();
    let nginx = Nginx::start_with(two_workers(), &conf(port, sink.port(), ""));
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 10_000;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let body = beacon(json!({}));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (barrier, body) = (barrier.clone(), body.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut request = format!(
                    "POST /collect HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                request.extend_from_slice(&body);
                let mut conn = Conn::open(port);
                let mut sent = 0;
                while sent < PER_CLIENT {
                    // A fresh connection every 1,000 beacons, so both workers take some.
                    if sent % 1000 == 0 {
                        conn = Conn::open(port);
                    }
                    assert_eq!(conn.request(&request).status, 204);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let sent: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let samples = scrape(port);
    assert_eq!(outcome(&samples, "accepted"), sent as f64);
    nginx.assert_no_crash_in_log();
}

#[test]
fn the_metrics_location_answers_get_and_head_only() {
    let port = free_port();
    let sink = FakeSink::start();
    let nginx = Nginx::start(&conf(port, sink.port(), ""));
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let response = request(port, method, "/metrics", HOST, Some(b"x"));
        assert_eq!(response.status, 405, "{method}");
        assert_eq!(response.header("allow"), Some("GET, HEAD"));
    }
    let head = request(port, "HEAD", "/metrics", HOST, None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let odd = request(port, "GET", "/metrics?format=xml&%ZZ=1&a", HOST, None);
    assert_eq!(odd.status, 200, "unknown parameters are ignored");
    assert!(odd.body_text().starts_with("# HELP"));
    nginx.assert_no_crash_in_log();
}

#[test]
fn with_the_zone_off_nothing_is_counted() {
    let port = free_port();
    let sink = FakeSink::start();
    let nginx = Nginx::start(&conf(port, sink.port(), "analytics_metrics_zone off;"));
    assert_eq!(send(port, "/collect", &[], &beacon(json!({}))), 204);
    let response = request(port, "GET", "/metrics", HOST, None);
    assert_eq!(response.status, 404);
    nginx.assert_no_crash_in_log();
    let (ok, log) =
        common::nginx_test_config(&conf(port, sink.port(), "analytics_metrics_zone 1k;"));
    assert!(
        !ok && log.contains("\"analytics_metrics_zone\" directive takes"),
        "{log}"
    );
    let _ = Duration::ZERO;
}

#[test]
fn a_reload_that_fails_late_keeps_counting_into_the_running_zone() {
    // The new configuration has another zone size and a port that cannot be bound: nginx maps
    // the new zone, fails to bind, unmaps it and keeps the old cycle. A worker it forks later
    // must count into the old cycle's zone (not into the unmapped one).
    let port = free_port();
    let sink = FakeSink::start();
    let nginx = Nginx::start_with(two_workers(), &conf(port, sink.port(), ""));
    assert_eq!(send(port, "/collect", &[], &beacon(json!({}))), 204);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let taken_port = taken.local_addr().unwrap().port();
    let failing = format!(
        "analytics_metrics_zone 2m;\nserver {{ listen 127.0.0.1:{taken_port}; return 204; }}\n{}",
        conf(port, sink.port(), "")
    );
    nginx.write_config(&failing);
    nginx.reload();
    assert!(
        common::wait_until(Duration::from_secs(10), || nginx
            .error_log()
            .contains("bind() to 127.0.0.1")),
        "{}",
        nginx.error_log()
    );
    for pid in nginx.worker_pids() {
        assert!(common::send_signal(pid, common::SIGKILL));
    }
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            nginx.worker_pids().len() == 2 && send(port, "/collect", &[], &beacon(json!({}))) == 204
        }),
        "new workers answer"
    );
    assert_eq!(send(port, "/collect", &[], &beacon(json!({}))), 204);
    let samples = scrape(port);
    assert!(outcome(&samples, "accepted") >= 3.0, "{samples:?}");
    let log = nginx.error_log();
    assert!(
        !log.contains("signal 11") && !log.contains("signal 6"),
        "{log}"
    );
    drop(taken);
}

#[test]
fn background_beacons_count_as_accepted_and_their_failed_writes_as_failed() {
    let sink = FakeSink::start();
    let port = free_port();
    let http = conf(port, sink.port(), "").replace(
        "location = /stored { analytics; }",
        "location = /stored { analytics; analytics_write_mode background; }",
    );
    let nginx = Nginx::start(&http);
    sink.set_response(500, "{\"error\":\"down\"}");
    sink.set_delay(Duration::from_millis(300));
    let barrier = Arc::new(Barrier::new(10));
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                send(port, "/stored", &[], &beacon(json!({})))
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 204);
    }
    assert!(common::wait_until(Duration::from_secs(5), || {
        scrape(port)["nginx_analytics_writes_total{result=\"failed\"}"] >= 1.0
            && sink.requests().len() >= 2
    }));
    thread::sleep(Duration::from_millis(700));
    let samples = scrape(port);
    assert_eq!(
        outcome(&samples, "accepted"),
        10.0,
        "every beacon was answered 204"
    );
    assert_eq!(outcome(&samples, "write_failed"), 0.0);
    assert_eq!(samples["nginx_analytics_written_lines_total"], 0.0);
    nginx.assert_no_crash_in_log();
}

#[test]
fn a_body_sent_to_the_metrics_location_is_never_taken_for_a_request() {
    let sink = FakeSink::start();
    let port = free_port();
    let http = conf(port, sink.port(), "").replace(
        "location = /metrics { analytics_metrics; }",
        "location = /metrics { analytics_metrics; }\n    location = /smuggled { return 200 'SMUGGLED'; }\n    location = /next { return 200 'NEXT'; }",
    );
    let nginx = Nginx::start(&http);
    let inner = format!("GET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let mut conn = Conn::open(port);
    let outer = format!(
        "POST /metrics HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    assert_eq!(conn.request(outer.as_bytes()).status, 405);
    let next = conn.request(
        format!("GET /next HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(next.body_text(), "NEXT", "the body was discarded, not run");
    nginx.assert_no_crash_in_log();
}
