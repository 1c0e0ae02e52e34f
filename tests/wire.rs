//! The beacon endpoint in a real nginx, writing to a fake sink that records every byte:
//! status codes, the exact line protocol on the wire, what never leaves nginx, body handling
//! and configuration errors.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    free_port, nginx_test_config, post, post_chunked, post_with_headers, request, Conn, FakeSink,
    Nginx, NginxOptions,
};

const WAIT: Duration = Duration::from_secs(5);

/// One server on `port` with the beacon endpoint at `/collect` and the internal write location
/// proxying to `sink`. `server_extra` and `endpoint_extra` are added to the server and the
/// endpoint location.
fn analytics_conf(port: u16, sink_port: u16, server_extra: &str, endpoint_extra: &str) -> String {
    let write_location =
        common::write_location("http://sink/write?db=analytics&precision=ns", "2s");
    format!(
        r#"
upstream sink {{
    server 127.0.0.1:{sink_port};
    keepalive 4;
}}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick,SearchTermIntercepted bentest;
    {server_extra}
    location = /collect {{
        analytics;
        {endpoint_extra}
    }}
{write_location}
}}
"#
    )
}

/// A running nginx whose endpoint writes to a fresh fake sink.
struct Setup {
    sink: FakeSink,
    nginx: Nginx,
    port: u16,
}

fn setup(server_extra: &str, endpoint_extra: &str) -> Setup {
    let sink = FakeSink::start();
    let port = free_port();
    let nginx = Nginx::start(&analytics_conf(
        port,
        sink.port(),
        server_extra,
        endpoint_extra,
    ));
    Setup { sink, nginx, port }
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/payloads/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Splits a line of line protocol into (series, fields, timestamp) at its unescaped spaces.
fn split_line(line: &str) -> (String, String, u64) {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ' ' if !in_quotes => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    assert_eq!(
        parts.len(),
        3,
        "line has series, fields, timestamp: {line:?}"
    );
    let timestamp = parts[2]
        .parse()
        .unwrap_or_else(|_| panic!("timestamp in {line:?}"));
    (parts[0].clone(), parts[1].clone(), timestamp)
}

/// The lines of every write the sink received, in order.
fn written_lines(sink: &FakeSink) -> Vec<String> {
    sink.requests()
        .iter()
        .flat_map(|req| {
            let body = String::from_utf8(req.body.clone()).expect("line protocol is UTF-8");
            assert!(
                body.ends_with('\n'),
                "every write ends with a newline: {body:?}"
            );
            body.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[test]
fn an_accepted_event_is_one_post_of_one_line_to_the_write_location() {
    let s = setup("", "");
    let before = now_ns();
    let response = post(s.port, "/collect", &fixture("event-socialclick.json"));
    assert_eq!(response.status, 204, "{}", response.body_text());
    assert!(response.body.is_empty());

    let writes = s.sink.wait_for_requests(1, WAIT);
    assert_eq!(writes.len(), 1, "exactly one write");
    let write = &writes[0];
    assert_eq!(write.method, "POST");
    assert_eq!(write.target, "/write?db=analytics&precision=ns");
    assert_eq!(
        write.header("content-length"),
        Some(write.body.len().to_string().as_str())
    );
    assert_eq!(write.header("transfer-encoding"), None);

    let body = String::from_utf8(write.body.clone()).unwrap();
    let (series, fields, timestamp) = split_line(body.trim_end_matches('\n'));
    assert_eq!(
        series,
        "pf_analytics_event,domain=www.example.com,event=socialclick,\
         page=/posts/blog/general/share-buttons.html,platform=Linux\\ x86_64,\
         timezone=-60,type=event"
    );
    assert_eq!(fields, r#"counter=1i,note="mastodon",sess="07ab-8022""#);
    assert!(
        timestamp >= before - 1_000_000 && timestamp <= now_ns() + 1_000_000,
        "the module stamps the point with the current time in ns: {timestamp}"
    );
}

#[test]
fn a_page_view_keeps_the_path_and_only_the_referrers_host() {
    let s = setup("", "");
    let response = post(s.port, "/collect", &fixture("pageview.json"));
    assert_eq!(response.status, 204, "{}", response.body_text());
    s.sink.wait_for_requests(1, WAIT);
    let lines = written_lines(&s.sink);
    assert_eq!(lines.len(), 1);
    let (series, fields, _) = split_line(&lines[0]);
    assert_eq!(
        series,
        "pf_analytics,domain=www.example.com,page=/posts/hello.html,platform=Win32,\
         referrer=news.example.org,timezone=330,type=pageview"
    );
    assert_eq!(
        fields,
        r#"counter=1i,load_time=812.5,pages_viewed=3i,sess="5e5e-0001""#
    );
}

#[test]
fn client_headers_and_addresses_never_reach_the_sink() {
    let s = setup("", "");
    let response = post_with_headers(
        s.port,
        "/collect?utm_source=secret-query",
        "www.example.com",
        &[
            ("Cookie", "session=SECRET-COOKIE"),
            ("User-Agent", "Mozilla/5.0 SECRET-AGENT"),
            ("Referer", "https://www.example.com/SECRET-PATH?x=1"),
            ("X-Forwarded-For", "203.0.113.77"),
            ("Authorization", "Basic SECRET-AUTH"),
        ],
        &fixture("pageview.json"),
    );
    assert_eq!(response.status, 204, "{}", response.body_text());
    let writes = s.sink.wait_for_requests(1, WAIT);
    assert_eq!(writes.len(), 1);
    let raw = String::from_utf8_lossy(&writes[0].raw).to_string();
    for secret in [
        "SECRET-COOKIE",
        "SECRET-AGENT",
        "SECRET-PATH",
        "secret-query",
        "203.0.113.77",
        "127.0.0.1:",
        "SECRET-AUTH",
        "item?id=123",
        "utm_source",
    ] {
        assert!(
            !raw.contains(secret),
            "{secret:?} leaked to the sink:\n{raw}"
        );
    }
    for header in [
        "cookie",
        "user-agent",
        "referer",
        "x-forwarded-for",
        "authorization",
    ] {
        assert_eq!(writes[0].header(header), None, "{header} sent to the sink");
    }
}

#[test]
fn each_kind_of_bad_beacon_gets_its_status_and_writes_nothing() {
    let s = setup("", "");
    let long_page = format!(
        r#"{{"domain":"www.example.com","page":"/{}"}}"#,
        "a".repeat(1024)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not JSON", fixture("bad-not-json.json"), 400),
        ("wrong types", fixture("bad-wrong-types.json"), 400),
        ("empty body", b"".to_vec(), 400),
        (
            "array instead of object",
            br#"["www.example.com","/a"]"#.to_vec(),
            400,
        ),
        (
            "missing page",
            br#"{"domain":"www.example.com"}"#.to_vec(),
            400,
        ),
        ("page too long", long_page.into_bytes(), 400),
        (
            "timezone out of range",
            br#"{"domain":"www.example.com","page":"/","timezone":841}"#.to_vec(),
            400,
        ),
        (
            "duplicate key",
            br#"{"domain":"www.example.com","page":"/","page":"/b"}"#.to_vec(),
            400,
        ),
        (
            "invalid UTF-8",
            b"{\"domain\":\"www.example.com\",\"page\":\"/\xff\"}".to_vec(),
            400,
        ),
        (
            "event not permitted",
            br#"{"domain":"www.example.com","page":"/","event":"signup"}"#.to_vec(),
            422,
        ),
        (
            "domain not accepted",
            br#"{"domain":"evil.example.net","page":"/"}"#.to_vec(),
            422,
        ),
    ];
    for (what, body, expected) in cases {
        let response = post(s.port, "/collect", &body);
        assert_eq!(
            response.status,
            expected,
            "{what}: {}",
            response.body_text()
        );
        assert!(
            !response.body_text().is_empty(),
            "{what}: the answer says why"
        );
        if expected == 422 {
            assert_eq!(response.reason, "Unprocessable Content", "{what}");
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.sink.requests().is_empty(),
        "nothing written for refused beacons"
    );

    let log = s.nginx.error_log();
    assert_eq!(
        log.matches("analytics: beacon rejected (400)").count(),
        9,
        "{log}"
    );
    assert_eq!(
        log.matches("analytics: beacon rejected (422)").count(),
        2,
        "{log}"
    );
    assert!(log.contains("event \"signup\" is not permitted"), "{log}");
    assert!(
        !log.contains("www.example.com\",\"page"),
        "raw bodies are never logged:\n{log}"
    );
}

#[test]
fn permitted_events_match_case_insensitively_and_are_stored_lowercased() {
    let s = setup("", "");
    for name in ["SocialClick", "searchtermintercepted", "BENTEST"] {
        let body = format!(r#"{{"domain":"www.example.com","page":"/","event":"{name}"}}"#);
        let response = post(s.port, "/collect", body.as_bytes());
        assert_eq!(response.status, 204, "{name}: {}", response.body_text());
    }
    s.sink.wait_for_requests(3, WAIT);
    let names: Vec<String> = written_lines(&s.sink)
        .iter()
        .map(|line| {
            let (series, _, _) = split_line(line);
            series
                .split(',')
                .find_map(|tag| tag.strip_prefix("event="))
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["socialclick", "searchtermintercepted", "bentest"]);
}

#[test]
fn other_methods_get_405_with_allow() {
    let s = setup("", "");
    for method in ["GET", "PUT", "DELETE"] {
        let response = request(s.port, method, "/collect", "www.example.com", None);
        assert_eq!(response.status, 405, "{method}");
        assert_eq!(response.header("allow"), Some("POST"), "{method}");
    }
    assert!(s.sink.requests().is_empty());
}

#[test]
fn bodies_over_the_limit_get_413_whether_declared_or_chunked() {
    let s = setup("", "analytics_max_body_size 200;");
    let padded = |len: usize| {
        let mut body = br#"{"domain":"www.example.com","page":"/"}"#.to_vec();
        body.resize(len, b' ');
        body
    };
    let at_limit = post(s.port, "/collect", &padded(200));
    assert_eq!(
        at_limit.status, 204,
        "a body of exactly the limit is accepted"
    );
    let over = post(s.port, "/collect", &padded(201));
    assert_eq!(over.status, 413, "one byte over the limit");
    let body = padded(300);
    let chunked = post_chunked(s.port, "/collect", &[&body[..150], &body[150..]]);
    assert_eq!(chunked.status, 413, "chunked body over the limit");
    s.sink.wait_for_requests(1, WAIT);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        s.sink.requests().len(),
        1,
        "only the body at the limit was written"
    );
}

#[test]
fn chunked_bodies_and_bodies_in_many_packets_are_read_whole() {
    let s = setup("", "");
    let body = fixture("event-socialclick.json");
    let pieces: Vec<&[u8]> = body.chunks(7).collect();
    let response = post_chunked(s.port, "/collect", &pieces);
    assert_eq!(response.status, 204, "chunked: {}", response.body_text());

    let mut conn = Conn::open(s.port);
    let head = format!(
        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.send(head.as_bytes());
    for piece in body.chunks(10) {
        std::thread::sleep(Duration::from_millis(15));
        conn.send(piece);
    }
    let response = conn.read_response();
    assert_eq!(response.status, 204, "slow body: {}", response.body_text());

    s.sink.wait_for_requests(2, WAIT);
    let lines = written_lines(&s.sink);
    assert_eq!(lines.len(), 2);
    let (first, _, _) = split_line(&lines[0]);
    let (second, _, _) = split_line(&lines[1]);
    assert_eq!(first, second, "both arrive as the same point");
    assert!(first.contains("event=socialclick"));
}

#[test]
fn a_body_nginx_spilled_to_a_temp_file_is_read_from_the_file() {
    let s = setup(
        "",
        "client_body_buffer_size 64; client_body_in_file_only on;",
    );
    let response = post(s.port, "/collect", &fixture("pageview.json"));
    assert_eq!(response.status, 204, "{}", response.body_text());
    s.sink.wait_for_requests(1, WAIT);
    let lines = written_lines(&s.sink);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("pf_analytics,domain=www.example.com,page=/posts/hello.html,"));
}

#[test]
fn write_off_validates_and_answers_without_writing() {
    let s = setup("", "analytics_write off;");
    assert_eq!(
        post(s.port, "/collect", &fixture("event-socialclick.json")).status,
        204
    );
    assert_eq!(
        post(s.port, "/collect", &fixture("bad-wrong-types.json")).status,
        400
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.sink.requests().is_empty());
}

#[test]
fn in_wait_mode_a_failed_write_is_502_and_the_connection_stays_usable() {
    let s = setup("", "");
    for status in [500, 503, 400, 401, 413] {
        s.sink.set_response(status, r#"{"error":"nope"}"#);
        let mut conn = Conn::open(s.port);
        let beacon = fixture("event-socialclick.json");
        let req = format!(
            "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n",
            beacon.len()
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(&beacon);
        let failed = conn.request(&bytes);
        assert_eq!(failed.status, 502, "sink answered {status}");
        assert!(
            !String::from_utf8_lossy(&failed.body).contains("nope"),
            "the sink's answer is not passed to the client"
        );
        s.sink.set_response(204, "");
        let ok = conn.request(&bytes);
        assert_eq!(
            ok.status, 204,
            "same connection after a failed write (sink was {status})"
        );
    }
    let log = s.nginx.error_log();
    assert!(log.contains("analytics: write to \"/_analytics/write\" failed: sink answered 503"));
}

#[test]
fn in_wait_mode_an_unreachable_sink_is_502() {
    let port = free_port();
    let dead = free_port();
    let nginx = Nginx::start(&analytics_conf(port, dead, "", ""));
    let response = post(port, "/collect", &fixture("event-socialclick.json"));
    assert_eq!(response.status, 502);
    assert!(nginx
        .error_log()
        .contains("analytics: write to \"/_analytics/write\" failed"));
}

#[test]
fn in_background_mode_the_answer_is_204_and_failures_are_logged() {
    let s = setup("", "analytics_write_mode background;");
    assert_eq!(
        post(s.port, "/collect", &fixture("event-socialclick.json")).status,
        204
    );
    s.sink.wait_for_requests(1, WAIT);
    s.sink.set_response(500, "{}");
    assert_eq!(
        post(s.port, "/collect", &fixture("event-socialclick.json")).status,
        204
    );
    s.sink.wait_for_requests(2, WAIT);
    assert!(
        s.nginx.wait_for_log("failed: sink answered 500", WAIT),
        "{}",
        s.nginx.error_log()
    );
}

#[test]
fn a_thousand_identical_beacons_get_a_thousand_distinct_timestamps() {
    let s = setup("", "");
    let beacon = fixture("event-socialclick.json");
    let mut conn = Conn::open(s.port);
    let head = format!(
        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n",
        beacon.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(&beacon);
    for i in 0..1000 {
        let response = conn.request(&req);
        assert_eq!(response.status, 204, "beacon {i}");
    }
    let lines = written_lines(&s.sink);
    assert_eq!(lines.len(), 1000);
    let stamps: HashSet<u64> = lines.iter().map(|line| split_line(line).2).collect();
    assert_eq!(
        stamps.len(),
        1000,
        "identical beacons never share a timestamp"
    );
}

#[test]
fn timestamps_stay_unique_across_worker_processes() {
    let sink = FakeSink::start();
    let port = free_port();
    let opts = NginxOptions {
        master_process: true,
        worker_processes: 2,
        ..Default::default()
    };
    let _nginx = Nginx::start_with(opts, &analytics_conf(port, sink.port(), "", ""));
    let beacon = fixture("event-socialclick.json");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let beacon = beacon.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    assert_eq!(post(port, "/collect", &beacon).status, 204);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let lines = written_lines(&sink);
    assert_eq!(lines.len(), 400);
    let stamps: HashSet<u64> = lines.iter().map(|line| split_line(line).2).collect();
    assert_eq!(stamps.len(), 400, "no two points share a timestamp");
}

#[test]
fn domains_default_to_the_requests_own_host_and_can_be_listed() {
    let s = setup("", "");
    let beacon = br#"{"domain":"www.example.com","page":"/"}"#;
    let other_host = post_with_headers(s.port, "/collect", "blog.example.com:8080", &[], beacon);
    assert_eq!(
        other_host.status, 422,
        "default: the beacon's domain must be the Host"
    );
    let same_host = post_with_headers(s.port, "/collect", "WWW.Example.com:8080", &[], beacon);
    assert_eq!(
        same_host.status, 204,
        "host compared case-insensitively, without port"
    );

    let listed = setup("analytics_domains www.example.com *.example.org;", "");
    for (domain, expected) in [
        ("www.example.com", 204),
        ("blog.example.org", 204),
        ("a.b.example.org", 204),
        ("example.org", 422),
        ("evil-example.org", 422),
        ("example.com", 422),
    ] {
        let body = format!(r#"{{"domain":"{domain}","page":"/"}}"#);
        let response = post(listed.port, "/collect", body.as_bytes());
        assert_eq!(response.status, expected, "{domain}");
    }
}

#[test]
fn settings_are_inherited_and_an_inner_level_overrides_an_outer_one() {
    let sink = FakeSink::start();
    let port = free_port();
    let conf = format!(
        r#"
permitted_events outer;
analytics_write off;
analytics_measurements web_views web_events;
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    location = /inherits {{ analytics; }}
    location = /overrides {{
        analytics;
        permitted_events inner;
        analytics_write /_analytics/write;
    }}
    location = /_analytics/write {{
        internal;
        proxy_pass http://127.0.0.1:{sink}/write;
        proxy_pass_request_headers off;
    }}
}}
"#,
        sink = sink.port()
    );
    let _nginx = Nginx::start(&conf);
    let event =
        |name: &str| format!(r#"{{"domain":"www.example.com","page":"/","event":"{name}"}}"#);
    assert_eq!(
        post(port, "/inherits", event("outer").as_bytes()).status,
        204
    );
    assert_eq!(
        post(port, "/inherits", event("inner").as_bytes()).status,
        422
    );
    assert_eq!(
        post(port, "/overrides", event("inner").as_bytes()).status,
        204
    );
    assert_eq!(
        post(port, "/overrides", event("outer").as_bytes()).status,
        422
    );
    let writes = sink.wait_for_requests(1, WAIT);
    assert_eq!(writes.len(), 1, "only /overrides writes");
    let line = String::from_utf8(writes[0].body.clone()).unwrap();
    assert!(
        line.starts_with("web_events,domain=www.example.com,event=inner,"),
        "{line}"
    );
}

#[test]
fn configuration_errors_name_the_directive_file_and_line() {
    let cases = [
        (
            "permitted_events good,Bad!Name;",
            r#""permitted_events" directive invalid event name"#,
        ),
        (
            "permitted_events a; permitted_events b;",
            r#""permitted_events" directive is duplicate"#,
        ),
        (
            "analytics_write http://influx/write;",
            r#""analytics_write" directive takes "off" or a URI"#,
        ),
        (
            "analytics_write_mode later;",
            r#""analytics_write_mode" directive takes "wait" or "background""#,
        ),
        (
            "analytics_measurements same same;",
            r#""analytics_measurements" directive needs two different"#,
        ),
        (
            "analytics_measurements _internal events;",
            r#""analytics_measurements" directive"#,
        ),
        (
            "analytics_domains exa*mple.com;",
            r#""analytics_domains" directive"#,
        ),
        (
            "analytics_session tags;",
            r#""analytics_session" directive takes "field", "tag" or "off""#,
        ),
        (
            "analytics_session field; analytics_session off;",
            r#""analytics_session" directive is duplicate"#,
        ),
        (
            "analytics_max_body_size 0;",
            r#""analytics_max_body_size" directive takes a size"#,
        ),
        (
            "analytics_max_body_size 2m;",
            r#""analytics_max_body_size" directive takes a size"#,
        ),
    ];
    for (directive, expected) in cases {
        let conf = format!(
            "{directive}\nserver {{ listen 127.0.0.1:{}; }}\n",
            free_port()
        );
        let (ok, output) = nginx_test_config(&conf);
        assert!(!ok, "{directive} must be refused");
        assert!(output.contains("[emerg]"), "{directive}: {output}");
        assert!(output.contains(expected), "{directive}: {output}");
        assert!(
            output.contains("nginx.conf:"),
            "{directive}: file and line: {output}"
        );
    }
    let (ok, output) = nginx_test_config(&format!(
        "server {{ listen 127.0.0.1:{}; analytics; }}",
        free_port()
    ));
    assert!(
        !ok && output.contains("\"analytics\" directive is not allowed here"),
        "{output}"
    );
}

#[test]
fn the_agent_is_served_from_memory_with_an_etag_and_revalidates_with_304() {
    let port = free_port();
    let _nginx = Nginx::start(&format!(
        "server {{ listen 127.0.0.1:{port}; location = /analytics/agent.js {{ analytics_agent; }} }}"
    ));
    let agent = std::fs::read(format!("{}/agent/analytics.js", env!("CARGO_MANIFEST_DIR")))
        .expect("agent source");

    let response = request(port, "GET", "/analytics/agent.js", "www.example.com", None);
    assert_eq!(response.status, 200);
    assert_eq!(response.body, agent, "the agent is served byte for byte");
    assert_eq!(
        response.header("content-type"),
        Some("application/javascript; charset=utf-8")
    );
    assert_eq!(
        response.header("cache-control"),
        Some("public, max-age=3600")
    );
    let etag = response.header("etag").expect("ETag").to_string();

    let mut conn = Conn::open(port);
    let revalidate = format!(
        "GET /analytics/agent.js HTTP/1.1\r\nHost: www.example.com\r\nIf-None-Match: {etag}\r\n\r\n"
    );
    let not_modified = conn.request(revalidate.as_bytes());
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());

    let head = request(port, "HEAD", "/analytics/agent.js", "www.example.com", None);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(agent.len().to_string().as_str())
    );

    let post = request(
        port,
        "POST",
        "/analytics/agent.js",
        "www.example.com",
        Some(b"x"),
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}
