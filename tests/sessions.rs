//! `analytics_session field | tag | off`: where a beacon's `sess_id` goes.
//!
//! Against a real InfluxDB 1.6 started with `max-values-per-tag = 1000`: 3,000 visits are 3,000
//! points and a handful of series with the default `field`, while `tag` runs into the limit the
//! README warns about. With `off` no byte of any session id reaches the sink (the privacy audit
//! of every fake sink checks it), and the setting is inherited like every other.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use common::points::{sink_points, FieldValue};
use common::privacy::session_violations;
use common::{free_port, post, CapturedRequest, Conn, FakeSink, Influx, Nginx};

const DB: &str = "analytics";
const WAIT: Duration = Duration::from_secs(10);

/// Visits sent in the cardinality tests: three times InfluxDB's `max-values-per-tag`.
const VISITS: usize = 3000;
const MAX_VALUES_PER_TAG: usize = 1000;
/// Client connections sending them (so batches form, as under real traffic).
const CLIENTS: usize = 16;
const PAGES: usize = 5;
const PLATFORMS: usize = 3;

/// nginx with the beacon endpoint at `/collect` (plus `endpoint_extra`), writing to InfluxDB at
/// `influx_port` through a forwarding [`FakeSink`] whose privacy audit reads every write.
fn start_nginx(influx_port: u16, endpoint_extra: &str) -> (Nginx, u16, FakeSink) {
    let audit = FakeSink::start();
    audit.set_forward(Some(&format!("127.0.0.1:{influx_port}")));
    let port = free_port();
    let write_location =
        common::write_location(&format!("http://influxdb/write?db={DB}&precision=ns"), "5s");
    let conf = format!(
        r#"
upstream influxdb {{
    server 127.0.0.1:{sink};
    keepalive 8;
}}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick;
    location = /collect {{
        analytics;
        {endpoint_extra}
    }}
{write_location}
}}
"#,
        sink = audit.port()
    );
    (Nginx::start(&conf), port, audit)
}

/// Page view `i`: its own session id, one of [`PAGES`] pages and one of [`PLATFORMS`]
/// platforms (every combination occurs).
fn visit(i: usize) -> (String, Vec<u8>) {
    let sess = format!("{:08x}-{i}", (i as u64).wrapping_mul(0x9e37_79b9) as u32);
    let body = json!({
        "domain": "www.example.com",
        "page": format!("/page-{}.html", i % PAGES),
        "platform": format!("Platform {}", (i / PAGES) % PLATFORMS),
        "timezone": -60,
        "sess_id": sess,
    });
    (sess, body.to_string().into_bytes())
}

/// Sends every visit over [`CLIENTS`] keepalive connections; returns (session, status) of each.
fn send_visits(port: u16) -> Vec<(String, u16)> {
    let threads: Vec<_> = (0..CLIENTS)
        .map(|client| {
            std::thread::spawn(move || {
                let mut conn = Conn::open(port);
                let mut answers = Vec::new();
                for i in (client..VISITS).step_by(CLIENTS) {
                    let (sess, body) = visit(i);
                    let mut request = format!(
                        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\n\
                         Content-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    request.extend_from_slice(&body);
                    answers.push((sess, conn.request(&request).status));
                }
                answers
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect()
}

/// The first column of every row of `influxql` as strings (key names, series keys).
fn names(influx: &Influx, influxql: &str) -> Vec<String> {
    influx
        .query(DB, influxql)
        .pointer("/results/0/series/0/values")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|row| row[0].as_str().map(str::to_string))
        .collect()
}

/// The stored value of `sess` of every point of `pf_analytics` (a tag or a field: InfluxQL needs
/// a field in the selection to return tags, hence `counter`).
fn stored_sessions(influx: &Influx) -> Vec<String> {
    influx
        .rows(DB, "SELECT \"counter\", \"sess\" FROM \"pf_analytics\"")
        .iter()
        .filter_map(|row| row.get("sess").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[test]
fn by_default_3000_visits_are_3000_points_in_a_handful_of_series() {
    let influx = Influx::start_with(&format!("max-values-per-tag = {MAX_VALUES_PER_TAG}"));
    influx.create_database(DB);
    let (nginx, port, _audit) = start_nginx(influx.port(), "");

    let answers = send_visits(port);
    let refused: Vec<_> = answers.iter().filter(|(_, s)| *s != 204).collect();
    assert!(
        refused.is_empty(),
        "{} of {VISITS} not answered 204, e.g. {:?}; error log:\n{}",
        refused.len(),
        refused.first(),
        nginx.error_log()
    );

    // Every 204 is a stored point, with its own session.
    let stored = stored_sessions(&influx);
    assert_eq!(stored.len(), VISITS, "one point per acknowledged beacon");
    let sent: HashSet<String> = answers.into_iter().map(|(sess, _)| sess).collect();
    assert_eq!(stored.into_iter().collect::<HashSet<_>>(), sent);

    let fields: Vec<(String, String)> = influx
        .rows(DB, "SHOW FIELD KEYS FROM \"pf_analytics\"")
        .iter()
        .map(|row| {
            let text = |key: &str| row[key].as_str().unwrap_or_default().to_string();
            (text("fieldKey"), text("fieldType"))
        })
        .collect();
    assert!(
        fields.contains(&("sess".to_string(), "string".to_string())),
        "sess is a string field: {fields:?}"
    );
    let tag_keys = names(&influx, "SHOW TAG KEYS FROM \"pf_analytics\"");
    assert_eq!(
        tag_keys,
        ["domain", "page", "platform", "timezone", "type"],
        "no sess tag"
    );
    let series = names(&influx, "SHOW SERIES FROM \"pf_analytics\"");
    assert_eq!(
        series.len(),
        PAGES * PLATFORMS,
        "one series per page and platform, not per visit: {series:?}"
    );
    let distinct = influx.rows(DB, "SELECT COUNT(DISTINCT(\"sess\")) FROM \"pf_analytics\"");
    assert_eq!(
        distinct[0]["count"],
        json!(VISITS),
        "unique visits are counted with COUNT(DISTINCT(\"sess\"))"
    );
    assert!(
        !nginx.error_log().contains("failed"),
        "no failed write: {}",
        nginx.error_log()
    );
}

#[test]
fn with_analytics_session_tag_influxdb_refuses_new_visits_past_max_values_per_tag() {
    let influx = Influx::start_with(&format!("max-values-per-tag = {MAX_VALUES_PER_TAG}"));
    influx.create_database(DB);
    let (nginx, port, _audit) = start_nginx(influx.port(), "analytics_session tag;");

    let answers = send_visits(port);
    let acknowledged: HashSet<&str> = answers
        .iter()
        .filter(|(_, status)| *status == 204)
        .map(|(sess, _)| sess.as_str())
        .collect();
    let bad_gateway = answers.iter().filter(|(_, status)| *status == 502).count();
    assert_eq!(
        acknowledged.len() + bad_gateway,
        VISITS,
        "every beacon is answered 204 (stored) or 502 (write failed)"
    );

    // InfluxDB stores about the limit of session values (concurrent writes can each pass the
    // check just before it is reached: a few more, never many); what it refused was answered
    // 502 (wait mode), and every 204 is a stored point.
    let stored: HashSet<String> = stored_sessions(&influx).into_iter().collect();
    let at_most = MAX_VALUES_PER_TAG + MAX_VALUES_PER_TAG / 10;
    assert!(
        (MAX_VALUES_PER_TAG..=at_most).contains(&stored.len()),
        "{} sessions stored",
        stored.len()
    );
    assert!(
        bad_gateway >= VISITS - at_most,
        "{bad_gateway} beacons answered 502"
    );
    for sess in &acknowledged {
        assert!(stored.contains(*sess), "{sess} answered 204 but not stored");
    }
    assert_eq!(
        names(&influx, "SHOW TAG KEYS FROM \"pf_analytics\"")
            .iter()
            .filter(|key| *key == "sess")
            .count(),
        1,
        "sess is a tag"
    );
    let log = nginx.error_log();
    assert!(
        log.contains("analytics: write to \"/_analytics/write\" failed")
            && log.contains("max-values-per-tag limit exceeded"),
        "the refusal is logged with InfluxDB's reason: {log}"
    );
}

/// Session ids that would show up in a write in any form: plain, and with characters that tags
/// and string fields escape.
fn marked_sessions() -> Vec<String> {
    let mut ids: Vec<String> = (0..20).map(|i| format!("zq7x-sess-{i:03}")).collect();
    ids.extend(
        [
            "zq7x a,b=c",
            "zq7x \"quoted\" \\ back",
            "zq7x\ttab\nline",
            "zq7x-é€😀",
        ]
        .map(str::to_string),
    );
    ids
}

#[test]
fn with_analytics_session_off_no_byte_of_a_session_id_reaches_the_sink() {
    let sink = FakeSink::start();
    let port = free_port();
    let write_location =
        common::write_location("http://sink/write?db=analytics&precision=ns", "2s");
    let _nginx = Nginx::start(&format!(
        r#"
upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 4; }}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick;
    location = /collect {{
        analytics;
        analytics_session off;
    }}
{write_location}
}}
"#,
        sink_port = sink.port()
    ));
    let ids = marked_sessions();
    // The audit when the sink is dropped checks every write against these ids.
    sink.forbid_sessions(ids.clone());

    for (i, sess) in ids.iter().enumerate() {
        let body = if i % 2 == 0 {
            json!({"domain": "www.example.com", "page": "/off", "sess_id": sess,
                   "pages_viewed": 2})
        } else {
            json!({"domain": "www.example.com", "page": "/off", "sess_id": sess,
                   "event": "socialclick", "note": "n"})
        };
        let response = post(port, "/collect", body.to_string().as_bytes());
        assert_eq!(response.status, 204, "{sess:?}: {}", response.body_text());
    }
    // `sess_id` is still validated: a wrong type or a value over 64 bytes is refused.
    for (sess_id, why) in [
        (json!(12), "a number"),
        (json!(format!("zq7x{}", "s".repeat(61))), "65 bytes"),
    ] {
        let body = json!({"domain": "www.example.com", "page": "/off", "sess_id": sess_id});
        let response = post(port, "/collect", body.to_string().as_bytes());
        assert_eq!(response.status, 400, "{why}: {}", response.body_text());
        assert!(response.body_text().contains("sess_id"), "{why}");
    }

    let writes = sink.wait_for_requests(1, WAIT);
    assert!(!writes.is_empty());
    assert!(common::wait_until(WAIT, || sink_points(&sink).len() == ids.len()));
    let points = sink_points(&sink);
    assert_eq!(
        points
            .iter()
            .filter(|p| p.measurement == "pf_analytics_event")
            .count(),
        ids.len() / 2,
        "both measurements are written"
    );
    for point in &points {
        assert_eq!(point.sess(), None, "{}", point.line);
        assert_eq!(point.tag("page"), Some("/off"), "{}", point.line);
    }
    for write in sink.requests() {
        assert_eq!(session_violations(&write, &ids), Vec::<String>::new());
    }
}

#[test]
fn with_analytics_session_off_influxdb_has_no_sess_key_at_all() {
    let influx = Influx::start();
    influx.create_database(DB);
    let (_nginx, port, audit) = start_nginx(influx.port(), "analytics_session off;");
    let ids = marked_sessions();
    audit.forbid_sessions(ids.clone());
    for (i, sess) in ids.iter().enumerate() {
        let body = if i % 2 == 0 {
            json!({"domain": "www.example.com", "page": "/off", "sess_id": sess})
        } else {
            json!({"domain": "www.example.com", "page": "/off", "sess_id": sess,
                   "event": "socialclick"})
        };
        let response = post(port, "/collect", body.to_string().as_bytes());
        assert_eq!(response.status, 204, "{sess:?}: {}", response.body_text());
    }
    assert_eq!(
        influx.count_points(DB, "pf_analytics") + influx.count_points(DB, "pf_analytics_event"),
        ids.len()
    );
    for measurement in ["pf_analytics", "pf_analytics_event"] {
        for (what, keys) in [
            (
                "field",
                names(&influx, &format!("SHOW FIELD KEYS FROM \"{measurement}\"")),
            ),
            (
                "tag",
                names(&influx, &format!("SHOW TAG KEYS FROM \"{measurement}\"")),
            ),
        ] {
            assert!(!keys.is_empty(), "{measurement} has {what} keys");
            assert!(
                !keys.iter().any(|k| k == "sess"),
                "{measurement}: no sess {what}: {keys:?}"
            );
        }
    }
}

#[test]
fn the_setting_is_inherited_and_an_inner_level_overrides_it() {
    let sink = FakeSink::start();
    let port = free_port();
    let write_location =
        common::write_location("http://sink/write?db=analytics&precision=ns", "2s");
    let _nginx = Nginx::start(&format!(
        r#"
analytics_session tag;
upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 4; }}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    analytics_batch off;
    location = /inherits {{ analytics; }}
    location = /off {{ analytics; analytics_session off; }}
    location = /field {{ analytics; analytics_session field; }}
{write_location}
}}
"#,
        sink_port = sink.port()
    ));
    let mut kinds = Vec::new();
    for location in ["inherits", "off", "field"] {
        let body = json!({"domain": "www.example.com", "page": format!("/{location}"),
                          "sess_id": format!("s-{location}")});
        let response = post(port, &format!("/{location}"), body.to_string().as_bytes());
        assert_eq!(response.status, 204, "{location}: {}", response.body_text());
        let points = sink_points(&sink);
        let point = points.last().expect("a point");
        assert_eq!(point.tag("page"), Some(format!("/{location}").as_str()));
        let tag = point.tag("sess").map(str::to_string);
        let field = match point.field("sess") {
            Some(FieldValue::Str(sess)) => Some(sess.clone()),
            _ => None,
        };
        assert!(
            tag.is_none() || field.is_none(),
            "never both: {}",
            point.line
        );
        kinds.push((location, tag, field));
    }
    assert_eq!(
        kinds,
        [
            ("inherits", Some("s-inherits".to_string()), None),
            ("off", None, None),
            ("field", None, Some("s-field".to_string())),
        ]
    );
}

/// The session part of the audit catches what it is there to catch.
#[test]
fn the_session_audit_catches_a_session_in_any_form() {
    let write = |body: &str| CapturedRequest {
        method: "POST".into(),
        target: "/write?db=analytics".into(),
        version: "HTTP/1.1".into(),
        headers: vec![("Host".into(), "127.0.0.1:8086".into())],
        body: body.as_bytes().to_vec(),
        raw: format!("POST /write HTTP/1.1\r\nHost: 127.0.0.1:8086\r\n\r\n{body}").into_bytes(),
        conn_id: 0,
    };
    let ids = ["zq7x a,b=c".to_string(), "zq7x \"q\" \\".to_string()];
    let clean = "pf_analytics,domain=a.example,page=/x counter=1i 1\n";
    assert_eq!(
        session_violations(&write(clean), &ids),
        Vec::<String>::new()
    );
    for leak in [
        "pf_analytics,domain=a.example,page=/x,sess=other counter=1i 1\n",
        "pf_analytics,domain=a.example,page=/x counter=1i,sess=\"other\" 1\n",
        "pf_analytics,domain=a.example,page=/x,p=zq7x\\ a\\,b\\=c counter=1i 1\n",
        "pf_analytics,domain=a.example,page=/x counter=1i,n=\"zq7x \\\"q\\\" \\\\\" 1\n",
        "pf_analytics,domain=a.example,page=/x counter=1i 1\n# zq7x a,b=c\n",
    ] {
        assert!(
            !session_violations(&write(leak), &ids).is_empty(),
            "not caught: {leak:?}"
        );
    }
}
