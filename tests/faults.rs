//! Faults around the module: a sink that is down, slow or answers an error, in both write modes;
//! `nginx -s reload` and a worker killed with SIGKILL while beacons are flowing.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use common::points::sink_points;
use common::{
    free_port, send_signal, try_post, wait_until, Conn, FakeSink, Nginx, NginxOptions, Outcome,
    SIGKILL,
};

/// Bound for any single answer (the slowest fault is the 1 s proxy_read_timeout).
const ANSWER_BOUND: Duration = Duration::from_secs(4);
const LOG_WAIT: Duration = Duration::from_secs(5);

/// Endpoints: `/wait` and `/bg` write to the sink; `/wait-dead` and `/bg-dead` to a closed port.
fn conf(port: u16, sink_port: u16, dead_port: u16) -> String {
    let write = |name: &str, upstream: &str| {
        format!(
            r#"
    location = {name} {{
        internal;
        proxy_pass http://{upstream}/write?db=analytics&precision=ns;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass_request_headers off;
        proxy_ignore_client_abort on;
        proxy_connect_timeout 1s;
        proxy_send_timeout 1s;
        proxy_read_timeout 1s;
    }}"#
        )
    };
    format!(
        r#"
upstream sink {{
    server 127.0.0.1:{sink_port};
    keepalive 8;
}}
upstream dead {{
    server 127.0.0.1:{dead_port};
}}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick;
    location = /wait {{ analytics; analytics_write_mode wait; }}
    location = /bg {{ analytics; analytics_write_mode background; }}
    location = /wait-dead {{
        analytics;
        analytics_write /_analytics/write-dead;
    }}
    location = /bg-dead {{
        analytics;
        analytics_write /_analytics/write-dead;
        analytics_write_mode background;
    }}
    {}
    {}
}}
"#,
        write("/_analytics/write", "sink"),
        write("/_analytics/write-dead", "dead"),
    )
}

fn beacon(sess: &str) -> Vec<u8> {
    json!({
        "domain": "www.example.com", "page": "/faults", "sess_id": sess,
        "event": "socialclick", "note": "n"
    })
    .to_string()
    .into_bytes()
}

/// A keepalive request (no `Connection: close`).
fn keepalive_request(path: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn write_errors(nginx: &Nginx) -> usize {
    nginx.error_log().matches("analytics: write to").count()
}

fn master_on(workers: u32) -> NginxOptions {
    NginxOptions {
        master_process: true,
        worker_processes: workers,
        ..Default::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Down,
    Slow,
    Status(u16),
}

#[test]
fn sink_faults_give_defined_answers_one_log_line_and_keep_the_connection() {
    let sink = FakeSink::start();
    let port = free_port();
    let dead = free_port();
    let nginx = Nginx::start_with(master_on(1), &conf(port, sink.port(), dead));
    let workers = nginx.worker_pids();

    let faults = [
        Fault::Down,
        Fault::Slow,
        Fault::Status(400),
        Fault::Status(401),
        Fault::Status(413),
        Fault::Status(500),
        Fault::Status(503),
    ];
    let mut survived = 0;
    let mut failures = Vec::new();
    let mut n = 0;
    for fault in faults {
        for wait_mode in [true, false] {
            n += 1;
            // Each case is checked on its own; failures are collected and reported together.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let what = format!(
                    "{fault:?} in {} mode",
                    if wait_mode { "wait" } else { "background" }
                );
                let path = match (fault, wait_mode) {
                    (Fault::Down, true) => "/wait-dead",
                    (Fault::Down, false) => "/bg-dead",
                    (_, true) => "/wait",
                    (_, false) => "/bg",
                };
                match fault {
                    Fault::Down => {}
                    Fault::Slow => sink.set_delay(Duration::from_millis(1500)),
                    Fault::Status(status) => {
                        sink.set_response(status, r#"{"error":"injected failure"}"#)
                    }
                }
                let errors_before = write_errors(&nginx);
                let writes_before = sink.requests().len();
                let points_before = sink_points(&sink).len();

                // The failing beacon, on a keepalive connection.
                let mut conn = Conn::open(port);
                let started = Instant::now();
                let failed = conn.request(&keepalive_request(path, &beacon(&format!("fail-{n}"))));
                let took = started.elapsed();
                let want = if wait_mode { 502 } else { 204 };
                assert_eq!(failed.status, want, "{what}: {}", failed.body_text());
                assert!(took < ANSWER_BOUND, "{what}: answered after {took:?}");
                if !wait_mode {
                    assert!(
                        took < Duration::from_millis(500),
                        "{what}: background answers at once, took {took:?}"
                    );
                }

                // Exactly one error line for the one failed write (background: logged later).
                assert!(
                    wait_until(LOG_WAIT, || write_errors(&nginx) > errors_before),
                    "{what}: no error line\n{}",
                    nginx.error_log()
                );
                thread::sleep(Duration::from_millis(100));
                let log = nginx.error_log();
                let new_lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("analytics: write to"))
                    .skip(errors_before)
                    .collect();
                assert_eq!(new_lines.len(), 1, "{what}: {new_lines:#?}");
                let line = new_lines[0];
                assert!(line.contains("[error]"), "{what}: {line}");
                let expected_uri = if matches!(fault, Fault::Down) {
                    "\"/_analytics/write-dead\" failed"
                } else {
                    "\"/_analytics/write\" failed"
                };
                assert!(line.contains(expected_uri), "{what}: {line}");
                assert!(line.contains("1 point(s) not stored"), "{what}: {line}");
                if let Fault::Status(status) = fault {
                    assert!(
                        line.contains(&format!("sink answered {status}")),
                        "{what}: {line}"
                    );
                }
                let writes = sink.requests().len() - writes_before;
                let expected_writes = if matches!(fault, Fault::Down) { 0 } else { 1 };
                assert_eq!(
                    writes, expected_writes,
                    "{what}: writes that reached the sink"
                );

                // Heal the sink; the same client connection carries the next beacon.
                sink.set_delay(Duration::ZERO);
                sink.set_response(204, "");
                let healthy = if wait_mode { "/wait" } else { "/bg" };
                let started = Instant::now();
                let ok = conn.request(&keepalive_request(healthy, &beacon(&format!("ok-{n}"))));
                assert_eq!(
                    ok.status, 204,
                    "{what}: next request on the same connection"
                );
                assert!(
                    started.elapsed() < ANSWER_BOUND,
                    "{what}: next request stuck"
                );
                let sess = format!("ok-{n}");
                assert!(
                    wait_until(LOG_WAIT, || sink_points(&sink)
                        .iter()
                        .any(|p| p.sess() == Some(sess.as_str()))),
                    "{what}: the beacon after the fault was written"
                );
                // The failed beacon's point was not stored (the fake sink records it, but answered
                // with an error), and nothing else was written meanwhile.
                let new_points: Vec<String> = sink_points(&sink)[points_before..]
                    .iter()
                    .filter_map(|p| p.sess().map(str::to_string))
                    .collect();
                let expected_points: Vec<String> = if matches!(fault, Fault::Down) {
                    vec![sess.clone()]
                } else {
                    vec![format!("fail-{n}"), sess.clone()]
                };
                assert_eq!(new_points, expected_points, "{what}");
            }));
            match result {
                Ok(()) => survived += 1,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{fault:?}, wait mode {wait_mode}: {msg}"));
                    // Leave the sink healthy for the next case.
                    sink.set_delay(Duration::ZERO);
                    sink.set_response(204, "");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 14 fault cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(nginx.worker_pids(), workers, "no worker crashed");
    nginx.assert_no_crash_in_log();
    eprintln!("faults: {survived} sink faults survived (7 kinds x 2 modes), worker {workers:?}");
}

/// What the flowing clients saw.
struct Flow {
    /// (session, outcome) of every beacon.
    outcomes: Vec<(String, Outcome)>,
    /// Beacons sent when the disruption started, and when it was over.
    sent_at_disruption: usize,
    sent_after_disruption: usize,
}

const THREADS: usize = 3;
const PER_THREAD: usize = 300;

/// Runs THREADS clients sending PER_THREAD beacons each (fresh connection each, a unique
/// session id each); calls `disrupt` once a third of them were sent.
fn flow(port: u16, disrupt: impl FnOnce()) -> Flow {
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let sent = Arc::clone(&sent);
            thread::spawn(move || {
                let mut outcomes = Vec::with_capacity(PER_THREAD);
                for i in 0..PER_THREAD {
                    let sess = format!("t{t}-{i}");
                    outcomes.push((sess.clone(), try_post(port, "/wait", &beacon(&sess))));
                    sent.fetch_add(1, Ordering::SeqCst);
                    // Pace the flow so the disruption lands in the middle of it.
                    thread::sleep(Duration::from_millis(2));
                }
                outcomes
            })
        })
        .collect();
    let total = THREADS * PER_THREAD;
    assert!(
        wait_until(Duration::from_secs(20), || sent.load(Ordering::SeqCst)
            >= total / 3),
        "beacons are not flowing"
    );
    let sent_at_disruption = sent.load(Ordering::SeqCst);
    disrupt();
    let sent_after_disruption = sent.load(Ordering::SeqCst);
    assert!(
        sent_after_disruption < total,
        "beacons were still flowing when the disruption was over ({sent_after_disruption} of \
         {total} sent)"
    );
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.join().expect("client thread"));
    }
    Flow {
        outcomes,
        sent_at_disruption,
        sent_after_disruption,
    }
}

/// Every beacon answered 204 is in the sink exactly once, and no beacon is in it twice.
/// Returns (answered 204, connection errors, stored without a 204).
fn check_flow(sink: &FakeSink, flow: &Flow) -> (usize, usize, usize) {
    let mut stored: HashMap<String, usize> = HashMap::new();
    for point in sink_points(sink) {
        if let Some(sess) = point.sess() {
            *stored.entry(sess.to_string()).or_default() += 1;
        }
    }
    let duplicates: Vec<_> = stored.iter().filter(|(_, &n)| n > 1).collect();
    assert!(duplicates.is_empty(), "stored twice: {duplicates:?}");
    let mut ok = 0;
    let mut conn_errors = 0;
    let mut unacknowledged = 0;
    for (sess, outcome) in &flow.outcomes {
        match outcome {
            Outcome::Status(204) => {
                ok += 1;
                assert_eq!(
                    stored.get(sess),
                    Some(&1),
                    "{sess} answered 204 but not stored"
                );
            }
            Outcome::Status(other) => panic!("{sess}: answered {other}"),
            Outcome::ConnError(e) => {
                conn_errors += 1;
                eprintln!("{sess}: connection error: {e}");
                if stored.contains_key(sess) {
                    unacknowledged += 1;
                }
            }
        }
    }
    (ok, conn_errors, unacknowledged)
}

#[test]
fn reload_while_beacons_flow_loses_nothing() {
    let sink = FakeSink::start();
    let port = free_port();
    let dead = free_port();
    let conf = conf(port, sink.port(), dead);
    let nginx = Nginx::start_with(master_on(2), &conf);
    let before = nginx.worker_pids();
    let started = Instant::now();
    let flow = flow(port, || {
        nginx.write_config(&conf);
        nginx.reload();
    });
    let after = nginx.worker_pids();
    assert_eq!(after.len(), 2, "two workers after the reload");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "new workers: {before:?} -> {after:?}"
    );
    let (ok, conn_errors, _) = check_flow(&sink, &flow);
    assert_eq!(conn_errors, 0, "a graceful reload drops no request");
    assert_eq!(ok, THREADS * PER_THREAD);
    assert_eq!(sink_points(&sink).len(), THREADS * PER_THREAD);
    let log = nginx.error_log();
    assert!(!log.contains("analytics: write to"), "{log}");
    eprintln!(
        "reload: {ok} of {} beacons answered 204 and stored once, reload while {}..{} were sent, \
         workers {before:?} -> {after:?}, {:.1}s",
        THREADS * PER_THREAD,
        flow.sent_at_disruption,
        flow.sent_after_disruption,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_killed_worker_is_respawned_and_only_its_in_flight_requests_fail() {
    let sink = FakeSink::start();
    // Writes take a little time, so that requests are in flight when the worker dies.
    sink.set_delay(Duration::from_millis(5));
    let port = free_port();
    let dead = free_port();
    let nginx = Nginx::start_with(master_on(2), &conf(port, sink.port(), dead));
    let before = nginx.worker_pids();
    assert_eq!(before.len(), 2);
    let victim = before[0];
    let started = Instant::now();
    let mut respawned = Vec::new();
    let flow = flow(port, || {
        assert!(send_signal(victim, SIGKILL), "kill {victim}");
        assert!(
            wait_until(Duration::from_secs(10), || {
                let now = nginx.worker_pids();
                now.len() == 2 && !now.contains(&victim)
            }),
            "the master respawned the worker: {:?}",
            nginx.worker_pids()
        );
        respawned = nginx.worker_pids();
    });
    let (ok, conn_errors, unacknowledged) = check_flow(&sink, &flow);
    assert!(
        conn_errors <= THREADS,
        "at most one in-flight request per client can die with the worker: {conn_errors}"
    );
    assert_eq!(
        ok + conn_errors,
        THREADS * PER_THREAD,
        "every other beacon got 204"
    );
    // Service continues after the kill.
    let after = Conn::open(port).request(&keepalive_request("/wait", &beacon("after-kill")));
    assert_eq!(after.status, 204);
    assert!(nginx
        .error_log()
        .contains(&format!("worker process {victim} exited on signal 9")));
    eprintln!(
        "kill: worker {victim} killed after {} of {} beacons sent (respawned by {}); {ok} answered 204 (all \
         stored once), {conn_errors} connection error(s) ({unacknowledged} of those stored \
         anyway), workers {before:?} -> {respawned:?}, {:.1}s",
        flow.sent_at_disruption,
        THREADS * PER_THREAD,
        flow.sent_after_disruption,
        started.elapsed().as_secs_f64()
    );
}
