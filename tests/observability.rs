//! What admins see and control around the endpoint: the `$analytics_*` log variables, CORS for a
//! collector on another origin, and bots dropped without a hint.

mod common;

use std::time::Duration;

use common::{free_port, post, post_with_headers, request, Conn, FakeSink, Nginx};

const WAIT: Duration = Duration::from_secs(5);

fn start(sink: &FakeSink, server_extra: &str) -> (Nginx, u16) {
    let port = free_port();
    let conf = format!(
        r#"
log_format beacons '$request_method $status $analytics_status "$analytics_reason" $analytics_event';
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick;
    {server_extra}
    location = /collect {{
        analytics;
        access_log logs/beacons.log beacons;
        client_body_timeout 1s;
    }}
    location = /other {{
        return 204;
        access_log logs/beacons.log beacons;
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
    (Nginx::start(&conf), port)
}

fn beacons_log(nginx: &Nginx) -> Vec<String> {
    let path = nginx.prefix().join("logs/beacons.log");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn log_variables_say_what_happened_to_each_beacon() {
    let sink = FakeSink::start();
    let (nginx, port) = start(&sink, "");
    let event = |name: &str| {
        format!(r#"{{"domain":"www.example.com","page":"/","event":"{name}"}}"#).into_bytes()
    };
    post(port, "/collect", &event("SocialClick"));
    post(port, "/collect", &event("NewsletterSignup"));
    post(
        port,
        "/collect",
        br#"{"domain":"www.example.com","page":7}"#,
    );
    post(
        port,
        "/collect",
        br#"{"domain":"elsewhere.example","page":"/"}"#,
    );
    request(port, "GET", "/collect", "www.example.com", None);
    request(port, "GET", "/other", "www.example.com", None);

    // A body that never arrives: headers promise 100 bytes, then the client stalls.
    let mut stalled = Conn::open(port);
    stalled
        .send(b"POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 100\r\n\r\n{");
    assert!(
        stalled.is_closed_by_peer(Duration::from_secs(5)),
        "nginx gives up after 1 s"
    );

    assert!(common::wait_until(WAIT, || beacons_log(&nginx).len() == 7));
    assert_eq!(
        beacons_log(&nginx),
        [
            r#"POST 204 accepted "-" socialclick"#,
            r#"POST 422 event_not_permitted "event \x22newslettersignup\x22 is not permitted" newslettersignup"#,
            r#"POST 400 invalid "`page` must be a string" -"#,
            r#"POST 422 domain_not_accepted "domain \x22elsewhere.example\x22 is not accepted" -"#,
            r#"GET 405 method_not_allowed "only POST is allowed" -"#,
            r#"GET 204 - "-" -"#,
            r#"POST 408 incomplete "-" -"#,
        ]
    );
}

#[test]
fn without_cors_origins_no_cors_headers_are_sent_and_preflights_are_refused() {
    let sink = FakeSink::start();
    let (_nginx, port) = start(&sink, "");
    let origin = [("Origin", "https://other.example.org")];
    let beacon = br#"{"domain":"www.example.com","page":"/"}"#;
    let response = post_with_headers(port, "/collect", "www.example.com", &origin, beacon);
    assert_eq!(response.status, 204);
    assert_eq!(response.header("access-control-allow-origin"), None);
    let preflight = options(port, "https://other.example.org");
    assert_eq!(preflight.status, 405);
    assert_eq!(preflight.header("access-control-allow-origin"), None);
}

fn options(port: u16, origin: &str) -> common::Response {
    let mut conn = Conn::open(port);
    let req = format!(
        "OPTIONS /collect HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    );
    conn.request(req.as_bytes())
}

#[test]
fn listed_origins_get_preflights_answered_and_their_origin_echoed() {
    let sink = FakeSink::start();
    let (_nginx, port) = start(
        &sink,
        "analytics_cors_origins https://blog.example.org http://localhost:8080;",
    );
    let preflight = options(port, "https://blog.example.org");
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://blog.example.org")
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("POST")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("Content-Type")
    );
    assert_eq!(preflight.header("vary"), Some("Origin"));

    let refused = options(port, "https://evil.example.net");
    assert_eq!(refused.status, 405);
    assert_eq!(refused.header("access-control-allow-origin"), None);

    let beacon = br#"{"domain":"www.example.com","page":"/"}"#;
    for (origin, echoed) in [
        ("https://blog.example.org", Some("https://blog.example.org")),
        ("http://localhost:8080", Some("http://localhost:8080")),
        ("https://evil.example.net", None),
    ] {
        let headers = [("Origin", origin)];
        let response = post_with_headers(port, "/collect", "www.example.com", &headers, beacon);
        assert_eq!(response.status, 204, "{origin}");
        assert_eq!(
            response.header("access-control-allow-origin"),
            echoed,
            "{origin}"
        );
    }
    let bad = post_with_headers(
        port,
        "/collect",
        "www.example.com",
        &[("Origin", "https://blog.example.org")],
        b"{",
    );
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.header("access-control-allow-origin"),
        Some("https://blog.example.org"),
        "the agent can read refusals too"
    );
}

#[test]
fn bots_get_the_same_204_and_nothing_is_written() {
    let sink = FakeSink::start();
    let (nginx, port) = start(&sink, "");
    let beacon = br#"{"domain":"www.example.com","page":"/"}"#;
    for ua in [
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0 Safari/537.36",
        "curl/7.88.1",
    ] {
        let headers = [("User-Agent", ua)];
        let response = post_with_headers(port, "/collect", "www.example.com", &headers, beacon);
        assert_eq!(response.status, 204, "{ua}");
        assert!(response.body.is_empty());
    }
    let human = [(
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    )];
    assert_eq!(
        post_with_headers(port, "/collect", "www.example.com", &human, beacon).status,
        204
    );
    let writes = sink.wait_for_requests(1, WAIT);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sink.requests().len(),
        1,
        "only the person's beacon is written"
    );
    assert!(
        !String::from_utf8_lossy(&writes[0].raw).contains("Firefox"),
        "UA never stored"
    );
    let statuses: Vec<String> = beacons_log(&nginx)
        .iter()
        .map(|line| line.split(' ').nth(2).unwrap_or("").to_string())
        .collect();
    assert_eq!(statuses, ["bot", "bot", "bot", "accepted"]);
}

#[test]
fn bot_dropping_can_be_turned_off() {
    let sink = FakeSink::start();
    let (_nginx, port) = start(&sink, "analytics_drop_bots off;");
    let headers = [("User-Agent", "curl/7.88.1")];
    let beacon = br#"{"domain":"www.example.com","page":"/"}"#;
    assert_eq!(
        post_with_headers(port, "/collect", "www.example.com", &headers, beacon).status,
        204
    );
    assert_eq!(sink.wait_for_requests(1, WAIT).len(), 1);
}

/// Every fake sink audits what it received when it is dropped (tests/common/privacy.rs); this
/// proves the audit itself catches what it is there to catch.
#[test]
fn the_privacy_audit_catches_visitor_data() {
    let write = |headers: &[(&str, &str)], body: &str| common::CapturedRequest {
        method: "POST".into(),
        target: "/write?db=analytics".into(),
        version: "HTTP/1.1".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
        raw: format!(
            "POST /write HTTP/1.1\r\n{}\r\n{body}",
            headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect::<String>()
        )
        .into_bytes(),
        conn_id: 0,
    };
    let clean_line =
        "pf_analytics,domain=a.example,page=/x,referrer=news.example.org counter=1i 1\n";
    let host = [("Host", "127.0.0.1:8086"), ("Content-Length", "80")];
    assert!(common::privacy::violations(&write(&host, clean_line)).is_empty());
    for (headers, body) in [
        (vec![("Cookie", "session=1")], clean_line),
        (vec![("User-Agent", "Mozilla/5.0")], clean_line),
        (vec![("X-Real-IP", "127.0.0.1")], clean_line),
        (
            vec![],
            "pf_analytics,domain=a.example,page=/x?utm_source=feed counter=1i 1\n",
        ),
        (
            vec![],
            "pf_analytics,domain=a.example,page=/x,referrer=news.example.org/item counter=1i 1\n",
        ),
    ] {
        let found = common::privacy::violations(&write(&headers, body));
        assert!(!found.is_empty(), "{headers:?} {body:?}");
    }
}
