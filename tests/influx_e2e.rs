//! End to end: beacons POSTed to a real nginx with the module, written to a real InfluxDB 1.x,
//! and read back with InfluxQL.

mod common;

use std::time::Duration;

use serde_json::{json, Map, Value};

use common::{free_port, post, Conn, FakeSink, Influx, Nginx};

const DB: &str = "analytics";

/// nginx with the beacon endpoint at `/collect`, writing to `influx` through keepalive
/// connections, as in nginx-conf/nginx.conf. The writes pass through a forwarding
/// [`FakeSink`], whose privacy audit checks every byte sent to InfluxDB.
fn start_nginx(influx_port: u16, endpoint_extra: &str) -> (Nginx, u16, FakeSink) {
    let audit = FakeSink::start();
    audit.set_forward(Some(&format!("127.0.0.1:{influx_port}")));
    let influx_port = audit.port();
    let port = free_port();
    let write_location =
        common::write_location(&format!("http://influxdb/write?db={DB}&precision=ns"), "5s");
    let conf = format!(
        r#"
upstream influxdb {{
    server 127.0.0.1:{influx_port};
    keepalive 4;
}}
server {{
    listen 127.0.0.1:{port};
    server_name www.example.com;
    permitted_events socialclick searchtermintercepted bentest;
    location = /collect {{
        analytics;
        {endpoint_extra}
    }}
{write_location}
}}
"#
    );
    (Nginx::start(&conf), port, audit)
}

fn start() -> (Influx, (Nginx, FakeSink), u16) {
    let influx = Influx::start();
    influx.create_database(DB);
    let (nginx, port, audit) = start_nginx(influx.port(), "");
    (influx, (nginx, audit), port)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/payloads/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Every stored point of `measurement` with all its tags and fields, oldest first.
fn points(influx: &Influx, measurement: &str) -> Vec<Map<String, Value>> {
    influx.rows(DB, &format!("SELECT * FROM \"{measurement}\""))
}

/// The row without its `time` column.
fn without_time(mut row: Map<String, Value>) -> Value {
    row.remove("time");
    Value::Object(row)
}

fn measurements(influx: &Influx) -> Vec<String> {
    influx
        .rows(DB, "SHOW MEASUREMENTS")
        .into_iter()
        .filter_map(|row| row.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[test]
fn the_sample_payloads_are_stored_as_documented() {
    let (influx, _nginx, port) = start();
    let expected_status = [
        ("event-socialclick.json", 204),
        ("event-no-note.json", 204),
        ("pageview.json", 204),
        ("pageview-upstream-draft.json", 204),
        ("bad-not-json.json", 400),
        ("bad-wrong-types.json", 400),
    ];
    for (file, status) in expected_status {
        let response = post(port, "/collect", &fixture(file));
        assert_eq!(response.status, status, "{file}: {}", response.body_text());
    }

    let events: Vec<Value> = points(&influx, "pf_analytics_event")
        .into_iter()
        .map(without_time)
        .collect();
    assert_eq!(
        events,
        vec![
            json!({"counter": 1, "domain": "www.example.com", "event": "socialclick",
                   "note": "mastodon", "page": "/posts/blog/general/share-buttons.html",
                   "platform": "Linux x86_64", "sess": "07ab-8022", "timezone": "-60",
                   "type": "event"}),
            json!({"counter": 1, "domain": "www.example.com", "event": "searchtermintercepted",
                   "note": "", "page": "/search.html", "platform": "MacIntel",
                   "sess": "1c2f-9a01", "timezone": "0", "type": "event"}),
        ]
    );

    let views: Vec<Value> = points(&influx, "pf_analytics")
        .into_iter()
        .map(without_time)
        .collect();
    assert_eq!(
        views,
        vec![
            json!({"counter": 1, "domain": "www.example.com", "load_time": 812.5,
                   "page": "/posts/hello.html", "pages_viewed": 3, "platform": "Win32",
                   "referrer": "news.example.org", "sess": "5e5e-0001", "timezone": "330",
                   "type": "pageview"}),
            json!({"counter": 1, "domain": "www.example.com", "load_time": null,
                   "page": "/foo/bar", "pages_viewed": null, "platform": "Linux x86_64",
                   "referrer": null, "sess": null, "timezone": "0", "type": "pageview"}),
        ]
    );
    assert_eq!(
        measurements(&influx),
        ["pf_analytics", "pf_analytics_event"]
    );
}

#[test]
fn an_injection_attempt_is_exactly_one_point_with_its_values_escaped() {
    let (influx, _nginx, port) = start();
    let response = post(port, "/collect", &fixture("bad-tag-injection.json"));
    assert_eq!(response.status, 204, "{}", response.body_text());

    assert_eq!(
        measurements(&influx),
        ["pf_analytics_event"],
        "no measurement was injected"
    );
    let events = points(&influx, "pf_analytics_event");
    assert_eq!(events.len(), 1, "exactly one point");
    assert_eq!(
        without_time(events[0].clone()),
        json!({"counter": 1, "domain": "www.example.com", "event": "socialclick",
               "note": "say \"hi\" \\ then\nnew line",
               "page": "/x y,z=1pf_analytics_event,domain=evil counter=100i",
               "platform": "Linux", "sess": "a=b c", "type": "event"}),
        "line breaks are removed from tags, a trailing backslash is dropped, the note keeps both"
    );
}

#[test]
fn backslashes_in_tags_are_stored_or_dropped_as_documented() {
    let (influx, _nginx, port) = start();
    let cases = [
        (r"/plain\path", r"/plain\path"),
        (r"/a\ b", "/a b"),
        (r"/a\,b", "/a,b"),
        (r"/a\=b", "/a=b"),
        (r"/ends\", "/ends"),
        (r"/ends\\\", "/ends"),
        (r"/two\\x", r"/two\\x"),
    ];
    for (i, (page, _)) in cases.iter().enumerate() {
        let body = json!({"domain": "www.example.com", "page": page, "sess_id": format!("s{i}")});
        let response = post(port, "/collect", body.to_string().as_bytes());
        assert_eq!(response.status, 204, "{page}: {}", response.body_text());
    }
    let rows = points(&influx, "pf_analytics");
    assert_eq!(rows.len(), cases.len(), "one point per beacon");
    for (i, (sent, stored)) in cases.iter().enumerate() {
        let row = rows
            .iter()
            .find(|row| row.get("sess") == Some(&json!(format!("s{i}"))))
            .unwrap_or_else(|| panic!("point for {sent}"));
        assert_eq!(row.get("page"), Some(&json!(stored)), "page {sent:?}");
    }
}

#[test]
fn a_thousand_identical_beacons_are_a_thousand_points() {
    let (influx, _nginx, port) = start();
    let beacon = fixture("event-socialclick.json");
    let mut request = format!(
        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: {}\r\n\r\n",
        beacon.len()
    )
    .into_bytes();
    request.extend_from_slice(&beacon);
    let mut conn = Conn::open(port);
    for i in 0..1000 {
        let response = conn.request(&request);
        assert_eq!(response.status, 204, "beacon {i}: {}", response.body_text());
    }
    assert_eq!(influx.count_points(DB, "pf_analytics_event"), 1000);
}

#[test]
fn in_wait_mode_a_stopped_influxdb_means_502_and_background_mode_still_answers_204() {
    let mut influx = Influx::start();
    influx.create_database(DB);
    let (_wait, wait_port, _audit_wait) = start_nginx(influx.port(), "");
    let (background, background_port, _audit_background) =
        start_nginx(influx.port(), "analytics_write_mode background;");
    assert_eq!(
        post(wait_port, "/collect", &fixture("pageview.json")).status,
        204
    );
    assert_eq!(influx.count_points(DB, "pf_analytics"), 1);

    influx.stop();
    assert_eq!(
        post(wait_port, "/collect", &fixture("pageview.json")).status,
        502
    );
    assert_eq!(
        post(background_port, "/collect", &fixture("pageview.json")).status,
        204
    );
    assert!(
        background.wait_for_log(
            "analytics: write to \"/_analytics/write\" failed",
            Duration::from_secs(5)
        ),
        "{}",
        background.error_log()
    );
}

#[test]
fn a_database_that_does_not_exist_is_a_failed_write() {
    let influx = Influx::start();
    let (_nginx, port, _audit) = start_nginx(influx.port(), "");
    let response = post(port, "/collect", &fixture("pageview.json"));
    assert_eq!(
        response.status, 502,
        "InfluxDB answered 404 database not found"
    );
}
