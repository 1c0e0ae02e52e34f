//! Group commit across server blocks and request lifecycles: a line is written only through its
//! own server block's write location, no batch dies with the request that leads it, a sink's
//! long answer is never fatal, and subrequests cannot post beacons.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use serde_json::json;

use common::{
    free_port, post, post_with_headers, write_location, FakeSink, Influx, Nginx, NginxOptions,
    Response,
};

const WAIT: Duration = Duration::from_secs(10);

/// A page view whose page names the beacon, so every line can be traced (the page is a tag in
/// every schema).
fn beacon(domain: &str, id: &str) -> Vec<u8> {
    json!({"domain": domain, "page": format!("/p/{id}")})
        .to_string()
        .into_bytes()
}

/// The `page=/p/<id>` of every line of every write, per write.
fn ids_per_write(sink: &FakeSink) -> Vec<Vec<String>> {
    sink.requests()
        .iter()
        .map(|write| {
            let body = String::from_utf8(write.body.clone()).expect("UTF-8 body");
            body.lines()
                .map(|line| {
                    let start = line.find(",page=/p/").expect("page tag") + 9;
                    let rest = &line[start..];
                    rest[..rest.find(',').unwrap_or(rest.len())].to_string()
                })
                .collect()
        })
        .collect()
}

fn server_block(port: u16, host: &str, db: &str, endpoint_extra: &str) -> String {
    let write = write_location(&format!("http://influxdb/write?db={db}&precision=ns"), "5s");
    format!(
        r#"
server {{
    listen 127.0.0.1:{port};
    server_name {host};
    location = /collect {{
        analytics;
        {endpoint_extra}
    }}
{write}
}}
"#
    )
}

/// Sends `per_client` beacons from each of `clients` threads per site, all sites at once, and
/// returns how many were answered 204 per site (every other answer fails the test).
fn load(sites: &[(u16, &str)], clients: usize, per_client: usize) -> HashMap<String, usize> {
    let barrier = Arc::new(Barrier::new(sites.len() * clients));
    let mut threads = Vec::new();
    for &(port, host) in sites {
        for client in 0..clients {
            let (barrier, host) = (barrier.clone(), host.to_string());
            threads.push(thread::spawn(move || {
                barrier.wait();
                for i in 0..per_client {
                    let id = format!("{host}-{client}-{i}");
                    let response =
                        post_with_headers(port, "/collect", &host, &[], &beacon(&host, &id));
                    assert_eq!(response.status, 204, "{id}: {}", response.body_text());
                }
                (host, per_client)
            }));
        }
    }
    let mut answered = HashMap::new();
    for t in threads {
        let (host, n) = t.join().expect("client thread");
        *answered.entry(host).or_default() += n;
    }
    answered
}

#[test]
fn every_server_block_writes_only_to_its_own_database() {
    let influx = Influx::start();
    for db in ["a", "b", "c"] {
        influx.create_database(db);
    }
    let (port, other_port) = (free_port(), free_port());
    let http = format!(
        "upstream influxdb {{ server {}; keepalive 8; }}\n{}{}{}",
        influx.addr(),
        server_block(port, "a.example.com", "a", ""),
        server_block(port, "b.example.com", "b", ""),
        server_block(other_port, "c.example.com", "c", ""),
    );
    let opts = NginxOptions {
        master_process: true,
        worker_processes: 2,
        ..NginxOptions::default()
    };
    let nginx = Nginx::start_with(opts, &http);
    let sites = [
        (port, "a.example.com"),
        (port, "b.example.com"),
        (other_port, "c.example.com"),
    ];
    let answered = load(&sites, 6, 60);

    for (db, host) in [
        ("a", "a.example.com"),
        ("b", "b.example.com"),
        ("c", "c.example.com"),
    ] {
        let rows = influx.rows(
            db,
            "SELECT count(\"counter\") FROM \"pf_analytics\" GROUP BY \"domain\"",
        );
        let counts: HashMap<String, u64> = rows
            .iter()
            .map(|row| {
                let domain = row["domain"].as_str().unwrap_or_default().to_string();
                (domain, row["count"].as_u64().unwrap_or_default())
            })
            .collect();
        assert_eq!(
            counts,
            HashMap::from([(host.to_string(), answered[host] as u64)]),
            "database {db} holds exactly the points of {host}, every one answered 204"
        );
    }
    nginx.assert_no_crash_in_log();
}

/// nginx in front of the fake sink on `sink_port`: one server for www.example.com on `port`
/// with `server_extra` (directives and locations) and the write location to the sink.
fn sink_server(port: u16, sink_port: u16, server_extra: &str) -> String {
    format!(
        r#"
upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 8; }}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
{server_extra}
{}
}}
"#,
        write_location("http://sink/write?db=analytics&precision=ns", "5s")
    )
}

#[test]
fn the_write_mode_and_limits_of_each_location_are_kept_apart() {
    // Same server and write URI, two endpoints: one in `background` mode with batches of 2
    // lines, one in `wait` mode with the default limits. Neither takes the other's settings.
    let sink = FakeSink::start();
    let port = free_port();
    let http = sink_server(
        port,
        sink.port(),
        "    location = /collect { analytics; }
    location = /collect-bg {
        analytics;
        analytics_write_mode background;
        analytics_batch lines=2 delay=5s;
    }",
    );
    let nginx = Nginx::start(&http);
    sink.set_delay(Duration::from_millis(500));
    sink.push_response(500, "{\"error\":\"first write fails\"}");
    // The first write (a background beacon) fails, which must not fail a `wait` beacon.
    let bg = post(port, "/collect-bg", &beacon("www.example.com", "bg-0"));
    assert_eq!(bg.status, 204);
    assert_eq!(sink.wait_for_requests(1, WAIT).len(), 1);
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let path = if i % 2 == 0 {
                    "/collect"
                } else {
                    "/collect-bg"
                };
                let id = format!("{}-{i}", &path[1..]);
                (
                    id.clone(),
                    post(port, path, &beacon("www.example.com", &id)),
                )
            })
        })
        .collect();
    let answers: Vec<(String, Response)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (id, response) in &answers {
        assert_eq!(response.status, 204, "{id}");
    }
    thread::sleep(Duration::from_millis(1200));
    let writes = ids_per_write(&sink);
    let background = |id: &String| id.starts_with("bg") || id.starts_with("collect-bg");
    for write in &writes {
        let modes: HashSet<bool> = write.iter().map(background).collect();
        assert_eq!(
            modes.len(),
            1,
            "a write mixes wait and background beacons: {writes:?}"
        );
        if write.iter().all(background) {
            assert!(
                write.len() <= 2,
                "background batches hold 2 lines: {writes:?}"
            );
        }
    }
    let all: Vec<&String> = writes.iter().flatten().collect();
    assert_eq!(all.len(), 7, "every line once: {writes:?}");
    nginx.assert_no_crash_in_log();
}

/// nginx with an h2c (prior knowledge) listener in front of `sink`; the write location ignores
/// client aborts as the README asks, unless `ignore_abort` is false.
fn h2_conf_with(port: u16, sink_port: u16, endpoint_extra: &str, ignore_abort: bool) -> String {
    let conf = sink_server(
        port,
        sink_port,
        &format!(
            "    http2 on;
    location = /collect {{
        analytics;
        analytics_domains www.example.com;
        {endpoint_extra}
    }}"
        ),
    );
    match ignore_abort {
        true => conf,
        false => conf.replace("proxy_ignore_client_abort on;", ""),
    }
}

/// A runtime for the HTTP/2 client (the `h2` crate).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// An HTTP/2 connection (prior knowledge) to nginx on `port`, its connection task running.
async fn h2_connect(port: u16) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.expect("h2 ready")
}

/// POSTs the beacon of page `/p/<id>` on a stream of its own; returns its response and its
/// stream (to reset it).
async fn h2_beacon(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    port: u16,
    id: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    *client = client.clone().ready().await.expect("h2 ready");
    let request = http::Request::post(format!("http://www.example.com:{port}/collect"))
        .body(())
        .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("send");
    let body = beacon("www.example.com", id);
    stream
        .send_data(bytes::Bytes::from(body), true)
        .expect("body");
    (response, stream)
}

/// How a leader's stream is reset in [`leader_reset`].
#[derive(Clone, Copy, PartialEq)]
enum ResetWhen {
    /// While the write of its batch is on its way to the sink.
    DuringItsWrite,
    /// While its batch is still open, before the write starts.
    BeforeItsWrite,
}

/// One write occupies the sink; then a leader and 8 members gather in the next batch over
/// HTTP/2, and the leader's stream is reset at `when`. Returns the members' statuses and the
/// ids written, per write.
fn leader_reset(when: ResetWhen, ignore_abort: bool) -> (Vec<u16>, Vec<Vec<String>>, String) {
    let sink = FakeSink::start();
    let port = free_port();
    let conf = h2_conf_with(port, sink.port(), "analytics_batch delay=5s;", ignore_abort);
    let nginx = Nginx::start(&conf);
    sink.set_delay(Duration::from_millis(700));
    let first = thread::spawn(move || post(port, "/collect", &beacon("www.example.com", "first")));
    assert_eq!(sink.wait_for_requests(1, WAIT).len(), 1);

    let runtime = runtime();
    let statuses = runtime.block_on(async move {
        let mut client = h2_connect(port).await;
        let (leader_response, mut leader_stream) = h2_beacon(&mut client, port, "leader").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut members = Vec::new();
        for i in 0..8 {
            members.push(h2_beacon(&mut client, port, &format!("member-{i}")).await.0);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if when == ResetWhen::DuringItsWrite {
            // The first write ends after 700 ms; then the leader's batch goes to the sink.
            let deadline = tokio::time::Instant::now() + WAIT;
            while sink.requests().len() < 2 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                sink.requests().len(),
                2,
                "the leader's batch is being written"
            );
        }
        leader_stream.send_reset(h2::Reason::CANCEL);
        drop(leader_response);
        let mut statuses = Vec::new();
        for response in members {
            let response = tokio::time::timeout(WAIT, response)
                .await
                .expect("a member is answered in time")
                .expect("a member's response");
            statuses.push(response.status().as_u16());
        }
        (statuses, sink)
    });
    let (statuses, sink) = statuses;
    assert_eq!(first.join().unwrap().status, 204);
    thread::sleep(Duration::from_millis(300));
    nginx.assert_no_crash_in_log();
    (statuses, ids_per_write(&sink), nginx.error_log())
}

#[test]
fn a_leader_reset_during_its_write_leaves_every_member_answered_by_the_sink() {
    let written = leader_reset_answers_every_member(ResetWhen::DuringItsWrite, true);
    assert_eq!(
        written, 10,
        "first, leader and 8 members, each once, nothing twice"
    );
}

#[test]
fn a_leader_reset_before_its_write_hands_the_batch_to_a_member() {
    let written = leader_reset_answers_every_member(ResetWhen::BeforeItsWrite, true);
    assert_eq!(written, 10, "the leader's line written too, nothing twice");
}

#[test]
fn a_write_cancelled_with_its_leader_is_written_again_for_the_members() {
    // Without `proxy_ignore_client_abort on`, the reset cancels the write on its way: nginx
    // cannot know whether the sink stored it, so a member writes the chunk again (the same
    // lines with the same timestamps: InfluxDB keeps one point of each).
    let written = leader_reset_answers_every_member(ResetWhen::DuringItsWrite, false);
    assert!(
        written >= 10,
        "the chunk may be written twice: {written} lines"
    );
}

/// Runs [`leader_reset`] and checks that every member got 204, all 10 lines were written and
/// no failure was logged; returns how many lines were written in all (counting repeats).
fn leader_reset_answers_every_member(when: ResetWhen, ignore_abort: bool) -> usize {
    let (statuses, writes, log) = leader_reset(when, ignore_abort);
    assert_eq!(statuses, [204; 8], "{writes:?}\n{log}");
    let unique: HashSet<&String> = writes.iter().flatten().collect();
    assert_eq!(unique.len(), 10, "every line written: {writes:?}");
    assert!(!log.contains("not stored"), "{log}");
    writes.iter().map(Vec::len).sum()
}

#[test]
fn a_waiting_beacon_whose_stream_is_reset_is_still_written() {
    let sink = FakeSink::start();
    let port = free_port();
    let conf = h2_conf_with(port, sink.port(), "analytics_batch lines=2 delay=5s;", true);
    let nginx = Nginx::start(&conf);
    sink.set_delay(Duration::from_millis(600));
    let runtime = runtime();
    let sink = runtime.block_on(async move {
        let mut client = h2_connect(port).await;
        let (mut responses, mut streams) = (Vec::new(), Vec::new());
        // 4 writes of 2 lines in flight and a full open batch: the 11th beacon waits for room.
        for i in 0..11 {
            let (response, stream) = h2_beacon(&mut client, port, &format!("w-{i}")).await;
            responses.push(response);
            streams.push(stream);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        streams[10].send_reset(h2::Reason::CANCEL);
        for response in responses.into_iter().take(10) {
            let response = tokio::time::timeout(WAIT, response)
                .await
                .expect("answered in time")
                .expect("a response");
            assert_eq!(response.status().as_u16(), 204);
        }
        sink
    });
    let written = || -> HashSet<String> { ids_per_write(&sink).into_iter().flatten().collect() };
    assert!(
        common::wait_until(WAIT, || written().contains("w-10")),
        "the reset beacon's line is written: {:?}\n{}",
        written(),
        nginx.error_log()
    );
    assert_eq!(written().len(), 11);
    nginx.assert_no_crash_in_log();
}

/// nginx whose write location cannot reach its sink, under an inherited `error_page`.
fn error_page_conf(port: u16, dead_port: u16) -> String {
    format!(
        r#"
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    error_page 502 504 /50x.html;
    location = /50x.html {{ return 200 "ERROR-PAGE{}\n"; }}
    location = /collect {{ analytics; }}
    location = /collect-bg {{ analytics; analytics_write_mode background; }}
{}
}}
"#,
        "p".repeat(3000),
        write_location(&format!("http://127.0.0.1:{dead_port}/write?db=x"), "2s")
    )
}

#[test]
fn an_error_page_of_the_write_location_never_reaches_the_client() {
    let (port, dead_port) = (free_port(), free_port());
    let nginx = Nginx::start(&error_page_conf(port, dead_port));
    let wait = post(port, "/collect", &beacon("www.example.com", "wait"));
    assert_eq!(wait.status, 502);
    assert!(
        !wait.body_text().contains("ERROR-PAGE"),
        "{}",
        wait.body_text()
    );
    // Background mode: the 204 goes out first; nothing may follow it on the connection.
    let mut conn = common::Conn::open(port);
    let request = |id: &str, close: bool| {
        let body = beacon("www.example.com", id);
        let mut bytes = format!(
            "POST /collect-bg HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        bytes.extend(body);
        bytes
    };
    let first = conn.request(&request("bg-1", false));
    assert_eq!(first.status, 204);
    thread::sleep(Duration::from_millis(300));
    let second = conn.request(&request("bg-2", true));
    assert_eq!(
        second.status, 204,
        "the next answer on the connection is in sync"
    );
    assert!(!second.body_text().contains("ERROR-PAGE"));
    assert!(
        nginx.wait_for_log("no answer from the sink", WAIT),
        "{}",
        nginx.error_log()
    );
    nginx.assert_no_crash_in_log();
}

/// 40 beacons gather behind a first write; the sink answers every write with `status` and a
/// 64 KB body. Returns the answers (first one included) and the error log.
fn long_answers(status: u16) -> (Vec<Response>, String) {
    let sink = FakeSink::start();
    let port = free_port();
    let http = sink_server(port, sink.port(), "    location = /collect { analytics; }");
    let nginx = Nginx::start(&http);
    let long_body = format!("{{\"error\":\"{}\"}}", "x".repeat(64 * 1024));
    sink.set_response(status, &long_body);
    sink.set_delay(Duration::from_millis(300));
    let first = thread::spawn(move || post(port, "/collect", &beacon("www.example.com", "first")));
    assert_eq!(sink.wait_for_requests(1, WAIT).len(), 1);
    let barrier = Arc::new(Barrier::new(40));
    let threads: Vec<_> = (0..40)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                post(
                    port,
                    "/collect",
                    &beacon("www.example.com", &format!("m-{i}")),
                )
            })
        })
        .collect();
    let mut answers = vec![first.join().expect("first client")];
    answers.extend(threads.into_iter().map(|t| t.join().expect("client")));
    nginx.assert_no_crash_in_log();
    (answers, nginx.error_log())
}

#[test]
fn a_long_error_answer_fails_the_write_and_is_logged_truncated() {
    let (answers, log) = long_answers(500);
    for response in &answers {
        assert_eq!(response.status, 502, "every beacon gets an answer, 502");
    }
    let line = log
        .lines()
        .find(|l| l.contains("sink answered 500: {\"error\":\"xxx"))
        .unwrap_or_else(|| panic!("the sink's message is logged:\n{log}"));
    assert!(line.contains("...,"), "and marked as cut short: {line}");
    assert!(line.len() < 1000, "one short line: {} bytes", line.len());
}

#[test]
fn a_long_success_answer_is_a_stored_write() {
    for status in [200, 204] {
        let (answers, log) = long_answers(status);
        for response in &answers {
            assert_eq!(
                response.status, 204,
                "sink answered {status} with a long body"
            );
        }
        assert!(!log.contains("not stored"), "{log}");
    }
}

#[test]
fn subrequests_to_the_endpoint_are_refused() {
    let sink = FakeSink::start();
    let port = free_port();
    let http = sink_server(
        port,
        sink.port(),
        r#"    location = /collect { analytics; }
    location = /mirrored {
        mirror /collect;
        mirror_request_body on;
        return 204;
    }
    location = /page.html {
        ssi on;
        default_type text/html;
        return 200 'before<!--# include virtual="/collect" -->after';
    }"#,
    );
    let nginx = Nginx::start(&http);
    let mirrored = post(port, "/mirrored", &beacon("www.example.com", "mirrored"));
    assert_eq!(mirrored.status, 204);
    let page = common::request(port, "GET", "/page.html", "www.example.com", None);
    assert_eq!(page.status, 200);
    assert!(
        page.body_text().starts_with("before"),
        "{}",
        page.body_text()
    );
    assert!(nginx.wait_for_log("subrequest to the beacon endpoint refused", WAIT));
    // A beacon of its own still works, and nothing else was written.
    assert_eq!(
        post(port, "/collect", &beacon("www.example.com", "own")).status,
        204
    );
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        ids_per_write(&sink),
        [["own"]],
        "only the beacon of its own"
    );
    nginx.assert_no_crash_in_log();
}

#[test]
fn a_failed_write_of_a_leader_whose_stream_was_reset_is_logged_intact() {
    // The leader's request is freed while its write is on the way; its pool cleanup then reads
    // the sink's answer, which must still be intact.
    let sink = FakeSink::start();
    let port = free_port();
    let conf = h2_conf_with(port, sink.port(), "", true);
    let nginx = Nginx::start(&conf);
    let message = "the sink says: boom, and a little more so that it is long enough";
    sink.set_response(500, &format!("{{\"error\":\"{message}\"}}"));
    sink.set_delay(Duration::from_millis(800));
    let runtime = runtime();
    runtime.block_on(async move {
        let mut client = h2_connect(port).await;
        let (_response, mut stream) = h2_beacon(&mut client, port, "reset").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    assert!(
        nginx.wait_for_log("not stored", WAIT),
        "{}",
        nginx.error_log()
    );
    let log = nginx.error_log();
    let line = log
        .lines()
        .find(|l| l.contains("not stored"))
        .expect("the failure line");
    assert!(line.contains(message), "the sink's message, intact: {line}");
    nginx.assert_no_crash_in_log();
}
