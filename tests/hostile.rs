//! Hostile input against a real nginx (master + one worker) with the module, writing to a fake
//! sink: one table of malformed bodies, hostile framing and line-protocol injection attempts.
//! Every case has a defined status; refused ones write nothing; accepted ones write exactly one
//! point whose values are what the README says InfluxDB stores; the worker never dies.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::points::{sink_points, stored_string_field, stored_tag, FieldValue, Point};
use common::{free_port, Conn, FakeSink, Nginx, NginxOptions};

/// `analytics_max_body_size` of the endpoints.
const MAX_BODY: usize = 4096;
/// Longest wait for an accepted beacon's point to reach the sink.
const POINT_WAIT: Duration = Duration::from_secs(5);
const HOST: &str = "www.example.com";

fn conf(port: u16, sink_port: u16) -> String {
    let e64 = "e".repeat(64);
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
    server_name {HOST};
    permitted_events socialclick {e64};
    analytics_domains .example.com;
    location = /collect {{
        analytics;
        analytics_max_body_size {MAX_BODY};
        client_body_timeout 1s;
    }}
    location = /collect-big {{
        analytics;
        analytics_max_body_size 64k;
    }}
    location = /collect-file {{
        analytics;
        analytics_max_body_size {MAX_BODY};
        client_body_buffer_size 64;
        client_body_in_file_only on;
    }}
{write_location}
}}
"#
    )
}

/// How a case is sent.
enum How {
    /// `POST /collect` with Content-Length.
    Body(Vec<u8>),
    /// `POST /collect-big` (analytics_max_body_size 64k) with Content-Length.
    Big(Vec<u8>),
    /// `POST /collect-file` (body always written to a temp file) with Content-Length.
    File(Vec<u8>),
    /// `POST /collect` with `Transfer-Encoding: chunked`, one chunk per element.
    Chunked(Vec<Vec<u8>>),
    /// These exact request bytes.
    Raw(Vec<u8>),
    /// Request head plus `sent` of `declared` body bytes, then nothing: the answer must come
    /// from `client_body_timeout` (1 s): a 408 or a closed connection.
    Stall { declared: usize, sent: usize },
    /// Request head plus part of the body, then the client closes the connection.
    Disconnect(Vec<u8>),
}

/// The point an accepted case must write.
struct Expected {
    measurement: &'static str,
    tags: Vec<(String, String)>,
    fields: Vec<(String, FieldValue)>,
}

struct Case {
    name: String,
    how: How,
    /// Expected status; 0 means "408 or the connection closed without an answer".
    status: u16,
    point: Option<Expected>,
}

fn body_case(name: impl Into<String>, body: impl Into<Vec<u8>>, status: u16) -> Case {
    Case {
        name: name.into(),
        how: How::Body(body.into()),
        status,
        point: None,
    }
}

fn accepted(name: impl Into<String>, body: &Value, point: Expected) -> Case {
    Case {
        name: name.into(),
        how: How::Body(body.to_string().into_bytes()),
        status: 204,
        point: Some(point),
    }
}

fn head(path: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: text/plain;charset=UTF-8\r\n\
         {extra}Connection: close\r\n\r\n"
    )
}

fn with_length(path: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = head(path, &format!("Content-Length: {}\r\n", body.len())).into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn chunked(chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = head("/collect", "Transfer-Encoding: chunked\r\n").into_bytes();
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

/// Sends a case; returns the status, or 0 when the connection closed without an answer.
fn send(port: u16, how: &How) -> u16 {
    match how {
        How::Body(body) => {
            Conn::open(port)
                .request(&with_length("/collect", body))
                .status
        }
        How::Big(body) => {
            Conn::open(port)
                .request(&with_length("/collect-big", body))
                .status
        }
        How::File(body) => {
            Conn::open(port)
                .request(&with_length("/collect-file", body))
                .status
        }
        How::Chunked(chunks) => Conn::open(port).request(&chunked(chunks)).status,
        How::Raw(bytes) => Conn::open(port).request(bytes).status,
        How::Stall { declared, sent } => {
            let mut conn = Conn::open(port);
            let mut bytes =
                head("/collect", &format!("Content-Length: {declared}\r\n")).into_bytes();
            bytes.extend(std::iter::repeat_n(b' ', *sent));
            conn.send(&bytes);
            let start = Instant::now();
            // Either a response (408) arrives or the connection is closed.
            if conn.is_closed_by_peer(Duration::from_secs(5)) {
                let waited = start.elapsed();
                assert!(
                    waited >= Duration::from_millis(800),
                    "closed before client_body_timeout (1s): {waited:?}"
                );
                0
            } else {
                let status = conn.read_response().status;
                assert!(start.elapsed() < Duration::from_secs(5));
                status
            }
        }
        How::Disconnect(partial) => {
            let mut conn = Conn::open(port);
            conn.send(partial);
            std::thread::sleep(Duration::from_millis(50));
            drop(conn);
            // Give the worker a moment to notice; the next case checks it still serves.
            std::thread::sleep(Duration::from_millis(50));
            0
        }
    }
}

fn event_base() -> Value {
    json!({
        "domain": HOST, "page": "/p", "platform": "P", "sess_id": "S",
        "event": "socialclick", "note": "N"
    })
}

fn view_base() -> Value {
    json!({"domain": HOST, "page": "/p", "platform": "P", "sess_id": "S"})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

/// Tags in written order; absent values and values empty after sanitizing are left out.
fn tags(pairs: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .filter_map(|(k, v)| {
            let v = stored_tag(v.as_ref()?);
            (!v.is_empty()).then(|| (k.to_string(), v))
        })
        .collect()
}

/// The `sess` string field (the default `analytics_session field`): left out when the session id
/// is absent or empty after the string-field rules.
fn sess_field(sess: Option<&str>) -> Option<(String, FieldValue)> {
    let stored = stored_string_field(sess?);
    (!stored.is_empty()).then(|| ("sess".to_string(), FieldValue::Str(stored)))
}

fn page_tag(page: &str) -> String {
    page.split(['?', '#']).next().unwrap().to_string()
}

/// The point for an event beacon (fields as sent; `None` = key absent).
fn event_point(
    event: &str,
    page: &str,
    platform: Option<&str>,
    sess: Option<&str>,
    note: Option<&str>,
) -> Expected {
    Expected {
        measurement: "pf_analytics_event",
        tags: tags(&[
            ("domain", Some(HOST)),
            ("event", Some(event)),
            ("page", Some(&page_tag(page))),
            ("platform", platform),
            ("type", Some("event")),
        ]),
        fields: [
            ("counter".into(), FieldValue::Raw("1i".into())),
            (
                "note".into(),
                FieldValue::Str(stored_string_field(note.unwrap_or(""))),
            ),
        ]
        .into_iter()
        .chain(sess_field(sess))
        .collect(),
    }
}

fn view_point(
    page: &str,
    platform: Option<&str>,
    referrer_host: Option<&str>,
    sess: Option<&str>,
) -> Expected {
    Expected {
        measurement: "pf_analytics",
        tags: tags(&[
            ("domain", Some(HOST)),
            ("page", Some(&page_tag(page))),
            ("platform", platform),
            ("referrer", referrer_host),
            ("type", Some("pageview")),
        ]),
        fields: [("counter".into(), FieldValue::Raw("1i".into()))]
            .into_iter()
            .chain(sess_field(sess))
            .collect(),
    }
}

fn base_event_point() -> Expected {
    event_point("socialclick", "/p", Some("P"), Some("S"), Some("N"))
}

fn base_view_point() -> Expected {
    view_point("/p", Some("P"), None, Some("S"))
}

/// Valid bodies are built with serde_json; malformed ones by hand.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let valid_event = event_base().to_string();

    // --- not JSON, truncated, trailing data ---
    for (name, body) in [
        ("not JSON: text", "hello"),
        ("not JSON: xml", "<beacon domain=\"www.example.com\"/>"),
        ("not JSON: form", "domain=www.example.com&page=/"),
        (
            "not JSON: single quotes",
            "{'domain':'www.example.com','page':'/'}",
        ),
        (
            "not JSON: bare keys",
            "{domain:\"www.example.com\",page:\"/\"}",
        ),
        (
            "not JSON: comment",
            "/* x */{\"domain\":\"www.example.com\",\"page\":\"/\"}",
        ),
        (
            "not JSON: trailing comma",
            "{\"domain\":\"www.example.com\",\"page\":\"/\",}",
        ),
        ("not JSON: lone brace", "{"),
        ("not JSON: lone quote", "\""),
        (
            "not JSON: BOM",
            "\u{feff}{\"domain\":\"www.example.com\",\"page\":\"/\"}",
        ),
    ] {
        cases.push(body_case(name, body, 400));
    }
    for cut in [
        1,
        valid_event.len() / 4,
        valid_event.len() / 2,
        valid_event.len() - 1,
    ] {
        cases.push(body_case(
            format!("truncated at {cut}"),
            &valid_event.as_bytes()[..cut],
            400,
        ));
    }
    cases.push(body_case(
        "truncated after a backslash",
        r#"{"domain":"www.example.com","page":"/a\"#,
        400,
    ));
    cases.push(body_case(
        "trailing garbage",
        format!("{valid_event}x"),
        400,
    ));
    cases.push(body_case("two objects", format!("{valid_event}{{}}"), 400));

    // --- JSON that is not an object ---
    for body in [
        "[]",
        r#"["www.example.com","/"]"#,
        r#""{}""#,
        "42",
        "-1.5",
        "null",
        "true",
        "false",
    ] {
        cases.push(body_case(format!("not an object: {body}"), body, 400));
    }

    // --- missing or duplicate keys ---
    cases.push(body_case("empty object", "{}", 400));
    cases.push(body_case(
        "missing page",
        json!({"domain": HOST}).to_string(),
        400,
    ));
    cases.push(body_case(
        "missing domain",
        json!({"page": "/"}).to_string(),
        400,
    ));
    for key in [
        "domain", "page", "event", "note", "timezone", "platform", "sess_id",
    ] {
        let body = format!(
            r#"{{"domain":"{HOST}","page":"/","event":"socialclick","timezone":0,"platform":"p","sess_id":"s","note":"n","{key}":{}}}"#,
            if key == "timezone" {
                "1".to_string()
            } else {
                "\"x\"".to_string()
            }
        );
        cases.push(body_case(format!("duplicate key {key}"), body, 400));
    }
    cases.push(accepted(
        "same key in another case is an unknown key",
        &with(view_base(), "Page", json!("/other")),
        base_view_point(),
    ));

    // --- wrong types and out-of-range values for every key ---
    let wrong: &[(&str, bool, &[&str])] = &[
        (
            "domain",
            false,
            &[
                "1",
                "true",
                "null",
                "[]",
                "{}",
                "\"\"",
                "\"a b.example.com\"",
            ],
        ),
        (
            "page",
            false,
            &["1", "false", "null", "[]", "{}", "\"\"", "\"p\"", "\"?q\""],
        ),
        (
            "timezone",
            false,
            &["\"60\"", "1.5", "true", "[]", "841", "-841"],
        ),
        (
            "utcoffset",
            false,
            &["true", "1.5", "[]", "\"abc\"", "\"900\"", "{}"],
        ),
        ("platform", false, &["1", "true", "[]", "{}"]),
        ("sess_id", false, &["1", "false", "[]", "{}"]),
        ("referrer", false, &["1", "[]", "{}", "true"]),
        ("load_time", false, &["\"1\"", "true", "[]", "-1", "600001"]),
        (
            "pages_viewed",
            false,
            &["1.5", "\"3\"", "0", "1000001", "true"],
        ),
        ("event", true, &["1", "true", "[]", "{}"]),
        ("note", true, &["1", "[]", "{}", "true"]),
        (
            "value",
            true,
            &["\"1\"", "true", "[]", "{}", "1e16", "-1e16"],
        ),
    ];
    for (key, is_event, values) in wrong {
        let base = if *is_event { event_base() } else { view_base() };
        for value in *values {
            let mut body = without(base.clone(), key).to_string();
            body.pop();
            body.push_str(&format!(r#","{key}":{value}}}"#));
            cases.push(body_case(format!("{key} = {value}"), body, 400));
        }
    }

    // --- NaN, infinities, huge numbers ---
    for (key, is_event, literal) in [
        ("value", true, "NaN"),
        ("value", true, "Infinity"),
        ("value", true, "-Infinity"),
        ("load_time", false, "NaN"),
        ("timezone", false, "Infinity"),
        ("value", true, "1e400"),
        ("value", true, "-1e400"),
        ("load_time", false, "1e400"),
        ("value", true, "123456789012345678901234567890"),
        ("pages_viewed", false, "18446744073709551616"),
        ("timezone", false, "9223372036854775808"),
        ("timezone", false, "-9223372036854775809"),
    ] {
        let base = if is_event { event_base() } else { view_base() };
        let mut body = base.to_string();
        body.pop();
        body.push_str(&format!(r#","{key}":{literal}}}"#));
        cases.push(body_case(format!("{key} = {literal}"), body, 400));
    }

    // --- deep nesting ---
    // (Sent to /collect-big: 10,000 levels are more than the 4 KiB limit of /collect.)
    for (name, body) in [
        ("10,000 [", "[".repeat(10_000)),
        (
            "10,000 [ in an unknown key",
            format!(
                r#"{{"domain":"{HOST}","page":"/","x":{}"#,
                "[".repeat(10_000)
            ),
        ),
        (
            "10,000 [ closed, in page (a known key: serde_json's depth limit)",
            format!(
                r#"{{"domain":"{HOST}","page":{}{}}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            ),
        ),
        ("10,000 nested objects", r#"{"a":"#.repeat(10_000)),
    ] {
        cases.push(Case {
            name: name.into(),
            how: How::Big(body.into_bytes()),
            status: 400,
            point: None,
        });
    }
    // Unknown keys are skipped without recursion (serde_json's IgnoredAny), at any depth.
    cases.push(Case {
        name: "10,000 [ closed, in an unknown key: skipped".into(),
        how: How::Big(
            format!(
                r#"{{"domain":"{HOST}","page":"/","x":{}{}}}"#,
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes(),
        ),
        status: 204,
        point: Some(view_point("/", None, None, None)),
    });
    cases.push(accepted(
        "unknown key nested 100 deep is skipped",
        &with(
            view_base(),
            "x",
            serde_json::from_str(&format!("{}{}", "[".repeat(100), "]".repeat(100))).unwrap(),
        ),
        base_view_point(),
    ));

    // --- NUL and control characters as JSON escapes: accepted, removed (note keeps \n \t) ---
    let controls = "a\u{0}b\u{1}\u{7}\u{1b}\u{7f}\u{85}\u{9f}\u{2028}\u{2029}\r\nc\td";
    cases.push(accepted(
        "control escapes in page",
        &with(event_base(), "page", json!(format!("/{controls}"))),
        event_point(
            "socialclick",
            &format!("/{controls}"),
            Some("P"),
            Some("S"),
            Some("N"),
        ),
    ));
    cases.push(accepted(
        "control escapes in platform",
        &with(event_base(), "platform", json!(controls)),
        event_point("socialclick", "/p", Some(controls), Some("S"), Some("N")),
    ));
    cases.push(accepted(
        "control escapes in sess_id",
        &with(event_base(), "sess_id", json!(controls)),
        event_point("socialclick", "/p", Some("P"), Some(controls), Some("N")),
    ));
    cases.push(accepted(
        "control escapes in note",
        &with(event_base(), "note", json!(controls)),
        event_point("socialclick", "/p", Some("P"), Some("S"), Some(controls)),
    ));
    cases.push(accepted(
        "only control characters in platform: tag left out",
        &with(event_base(), "platform", json!("\u{0}\r\n\u{2028}")),
        event_point("socialclick", "/p", None, Some("S"), Some("N")),
    ));
    // Raw (unescaped) control bytes are invalid JSON; raw DEL, C1 and U+2028 are valid JSON.
    for byte in [0x00u8, 0x01, 0x09, 0x0a, 0x0d, 0x1f] {
        for key in ["page", "note"] {
            let (page, note) = if key == "page" {
                ("/a", "N")
            } else {
                ("/p", "a")
            };
            let mut body = format!(r#"{{"domain":"{HOST}","event":"socialclick","#).into_bytes();
            body.extend_from_slice(format!(r#""page":"{page}"#).as_bytes());
            if key == "page" {
                body.push(byte);
            }
            body.extend_from_slice(format!(r#"b","note":"{note}"#).as_bytes());
            if key == "note" {
                body.push(byte);
            }
            body.extend_from_slice(b"b\"}");
            cases.push(body_case(
                format!("raw byte {byte:#04x} in {key}"),
                body,
                400,
            ));
        }
    }
    for raw in ["\u{7f}", "\u{85}", "\u{2028}"] {
        let body = format!(
            r#"{{"domain":"{HOST}","page":"/p{raw}q","platform":"P","sess_id":"S","event":"socialclick","note":"a{raw}b"}}"#
        );
        cases.push(Case {
            name: format!("raw {:?} in page and note", raw),
            how: How::Body(body.into_bytes()),
            status: 204,
            point: Some(event_point(
                "socialclick",
                &format!("/p{raw}q"),
                Some("P"),
                Some("S"),
                Some(&format!("a{raw}b")),
            )),
        });
    }

    // --- invalid UTF-8 and invalid escapes ---
    for (name, bytes) in [
        ("0xff in page", &b"\xff"[..]),
        ("overlong slash", b"\xc0\xaf"),
        ("UTF-8 surrogate", b"\xed\xa0\x80"),
        ("truncated sequence", b"\xe2\x82"),
        ("continuation byte", b"\x80"),
        ("5-byte sequence", b"\xf8\x88\x80\x80\x80"),
    ] {
        let mut body = format!(r#"{{"domain":"{HOST}","page":"/"#).into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\"}");
        cases.push(body_case(format!("invalid UTF-8: {name}"), body, 400));
    }
    let mut body = format!(r#"{{"domain":"{HOST}","page":"/","x":""#).into_bytes();
    body.extend_from_slice(b"\xff\"}");
    cases.push(body_case("invalid UTF-8 in an unknown key", body, 400));
    cases.push(body_case(
        "lone surrogate escape",
        format!(r#"{{"domain":"{HOST}","page":"/\ud800"}}"#),
        400,
    ));
    cases.push(body_case(
        "lone low surrogate escape",
        format!(r#"{{"domain":"{HOST}","page":"/\udc00x"}}"#),
        400,
    ));
    cases.push(body_case(
        "bad escape",
        format!(r#"{{"domain":"{HOST}","page":"/\x41"}}"#),
        400,
    ));

    // --- string limits: at the limit accepted, one byte over refused ---
    let sub = |n: usize| format!("{}.example.com", "a".repeat(n - ".example.com".len()));
    for (len, status) in [(253, 204), (254, 400)] {
        let domain = sub(len);
        let body = with(view_base(), "domain", json!(domain));
        let mut case = body_case(format!("domain of {len} bytes"), body.to_string(), status);
        if status == 204 {
            let mut point = base_view_point();
            point.tags[0].1 = domain;
            case.point = Some(point);
        }
        cases.push(case);
    }
    let page = |n: usize| format!("/{}", "a".repeat(n - 1));
    cases.push(accepted(
        "page of 1024 bytes",
        &with(view_base(), "page", json!(page(1024))),
        view_point(&page(1024), Some("P"), None, Some("S")),
    ));
    cases.push(accepted(
        "page of 1024 bytes plus a long query",
        &with(
            view_base(),
            "page",
            json!(format!("{}?{}", page(1024), "q".repeat(2000))),
        ),
        view_point(&page(1024), Some("P"), None, Some("S")),
    ));
    cases.push(body_case(
        "page of 1025 bytes",
        with(view_base(), "page", json!(page(1025))).to_string(),
        400,
    ));
    let e64 = "é".repeat(32);
    for (key, max) in [("platform", 64), ("sess_id", 64)] {
        for (value, ok) in [
            ("x".repeat(max), true),
            ("x".repeat(max + 1), false),
            (e64.clone(), true),
            (format!("{e64}x"), false),
        ] {
            let name = format!("{key} of {} bytes", value.len());
            let body = with(view_base(), key, json!(value));
            if ok {
                let point = if key == "platform" {
                    view_point("/p", Some(&value), None, Some("S"))
                } else {
                    view_point("/p", Some("P"), None, Some(&value))
                };
                cases.push(accepted(name, &body, point));
            } else {
                cases.push(body_case(name, body.to_string(), 400));
            }
        }
    }
    let event64 = "E".repeat(64);
    cases.push(accepted(
        "event of 64 bytes (permitted, lowercased)",
        &with(event_base(), "event", json!(event64)),
        event_point(&"e".repeat(64), "/p", Some("P"), Some("S"), Some("N")),
    ));
    cases.push(body_case(
        "event of 65 bytes",
        with(event_base(), "event", json!("e".repeat(65))).to_string(),
        400,
    ));
    cases.push(accepted(
        "note of 1024 bytes",
        &with(event_base(), "note", json!("n".repeat(1024))),
        event_point(
            "socialclick",
            "/p",
            Some("P"),
            Some("S"),
            Some(&"n".repeat(1024)),
        ),
    ));
    cases.push(body_case(
        "note of 1025 bytes",
        with(event_base(), "note", json!("n".repeat(1025))).to_string(),
        400,
    ));
    let referrer = |n: usize| {
        let prefix = "https://news.example.org/";
        format!("{prefix}{}", "r".repeat(n - prefix.len()))
    };
    cases.push(accepted(
        "referrer of 2048 bytes",
        &with(view_base(), "referrer", json!(referrer(2048))),
        view_point("/p", Some("P"), Some("news.example.org"), Some("S")),
    ));
    cases.push(body_case(
        "referrer of 2049 bytes",
        with(view_base(), "referrer", json!(referrer(2049))).to_string(),
        400,
    ));

    // --- policy and domain normalization ---
    cases.push(body_case(
        "domain not accepted",
        with(view_base(), "domain", json!("evil.example.net")).to_string(),
        422,
    ));
    cases.push(body_case(
        "event not permitted",
        with(event_base(), "event", json!("signup")).to_string(),
        422,
    ));
    cases.push(body_case(
        "injection in domain",
        with(view_base(), "domain", json!("www.example.com\n,x=1 y=2i")).to_string(),
        400,
    ));
    cases.push(accepted(
        "domain normalized",
        &with(view_base(), "domain", json!(" WWW.Example.COM. ")),
        base_view_point(),
    ));
    cases.push(accepted(
        "event name lowercased",
        &with(event_base(), "event", json!("SocialClick")),
        base_event_point(),
    ));

    // --- body sizes, empty bodies, chunked bodies, temp files ---
    let padded = |len: usize| {
        let mut body = event_base().to_string().into_bytes();
        body.resize(len, b' ');
        body
    };
    cases.push(body_case("empty body", "", 400));
    cases.push(body_case("whitespace body", " \r\n\t ", 400));
    cases.push(Case {
        name: "POST without Content-Length".into(),
        how: How::Raw(head("/collect", "").into_bytes()),
        status: 400,
        point: None,
    });
    cases.push(Case {
        name: format!("body of exactly {MAX_BODY} bytes"),
        how: How::Body(padded(MAX_BODY)),
        status: 204,
        point: Some(base_event_point()),
    });
    cases.push(body_case(
        format!("body of {} bytes", MAX_BODY + 1),
        padded(MAX_BODY + 1),
        413,
    ));
    cases.push(Case {
        name: "declared length over the limit, no body sent".into(),
        how: How::Raw(head("/collect", "Content-Length: 100000\r\n").into_bytes()),
        status: 413,
        point: None,
    });
    let pieces = |body: Vec<u8>, size: usize| -> Vec<Vec<u8>> {
        body.chunks(size).map(<[u8]>::to_vec).collect()
    };
    cases.push(Case {
        name: "chunked, 1-byte chunks".into(),
        how: How::Chunked(pieces(event_base().to_string().into_bytes(), 1)),
        status: 204,
        point: Some(base_event_point()),
    });
    cases.push(Case {
        name: format!("chunked, exactly {MAX_BODY} bytes"),
        how: How::Chunked(pieces(padded(MAX_BODY), 1000)),
        status: 204,
        point: Some(base_event_point()),
    });
    cases.push(Case {
        name: format!("chunked, {} bytes", MAX_BODY + 1),
        how: How::Chunked(pieces(padded(MAX_BODY + 1), 1000)),
        status: 413,
        point: None,
    });
    cases.push(Case {
        name: "chunked, invalid JSON".into(),
        how: How::Chunked(vec![b"{\"domain\":".to_vec(), b"[".to_vec()]),
        status: 400,
        point: None,
    });
    cases.push(Case {
        name: "chunked, empty".into(),
        how: How::Chunked(vec![]),
        status: 400,
        point: None,
    });
    let mut bad_chunk = head("/collect", "Transfer-Encoding: chunked\r\n").into_bytes();
    bad_chunk.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
    cases.push(Case {
        name: "chunked, bad chunk size".into(),
        how: How::Raw(bad_chunk),
        status: 400,
        point: None,
    });
    let mut both = head(
        "/collect",
        "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    )
    .into_bytes();
    both.extend_from_slice(b"2\r\n{}\r\n0\r\n\r\n");
    cases.push(Case {
        name: "Content-Length and chunked at once".into(),
        how: How::Raw(both),
        status: 400,
        point: None,
    });
    cases.push(Case {
        name: "negative Content-Length".into(),
        how: How::Raw(head("/collect", "Content-Length: -1\r\n").into_bytes()),
        status: 400,
        point: None,
    });
    let mut expect = head(
        "/collect",
        &format!(
            "Expect: 100-continue\r\nContent-Length: {}\r\n",
            valid_event.len()
        ),
    )
    .into_bytes();
    expect.extend_from_slice(valid_event.as_bytes());
    cases.push(Case {
        name: "Expect: 100-continue".into(),
        how: How::Raw(expect),
        status: 204,
        point: Some(base_event_point()),
    });
    cases.push(Case {
        name: "body in a temp file".into(),
        how: How::File(event_base().to_string().into_bytes()),
        status: 204,
        point: Some(base_event_point()),
    });
    cases.push(Case {
        name: format!("body in a temp file, exactly {MAX_BODY} bytes"),
        how: How::File(padded(MAX_BODY)),
        status: 204,
        point: Some(base_event_point()),
    });
    cases.push(Case {
        name: format!("body in a temp file, {} bytes", MAX_BODY + 1),
        how: How::File(padded(MAX_BODY + 1)),
        status: 413,
        point: None,
    });
    cases.push(Case {
        name: "invalid JSON in a temp file".into(),
        how: How::File(b"{\"domain\":\"x\"".to_vec()),
        status: 400,
        point: None,
    });
    cases.push(Case {
        name: "empty body in a temp file".into(),
        how: How::File(Vec::new()),
        status: 400,
        point: None,
    });

    // --- slow and vanishing clients ---
    cases.push(Case {
        name: "headers, then silence".into(),
        how: How::Stall {
            declared: 100,
            sent: 0,
        },
        status: 0,
        point: None,
    });
    cases.push(Case {
        name: "part of the body, then silence".into(),
        how: How::Stall {
            declared: 100,
            sent: 10,
        },
        status: 0,
        point: None,
    });
    let mut partial = head(
        "/collect",
        &format!("Content-Length: {}\r\n", valid_event.len()),
    )
    .into_bytes();
    partial.extend_from_slice(&valid_event.as_bytes()[..valid_event.len() / 2]);
    cases.push(Case {
        name: "disconnect mid-body".into(),
        how: How::Disconnect(partial),
        status: 0,
        point: None,
    });
    let mut partial_chunked = head("/collect", "Transfer-Encoding: chunked\r\n").into_bytes();
    partial_chunked.extend_from_slice(b"100\r\n{\"domain\":");
    cases.push(Case {
        name: "disconnect mid-chunk".into(),
        how: How::Disconnect(partial_chunked),
        status: 0,
        point: None,
    });
    cases.push(Case {
        name: "disconnect right after the headers".into(),
        how: How::Disconnect(head("/collect", "Content-Length: 50\r\n").into_bytes()),
        status: 0,
        point: None,
    });
    cases.push(accepted(
        "a valid beacon after the vanished clients",
        &event_base(),
        base_event_point(),
    ));

    // --- line-protocol injection in every field that reaches a point ---
    let payloads = [
        "a\nb",
        "a,b",
        "a b",
        "a=b",
        "a\"b",
        "a\\b",
        "a\\",
        "a\\\\",
        "a\\ b",
        "a\\,b",
        "a\\=b",
        "a\\\"b",
        "a\r\nb\tc",
        "\" x=1i",
        "x\npf_analytics_event,domain=evil counter=100i 1\n",
        "x counter=100i,note=\"y\" 1\nevil,t=1 f=1i",
        "\\",
        " ",
        "=,\\ ",
    ];
    for p in payloads {
        let page = format!("/{p}");
        cases.push(accepted(
            format!("injection in page: {p:?}"),
            &with(event_base(), "page", json!(page)),
            event_point("socialclick", &page, Some("P"), Some("S"), Some("N")),
        ));
        cases.push(accepted(
            format!("injection in platform: {p:?}"),
            &with(event_base(), "platform", json!(p)),
            event_point("socialclick", "/p", Some(p), Some("S"), Some("N")),
        ));
        cases.push(accepted(
            format!("injection in sess_id: {p:?}"),
            &with(view_base(), "sess_id", json!(p)),
            view_point("/p", Some("P"), None, Some(p)),
        ));
        cases.push(accepted(
            format!("injection in note: {p:?}"),
            &with(event_base(), "note", json!(p)),
            event_point("socialclick", "/p", Some("P"), Some("S"), Some(p)),
        ));
        // The path, query and fragment of a referrer are dropped; a host with any of these
        // characters is not a host, so the tag is left out.
        cases.push(accepted(
            format!("injection in referrer path: {p:?}"),
            &with(
                view_base(),
                "referrer",
                json!(format!("https://news.example.org/{p}?{p}#{p}")),
            ),
            view_point("/p", Some("P"), Some("news.example.org"), Some("S")),
        ));
        cases.push(accepted(
            format!("injection in referrer host: {p:?}"),
            &with(
                view_base(),
                "referrer",
                json!(format!("https://news{p}.example.org/")),
            ),
            view_point("/p", Some("P"), None, Some("S")),
        ));
    }
    cases
}

/// Checks one written point against the expectation.
fn check_point(name: &str, point: &Point, want: &Expected) {
    assert_eq!(
        point.measurement, want.measurement,
        "{name}: {}",
        point.line
    );
    assert_eq!(point.tags, want.tags, "{name}: tags of {:?}", point.line);
    assert_eq!(
        point.fields, want.fields,
        "{name}: fields of {:?}",
        point.line
    );
}

#[test]
fn hostile_input_gets_its_status_and_never_a_forged_point_or_a_dead_worker() {
    let sink = FakeSink::start();
    let port = free_port();
    let opts = NginxOptions {
        master_process: true,
        worker_processes: 1,
        ..Default::default()
    };
    let nginx = Nginx::start_with(opts, &conf(port, sink.port()));
    let workers = nginx.worker_pids();
    assert_eq!(workers.len(), 1, "one worker");

    let cases = cases();
    let mut failures = Vec::new();
    let mut expected_points = 0;
    let started = Instant::now();
    for case in &cases {
        let before = sink_points(&sink).len();
        let status = send(port, &case.how);
        if matches!(case.how, How::Stall { .. }) {
            eprintln!(
                "{}: {}",
                case.name,
                if status == 0 {
                    "connection closed".to_string()
                } else {
                    status.to_string()
                }
            );
        }
        let status_ok = if case.status == 0 {
            status == 0 || status == 408
        } else {
            status == case.status
        };
        if !status_ok {
            failures.push(format!(
                "{}: status {status}, expected {}",
                case.name,
                if case.status == 0 {
                    "408 or close".to_string()
                } else {
                    case.status.to_string()
                }
            ));
        }
        match &case.point {
            Some(want) if status == 204 => {
                expected_points += 1;
                let mut points = sink_points(&sink);
                let deadline = Instant::now() + POINT_WAIT;
                while points.len() < before + 1 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                    points = sink_points(&sink);
                }
                if points.len() != before + 1 {
                    failures.push(format!(
                        "{}: {} points written, expected exactly 1",
                        case.name,
                        points.len() - before
                    ));
                    continue;
                }
                check_point(&case.name, &points[before], want);
            }
            _ => {
                let now = sink_points(&sink).len();
                if now != before {
                    failures.push(format!("{}: wrote {} point(s)", case.name, now - before));
                }
            }
        }
    }
    // Late writes of refused beacons would show up now.
    std::thread::sleep(Duration::from_millis(300));
    let points = sink_points(&sink);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(points.len(), expected_points, "points written in all");
    assert_eq!(nginx.worker_pids(), workers, "the worker never died");
    nginx.assert_no_crash_in_log();
    assert!(
        !nginx.error_log().contains("pf_analytics_event,domain=evil"),
        "no body data in the log"
    );
    eprintln!(
        "hostile: {} cases ({} accepted with their point checked), {:.1}s, worker {:?} survived",
        cases.len(),
        expected_points,
        started.elapsed().as_secs_f64(),
        workers
    );
}

#[test]
fn the_readme_oracle_matches_the_readme_examples() {
    assert_eq!(stored_tag("Linux\\"), "Linux");
    assert_eq!(stored_tag("/a\\ b"), "/a b");
    assert_eq!(stored_tag("a\\b"), "a\\b");
    assert_eq!(stored_tag("a\\\\,b"), "a,b");
    assert_eq!(stored_tag("a\n\r\u{0}\u{2028}b"), "ab");
    assert_eq!(stored_string_field("a\r\n\tb\u{0}\u{85}"), "a\n\tb");
    let point = Point::parse(
        "m,page=/x\\ y\\,z\\=1,platform=a\\b f=1i,note=\"say \\\"hi\\\" \\\\ x\ny\" 7",
    )
    .unwrap();
    assert_eq!(point.tag("page"), Some("/x y,z=1"));
    assert_eq!(point.tag("platform"), Some("a\\b"));
    assert_eq!(
        point.field("note"),
        Some(&FieldValue::Str("say \"hi\" \\ x\ny".into()))
    );
    assert_eq!(point.timestamp, 7);
    assert!(
        Point::parse("m,t=a\\\\,u=b f=1i 1").is_err(),
        "1.6 misreads `\\\\,`"
    );
}
