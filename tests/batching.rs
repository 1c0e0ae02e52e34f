//! Group commit: beacons accepted while a write is on its way are written together, and in
//! `wait` mode each one is answered only after the write that holds its line.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use common::{free_port, post, FakeSink, Influx, Nginx, NginxOptions, Response};

const WAIT: Duration = Duration::from_secs(10);

fn conf(port: u16, sink_port: u16, endpoint_extra: &str) -> String {
    let write_location =
        common::write_location("http://sink/write?db=analytics&precision=ns", "5s");
    format!(
        r#"
upstream sink {{
    server 127.0.0.1:{sink_port};
    keepalive 8;
}}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    location = /collect {{
        analytics;
        {endpoint_extra}
    }}
{write_location}
}}
"#
    )
}

/// A page view that names its own session, so each line can be traced.
fn beacon(sess: &str) -> Vec<u8> {
    json!({"domain": "www.example.com", "page": "/batch", "sess_id": sess})
        .to_string()
        .into_bytes()
}

/// Sends one beacon per session name, all at once (one thread each), and returns the answers
/// by session.
fn burst(port: u16, sessions: &[String]) -> HashMap<String, Response> {
    let barrier = Arc::new(Barrier::new(sessions.len()));
    let threads: Vec<_> = sessions
        .iter()
        .map(|sess| {
            let (sess, barrier) = (sess.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let response = post(port, "/collect", &beacon(&sess));
                (sess, response)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect()
}

fn sessions(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The session of every line of every write, per write, in arrival order.
fn sessions_per_write(sink: &FakeSink) -> Vec<Vec<String>> {
    sink.requests()
        .iter()
        .map(|write| {
            let body = String::from_utf8(write.body.clone()).expect("UTF-8 body");
            body.lines()
                .map(|line| {
                    let point = common::points::Point::parse(line).expect("a readable line");
                    point.sess().expect("a session").to_string()
                })
                .collect()
        })
        .collect()
}

/// Starts a write that the sink holds for `hold`, so the next beacons gather behind it.
fn occupy_the_sink(port: u16, sink: &FakeSink, hold: Duration) -> thread::JoinHandle<Response> {
    sink.set_delay(hold);
    let first = thread::spawn(move || post(port, "/collect", &beacon("first")));
    assert_eq!(
        sink.wait_for_requests(1, WAIT).len(),
        1,
        "the first beacon is written at once"
    );
    first
}

#[test]
fn beacons_arriving_during_a_write_are_written_together_each_line_once() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(port, sink.port(), ""));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(400));
    let names = sessions("burst", 40);
    let answers = burst(port, &names);
    assert_eq!(first.join().unwrap().status, 204);
    for (sess, response) in &answers {
        assert_eq!(response.status, 204, "{sess}");
    }

    let writes = sessions_per_write(&sink);
    let all: Vec<&String> = writes.iter().flatten().collect();
    let unique: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), 41, "every line written once: {writes:?}");
    assert_eq!(unique.len(), 41, "no line written twice");
    assert!(
        writes.len() <= 4,
        "41 beacons took {} writes: {writes:?}",
        writes.len()
    );
}

#[test]
fn a_batch_is_written_when_it_reaches_its_line_limit() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(
        port,
        sink.port(),
        "analytics_batch lines=10 delay=5s;",
    ));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(800));
    let answers = burst(port, &sessions("lines", 25));
    assert!(answers.values().all(|r| r.status == 204));
    first.join().unwrap();
    let sizes: Vec<usize> = sessions_per_write(&sink).iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 26);
    assert!(
        sizes.iter().all(|n| *n <= 10),
        "no write above 10 lines: {sizes:?}"
    );
    assert!(
        sizes.contains(&10),
        "full batches went out at 10 lines: {sizes:?}"
    );
}

#[test]
fn a_batch_is_written_when_it_reaches_its_byte_limit() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(
        port,
        sink.port(),
        "analytics_batch bytes=400 delay=5s;",
    ));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(800));
    let answers = burst(port, &sessions("bytes", 12));
    assert!(answers.values().all(|r| r.status == 204));
    first.join().unwrap();
    let writes = sink.requests();
    let lines: usize = sessions_per_write(&sink).iter().map(Vec::len).sum();
    assert_eq!(lines, 13);
    let line_len = writes[0].body.len();
    for write in &writes {
        assert!(
            write.body.len() < 400 + line_len,
            "a batch is written once it holds 400 bytes: {} bytes",
            write.body.len()
        );
    }
    assert!(
        writes.len() >= 3,
        "about 100-byte lines, 400-byte batches: {}",
        writes.len()
    );
}

#[test]
fn with_every_write_slot_busy_and_the_batch_full_further_beacons_wait_for_room() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(
        port,
        sink.port(),
        "analytics_batch lines=2 delay=5s;",
    ));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(800));
    // 1 write in flight; 3 more batches of 2 start; one full batch of 2 stays open; the other
    // 4 beacons wait for a write slot, and none is refused.
    let started = Instant::now();
    let answers = burst(port, &sessions("full", 12));
    first.join().unwrap();
    for (sess, response) in &answers {
        assert_eq!(response.status, 204, "{sess}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the last ones waited for room"
    );
    let writes = sessions_per_write(&sink);
    let all: HashSet<&String> = writes.iter().flatten().collect();
    assert_eq!(all.len(), 13, "every beacon written once: {writes:?}");
    assert!(
        writes.iter().all(|w| w.len() <= 2),
        "no batch grew past its limit: {writes:?}"
    );
    assert!(
        sink.connections_accepted() <= 4,
        "at most 4 writes at a time (one upstream connection each): {}",
        sink.connections_accepted()
    );
}

#[test]
fn a_batch_waits_at_most_its_delay_for_a_slow_write() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(port, sink.port(), "analytics_batch delay=100ms;"));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(1500));
    let started = Instant::now();
    let second = thread::spawn(move || post(port, "/collect", &beacon("second")));
    let writes = sink.wait_for_requests(2, Duration::from_secs(1));
    assert_eq!(
        writes.len(),
        2,
        "the second batch did not wait for the first write"
    );
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(second.join().unwrap().status, 204);
    assert_eq!(first.join().unwrap().status, 204);
}

#[test]
fn when_a_batch_write_fails_every_parked_beacon_gets_502() {
    let sink = FakeSink::start();
    let port = free_port();
    let nginx = Nginx::start(&conf(port, sink.port(), ""));
    sink.set_response(503, r#"{"error":"overloaded"}"#);
    let first = occupy_the_sink(port, &sink, Duration::from_millis(400));
    let answers = burst(port, &sessions("fail", 20));
    assert_eq!(
        first.join().unwrap().status,
        502,
        "the first write got 503 too"
    );
    for (sess, response) in &answers {
        assert_eq!(response.status, 502, "{sess}");
    }
    let writes = sink.requests().len();
    let log = nginx.error_log();
    assert_eq!(
        log.matches("failed: sink answered 503").count(),
        writes,
        "one line per write"
    );
    assert!(log.contains("point(s) not stored"), "{log}");
}

#[test]
fn a_413_splits_the_batch_and_retries_the_halves() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(port, sink.port(), ""));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(400));
    sink.push_response(413, r#"{"error":"Request Entity Too Large"}"#);
    let answers = burst(port, &sessions("split", 16));
    first.join().unwrap();
    for (sess, response) in &answers {
        assert_eq!(response.status, 204, "{sess}: stored after the split");
    }
    let writes = sessions_per_write(&sink);
    let refused = writes
        .iter()
        .find(|w| w.len() > 1 && w.iter().any(|s| s.starts_with("split")));
    let refused = refused.expect("a batch of the burst").clone();
    let stored: Vec<&String> = writes
        .iter()
        .skip_while(|w| **w != refused)
        .skip(1)
        .flatten()
        .collect();
    let expected: HashSet<&String> = refused.iter().collect();
    let stored_set: HashSet<&String> = stored.iter().copied().collect();
    assert!(
        expected.is_subset(&stored_set),
        "both halves were written: {writes:?}"
    );
    assert_eq!(
        stored.len(),
        stored_set.len(),
        "no line written twice after the split"
    );
    let halves: Vec<usize> = writes
        .iter()
        .skip_while(|w| **w != refused)
        .skip(1)
        .take(2)
        .map(Vec::len)
        .collect();
    assert_eq!(
        halves.iter().sum::<usize>(),
        refused.len(),
        "two halves: {writes:?}"
    );
}

#[test]
fn in_background_mode_beacons_are_answered_at_once_and_written_together() {
    let sink = FakeSink::start();
    let port = free_port();
    let nginx = Nginx::start(&conf(port, sink.port(), "analytics_write_mode background;"));
    sink.set_delay(Duration::from_millis(500));
    let started = Instant::now();
    let first = post(port, "/collect", &beacon("bg-first"));
    assert_eq!(first.status, 204);
    let answers = burst(port, &sessions("bg", 20));
    assert!(answers.values().all(|r| r.status == 204));
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "nobody waited for the write"
    );
    assert!(common::wait_until(WAIT, || {
        sessions_per_write(&sink)
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            == 21
    }));
    assert!(
        sink.requests().len() < 21,
        "batched: {} writes",
        sink.requests().len()
    );
    // A failed background batch is logged with the number of points it held.
    sink.set_delay(Duration::ZERO);
    sink.set_response(500, "{}");
    let _ = burst(port, &sessions("bg-fail", 3));
    assert!(
        nginx.wait_for_log("failed: sink answered 500", WAIT),
        "{}",
        nginx.error_log()
    );
    assert!(nginx.error_log().contains("point(s) not stored"));
}

#[test]
fn batching_off_is_one_write_per_beacon() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(port, sink.port(), "analytics_batch off;"));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(300));
    let answers = burst(port, &sessions("off", 10));
    first.join().unwrap();
    assert!(answers.values().all(|r| r.status == 204));
    let writes = sessions_per_write(&sink);
    assert_eq!(writes.len(), 11, "{writes:?}");
    assert!(writes.iter().all(|w| w.len() == 1));
}

#[test]
fn a_reload_with_parked_beacons_writes_and_answers_them() {
    let sink = FakeSink::start();
    let port = free_port();
    let opts = NginxOptions {
        master_process: true,
        worker_processes: 1,
        ..Default::default()
    };
    let nginx = Nginx::start_with(opts, &conf(port, sink.port(), "analytics_batch delay=5s;"));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(1000));
    let names = sessions("reload", 10);
    let clients = thread::spawn(move || burst(port, &names));
    thread::sleep(Duration::from_millis(200));
    nginx.reload();
    let answers = clients.join().unwrap();
    assert_eq!(first.join().unwrap().status, 204);
    for (sess, response) in &answers {
        assert_eq!(response.status, 204, "{sess} answered across the reload");
    }
    let all: Vec<String> = sessions_per_write(&sink).into_iter().flatten().collect();
    assert_eq!(all.len(), 11, "every parked line written once: {all:?}");
}

#[test]
fn with_a_real_influxdb_every_204_of_a_burst_is_a_stored_point() {
    let influx = Influx::start();
    influx.create_database("analytics");
    let port = free_port();
    let _nginx = Nginx::start(&conf(port, influx.port(), ""));
    let names = sessions("influx", 64);
    let answers = burst(port, &names);
    let acknowledged = answers.values().filter(|r| r.status == 204).count();
    assert_eq!(acknowledged, 64);
    let rows = influx.rows("analytics", "SELECT * FROM pf_analytics");
    let stored: HashSet<String> = rows
        .iter()
        .filter_map(|row| row.get("sess").and_then(|v| v.as_str()).map(str::to_string))
        .collect();
    assert_eq!(rows.len(), 64, "each acknowledged beacon is one point");
    assert_eq!(stored, names.iter().cloned().collect::<HashSet<_>>());
}

#[test]
fn the_sinks_error_message_is_logged_once_per_failed_write() {
    let sink = FakeSink::start();
    let port = free_port();
    let nginx = Nginx::start(&conf(port, sink.port(), ""));
    sink.set_response(401, "{\"error\":\"authorization failed\"}\n");
    assert_eq!(post(port, "/collect", &beacon("denied")).status, 502);
    let log = nginx.error_log();
    assert_eq!(
        log.matches(
            r#"failed: sink answered 401: {"error":"authorization failed"}, 1 point(s) not stored"#
        )
        .count(),
        1,
        "{log}"
    );
}

#[test]
fn a_partial_write_by_a_real_influxdb_is_reported() {
    let influx = Influx::start();
    influx.create_database("analytics");
    // `counter` already exists as a float in the current shard: InfluxDB refuses our integer
    // `counter=1i` lines with a 400 "partial write" (it would store the other lines).
    let seeded = influx.write_lines("analytics", "pf_analytics,type=pageview counter=1\n");
    assert_eq!(seeded.status, 204);
    let port = free_port();
    let nginx = Nginx::start(&conf(port, influx.port(), ""));
    assert_eq!(post(port, "/collect", &beacon("conflict")).status, 502);
    let log = nginx.error_log();
    assert!(
        log.contains("sink answered 400, a partial write (some lines stored):")
            && log.contains("field type conflict"),
        "{log}"
    );
}

#[test]
fn a_leader_whose_client_went_away_still_writes_its_batch() {
    let sink = FakeSink::start();
    let port = free_port();
    let _nginx = Nginx::start(&conf(port, sink.port(), ""));
    let first = occupy_the_sink(port, &sink, Duration::from_millis(600));
    // The next beacon opens a batch (its leader), and its client disconnects at once.
    let body = beacon("leader-gone");
    let mut leader = common::Conn::open(port);
    let head = format!(
        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    leader.send(head.as_bytes());
    leader.send(&body);
    thread::sleep(Duration::from_millis(50));
    drop(leader);
    let answers = burst(port, &sessions("after-leader", 8));
    assert_eq!(first.join().unwrap().status, 204);
    for (sess, response) in &answers {
        assert_eq!(response.status, 204, "{sess}");
    }
    let all: HashSet<String> = sessions_per_write(&sink).into_iter().flatten().collect();
    assert!(
        all.contains("leader-gone"),
        "the leader's own line was written: {all:?}"
    );
    assert_eq!(all.len(), 10);
}

#[test]
fn beacons_multiplexed_on_one_http2_connection_share_batches() {
    let sink = FakeSink::start();
    let port = free_port();
    let conf = conf(port, sink.port(), "analytics_drop_bots off;").replace(
        &format!("listen 127.0.0.1:{port};"),
        &format!("listen 127.0.0.1:{port};\n    http2 on;"),
    );
    let _nginx = Nginx::start(&conf);
    sink.set_delay(Duration::from_millis(20));
    let dir = common::TestDir::new("h2");
    let body = dir.path().join("beacon.json");
    // h2 clients send :authority, so the beacon names the host the client connects to.
    std::fs::write(&body, r#"{"domain":"127.0.0.1","page":"/h2"}"#).unwrap();
    let output = std::process::Command::new("h2load")
        .args(["-n", "500", "-c", "1", "-m", "32", "-d"])
        .arg(&body)
        .arg(format!("http://127.0.0.1:{port}/collect"))
        .output()
        .expect("h2load (Debian package nghttp2-client) must be installed");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("status codes: 500 2xx, 0 3xx, 0 4xx, 0 5xx"),
        "500 streams on one connection, all answered 204:\n{report}"
    );
    let writes = sink.requests();
    let lines: usize = writes
        .iter()
        .map(|w| w.body.split(|b| *b == b'\n').count() - 1)
        .sum();
    assert_eq!(lines, 500, "every beacon written once");
    assert!(
        writes.len() < 100,
        "streams of one connection share writes: {}",
        writes.len()
    );
}
