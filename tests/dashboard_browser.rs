//! The dashboard in real headless Chromium (driven over WebDriver), served by nginx with the
//! module (dashboard, report and query locations as in the README, behind `allow`/`deny` and
//! `auth_basic`), on the known data set of tests/reports.rs in a real InfluxDB: the KPI numbers,
//! the tables and the CSV downloads match the answers computed from the data set, a click on a
//! top page narrows the dashboard to that page, nothing shifts while loading, and the page
//! saves the README's screenshot (`docs/dashboard.png`, see `save_screenshot`). With a metrics
//! location next to the dashboard, the collector health panel shows what a scrape of the same
//! metrics JSON says after a known mix of beacons (accepted, refused, failed writes), and
//! follows a refresh; without a metrics location (404) or when it refuses (403) the panel stays
//! hidden and nothing else changes. On an empty database it shows the empty state; with InfluxDB
//! stopped, the error banner.

mod common;

// The module's library cannot be linked without nginx: the nginx-free core is compiled from its
// sources (see `harness = false` in Cargo.toml), for the data set's lines.
#[path = "../src/core/mod.rs"]
#[allow(dead_code, unused_imports)]
mod core;

// The data set and the expected numbers, shared with tests/reports.rs.
#[path = "common/known_answers.rs"]
mod known_answers;

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use common::webdriver::{Browser, BrowserOptions};
use common::{
    free_port, post_with_headers, query_location, request, wait_until, write_location, Conn,
    Influx, Nginx, TestDir,
};
use known_answers::{
    assert_json_eq, data_set, now_ms, rows_csv, write_data_set, Expected, Hit, DAY, DB, DOMAIN,
    KEYED_TABLES,
};

/// The dashboard's login (`auth_basic`), as an admin would type it.
const USER: &str = "admin";
const PASSWORD: &str = "s3cret-demo";
/// Bound of every wait for the page.
const WAIT: Duration = Duration::from_secs(15);
/// Desktop width of the screenshot, in CSS pixels.
const DESKTOP_WIDTH: u32 = 1280;
const KPIS: [&str; 4] = ["pageviews", "visits", "events", "load_time_ms_median"];
/// The database the beacons sent by the health test are written to (not the data set's).
const BEACON_DB: &str = "collector";
/// Host and beacon domain of the beacons sent by the health test.
const BEACON_HOST: &str = "collector.example";
/// The outcomes the health panel counts as refused, and those it lists as not stored.
const REFUSED: [&str; 6] = [
    "invalid",
    "event_not_permitted",
    "domain_not_accepted",
    "body_too_large",
    "method_not_allowed",
    "bot",
];
const NOT_STORED: [&str; 3] = ["write_failed", "spooled", "error"];

/// The metrics location next to the dashboard (`/analytics/metrics`).
#[derive(Clone, Copy, PartialEq)]
enum Metrics {
    /// None: the page's request for it gets 404.
    Absent,
    /// `analytics_metrics`, protected like the dashboard.
    Protected,
    /// `analytics_metrics` behind `deny all`: 403.
    Denied,
}

/// nginx (dashboard + report API, protected as the README shows) + InfluxDB + Chromium.
/// Fields drop in declaration order: the browser first.
struct Setup {
    browser: Browser,
    nginx: Nginx,
    influx: Influx,
    _auth: TestDir,
    port: u16,
}

impl Setup {
    /// Starts InfluxDB with an empty `analytics` database (plus `hits`), nginx and Chromium at
    /// desktop size in light mode. nginx also has a beacon endpoint (`/analytics/collect`,
    /// writing to [`BEACON_DB`]) and one whose writes fail (`/analytics/collect-lost`: a database
    /// that does not exist), and `metrics`.
    fn start(hits: &[Hit], metrics: Metrics) -> Setup {
        let influx = Influx::start();
        influx.create_database(DB);
        influx.create_database(BEACON_DB);
        write_data_set(&influx, hits);
        let auth = TestDir::new("htpasswd");
        let htpasswd = auth.path().join("analytics.htpasswd");
        std::fs::write(&htpasswd, format!("{USER}:{{PLAIN}}{PASSWORD}\n")).expect("htpasswd");
        let port = free_port();
        let protect = format!(
            "allow 127.0.0.1;
        deny all;
        auth_basic \"analytics\";
        auth_basic_user_file {};",
            htpasswd.display()
        );
        let metrics_location = match metrics {
            Metrics::Protected => format!(
                "location = /analytics/metrics {{
        analytics_metrics;
        {protect}
    }}"
            ),
            Metrics::Denied => {
                "location = /analytics/metrics { analytics_metrics; deny all; }".to_string()
            }
            Metrics::Absent => String::new(),
        };
        let nginx = Nginx::start(&format!(
            r#"
upstream influxdb {{ server 127.0.0.1:{influx_port}; keepalive 4; }}
server {{
    listen 127.0.0.1:{port};
    location = /analytics/ {{
        analytics_dashboard;
        {protect}
    }}
    location = /analytics/report {{
        analytics_report;
        {protect}
    }}
    {metrics_location}
    location = /analytics/collect {{
        analytics;
        permitted_events download;
    }}
    location = /analytics/collect-lost {{
        analytics;
        analytics_write /_analytics/lost;
    }}
{query}
{write}
{lost}
}}
"#,
            influx_port = influx.port(),
            query = query_location(&format!("http://influxdb/query?db={DB}")),
            write = write_location(
                &format!("http://influxdb/write?db={BEACON_DB}&precision=ns"),
                "5s"
            ),
            lost = write_location("http://influxdb/write?db=no_such_db&precision=ns", "5s")
                .replace("/_analytics/write", "/_analytics/lost"),
        ));
        let browser = Browser::start(BrowserOptions::default());
        browser.set_window_size(DESKTOP_WIDTH, 900);
        browser.cdp(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": "light"}]}),
        );
        Setup {
            browser,
            nginx,
            influx,
            _auth: auth,
            port,
        }
    }

    /// The dashboard's URL with the login in it (the browser keeps it for the page's requests)
    /// and `fragment` (the view).
    fn url(&self, fragment: &str) -> String {
        format!(
            "http://{USER}:{PASSWORD}@127.0.0.1:{}/analytics/#{fragment}",
            self.port
        )
    }

    fn js(&self, script: &str) -> Value {
        self.browser.execute(script, json!([]))
    }

    /// Opens the dashboard on `fragment` in a fresh document (not a same-document fragment
    /// change) and waits until it has finished loading.
    fn open(&self, fragment: &str) {
        self.browser.goto("about:blank");
        self.browser.goto(&self.url(fragment));
        self.wait_loaded("the first load");
    }

    /// Waits until `main[aria-busy="false"]` (every report of the view answered and drawn).
    fn wait_loaded(&self, what: &str) {
        let loaded = wait_until(WAIT, || {
            self.js("return document.querySelector('main[aria-busy=\"false\"]') !== null") == true
        });
        assert!(
            loaded,
            "{what}: the dashboard did not finish loading: {}\naccess log:\n{}",
            self.js("return document.body.innerText"),
            self.nginx.access_log()
        );
    }

    /// The KPI cards: `{name: {value, change, text}}` from `data-value`, `data-change` and the
    /// shown text.
    fn kpis(&self) -> Value {
        self.js("const out = {};
             for (const card of document.querySelectorAll('[data-kpi]')) {
               out[card.dataset.kpi] = {
                 value: card.dataset.value === undefined || card.dataset.value === ''
                   ? null : Number(card.dataset.value),
                 change: card.dataset.change === undefined || card.dataset.change === ''
                   ? null : Number(card.dataset.change),
                 text: card.querySelector('.kpi-value').textContent,
               };
             }
             return out;")
    }

    /// The rows of `#table-<name>`: `[data-key, text of each further cell...]`.
    fn table(&self, name: &str) -> Vec<Vec<String>> {
        let rows = self.browser.execute(
            "return [...document.querySelectorAll('#table-' + arguments[0] + ' tbody tr[data-key]')]
               .map((tr) => [tr.dataset.key, ...[...tr.cells].slice(1).map((td) => td.textContent)]);",
            json!([name]),
        );
        serde_json::from_value(rows).expect("table rows")
    }

    /// Fetches the `href` of `#csv-<name>` from the page, with the page's own credentials:
    /// `{href, download, status, type, body}`.
    fn csv(&self, name: &str) -> Value {
        self.browser.execute_async(
            "const done = arguments[arguments.length - 1];
             const a = document.getElementById('csv-' + arguments[0]);
             fetch(a.href, { credentials: 'same-origin', cache: 'no-store' })
               .then(async (r) => done({ href: a.href, download: a.getAttribute('download'),
                 status: r.status, type: r.headers.get('content-type'), body: await r.text() }))
               .catch((e) => done({ href: a.href, error: String(e) }));",
            json!([name]),
        )
    }

    /// Every `layout-shift` entry since the page was opened (a buffered PerformanceObserver):
    /// `[{value, hadRecentInput, sources}]`.
    fn layout_shifts(&self) -> Vec<Value> {
        let entries = self.browser.execute_async(
            "const done = arguments[arguments.length - 1];
             const seen = [];
             const observer = new PerformanceObserver((list) => seen.push(...list.getEntries()));
             observer.observe({ type: 'layout-shift', buffered: true });
             const describe = (n) => !n ? null : n.nodeType === 1
               ? n.tagName.toLowerCase() + (n.id ? '#' + n.id : '') +
                 (n.className && typeof n.className === 'string' ? '.' + n.className.split(' ').join('.') : '')
               : n.nodeName;
             // Buffered entries are delivered in a task of their own; give it two frames.
             requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(() => {
               seen.push(...observer.takeRecords());
               observer.disconnect();
               done(seen.map((e) => ({ value: e.value, hadRecentInput: e.hadRecentInput,
                 sources: (e.sources || []).map((s) => describe(s.node)) })));
             }, 50)));",
            json!([]),
        );
        entries.as_array().cloned().unwrap_or_default()
    }

    /// The sum of the layout shifts since the page was opened; panics unless it is below 0.01.
    fn assert_no_layout_shift(&self, what: &str) -> f64 {
        let shifts = self.layout_shifts();
        let total = shifts
            .iter()
            .filter_map(|e| e["value"].as_f64())
            .fold(0.0, |sum, v| sum + v);
        eprintln!(
            "{what}: layout shift while loading {total} ({} entries)",
            shifts.len()
        );
        assert!(
            total < 0.01,
            "{what}: layout shift {total} while loading: {shifts:?}"
        );
        total
    }

    /// The metrics JSON, scraped as an admin would (with the login): `GET
    /// /analytics/metrics?format=json`.
    fn metrics_json(&self) -> Value {
        let login = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        let response = Conn::open(self.port).request(
            format!(
                "GET /analytics/metrics?format=json HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Authorization: Basic {login}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(response.status, 200, "{}", response.body_text());
        serde_json::from_slice(&response.body).expect("the metrics JSON")
    }

    /// The health panel: `{key: {value, text}}` of each `[data-health]` (`value` from
    /// `data-value`, null when empty), `reasons` and `not_stored`, the `[data-reason]` entries of
    /// its two lists as `{reason: text}`, and `shown`.
    fn health(&self) -> Value {
        self.js("const out = { reasons: {}, not_stored: {},
               shown: document.getElementById('health').getClientRects().length > 0 };
             for (const e of document.querySelectorAll('#health [data-health]')) {
               out[e.dataset.health] = {
                 value: e.dataset.value === undefined || e.dataset.value === ''
                   ? null : Number(e.dataset.value),
                 text: e.textContent,
               };
             }
             for (const [list, id] of [['reasons', 'health-refused'], ['not_stored', 'health-lost']])
               for (const li of document.querySelectorAll('#' + id + ' [data-reason]'))
                 out[list][li.dataset.reason] = li.textContent;
             return out;")
    }

    /// Waits until the health panel shows `accepted` accepted beacons.
    fn wait_health(&self, accepted: u64, what: &str) {
        let mut health = Value::Null;
        let shown = wait_until(WAIT, || {
            health = self.health();
            health["shown"] == true && health["accepted"]["value"].as_u64() == Some(accepted)
        });
        assert!(
            shown,
            "{what}: the health panel does not show {accepted} accepted beacons: {health}\n\
             access log:\n{}",
            self.nginx.access_log()
        );
    }

    /// Whether `#id` is shown (not `hidden`, not inside a hidden ancestor).
    fn shown(&self, id: &str) -> bool {
        self.browser.execute(
            "const e = document.getElementById(arguments[0]);
             return !!e && e.getClientRects().length > 0;",
            json!([id]),
        ) == true
    }
}

/// Sends a known mix of beacons to the collector: accepted ones (page views and a permitted
/// event), refused ones of every kind the dashboard's visitor could cause, a dropped bot, and
/// beacons whose write fails. Returns the count of each outcome sent.
fn send_beacon_mix(port: u16, accepted: usize) -> Vec<(&'static str, u64)> {
    let beacon = |extra: Value| {
        let mut b = json!({"domain": BEACON_HOST, "page": "/health"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string().into_bytes()
    };
    let send = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        post_with_headers(port, path, BEACON_HOST, headers, body).status
    };
    let collect = "/analytics/collect";
    for _ in 0..accepted {
        assert_eq!(send(collect, &[], &beacon(json!({}))), 204, "a page view");
    }
    let download = beacon(json!({"event": "download", "note": "report.pdf"}));
    assert_eq!(send(collect, &[], &download), 204, "a permitted event");
    for body in [&b"not json"[..], b"[]"] {
        assert_eq!(send(collect, &[], body), 400, "invalid");
    }
    for _ in 0..3 {
        let signup = beacon(json!({"event": "signup"}));
        assert_eq!(send(collect, &[], &signup), 422, "event not permitted");
    }
    let elsewhere = json!({"domain": "elsewhere.example", "page": "/"}).to_string();
    assert_eq!(send(collect, &[], elsewhere.as_bytes()), 422, "domain");
    assert_eq!(send(collect, &[], &vec![b' '; 9000]), 413, "too large");
    assert_eq!(request(port, "GET", collect, BEACON_HOST, None).status, 405);
    let bot = [("User-Agent", "curl/8.0")];
    assert_eq!(
        send(collect, &bot, &beacon(json!({}))),
        204,
        "a dropped bot"
    );
    for _ in 0..2 {
        let lost = send("/analytics/collect-lost", &[], &beacon(json!({})));
        assert_eq!(lost, 502, "a write to a database that does not exist");
    }
    vec![
        ("accepted", accepted as u64 + 1),
        ("invalid", 2),
        ("event_not_permitted", 3),
        ("domain_not_accepted", 1),
        ("body_too_large", 1),
        ("method_not_allowed", 1),
        ("bot", 1),
        ("write_failed", 2),
        ("spooled", 0),
        ("error", 0),
    ]
}

/// The `q`-quantile of a cumulative histogram of the metrics JSON (`{buckets: [{le, count}],
/// count}`), as Prometheus' `histogram_quantile` estimates it: linear inside the bucket that
/// holds rank `q * count`, the last finite bound beyond it. `None` without observations.
fn quantile(histogram: &Value, q: f64) -> Option<f64> {
    let count = histogram["count"].as_f64()?;
    let buckets = histogram["buckets"].as_array()?;
    if count <= 0.0 || buckets.is_empty() {
        return None;
    }
    let rank = q * count;
    let (mut lower, mut below) = (0.0, 0.0);
    for bucket in buckets {
        let (le, n) = (bucket["le"].as_f64()?, bucket["count"].as_f64()?);
        if n >= rank {
            return Some(lower + (le - lower) * (rank - below) / (n - below));
        }
        (lower, below) = (le, n);
    }
    Some(lower)
}

/// Whether `got` (a number the page computed) is `want` up to rounding.
fn close(got: &Value, want: Option<f64>) -> bool {
    match (got.as_f64(), want) {
        (Some(g), Some(w)) => (g - w).abs() <= 1e-9 * w.abs().max(1e-9),
        (None, None) => true,
        _ => false,
    }
}

/// Checks the health panel against `metrics`, a scrape of the metrics JSON.
fn assert_health(setup: &Setup, metrics: &Value, what: &str) {
    let health = setup.health();
    assert_eq!(health["shown"], true, "{what}: the health panel is shown");
    let beacons = &metrics["beacons"];
    let count = |outcome: &str| beacons[outcome].as_u64().expect("an outcome count");
    let refused: u64 = REFUSED.iter().map(|o| count(o)).sum();
    let writes = &metrics["writes"];
    for (key, want) in [
        ("accepted", count("accepted")),
        ("refused", refused),
        (
            "writes_failed",
            writes["failed"].as_u64().expect("failed writes"),
        ),
        ("writes_ok", writes["ok"].as_u64().expect("ok writes")),
        (
            "waiting",
            metrics["waiting_requests"].as_u64().expect("waiting"),
        ),
        (
            "since",
            metrics["start_time_seconds"].as_u64().expect("start"),
        ),
    ] {
        assert_eq!(
            health[key]["value"].as_u64(),
            Some(want),
            "{what}: [data-health={key}]: {health}"
        );
        if key != "since" {
            assert_eq!(
                digits_of(&health[key]["text"]),
                Some(want),
                "{what}: [data-health={key}] as shown: {health}"
            );
        }
    }
    // Each reason with beacons is listed with its count, the others are not.
    for (list, outcomes) in [("reasons", &REFUSED[..]), ("not_stored", &NOT_STORED[..])] {
        let want: Vec<(&str, u64)> = outcomes
            .iter()
            .map(|o| (*o, count(o)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let shown = health[list].as_object().expect("a list");
        let got: Vec<(&str, u64)> = outcomes
            .iter()
            .filter_map(|o| {
                shown
                    .get(*o)
                    .map(|t| (*o, digits_of(t).unwrap_or(u64::MAX)))
            })
            .collect();
        assert_eq!(got, want, "{what}: the {list} list: {health}");
        assert_eq!(shown.len(), want.len(), "{what}: the {list} list: {health}");
    }
    let durations = &metrics["write_duration_seconds"];
    let mean =
        durations["sum"].as_f64().expect("sum") / durations["count"].as_f64().expect("count");
    for (key, want) in [
        ("latency_p50", quantile(durations, 0.5)),
        ("latency_p90", quantile(durations, 0.9)),
        ("latency_mean", Some(mean)),
    ] {
        assert!(
            close(&health[key]["value"], want),
            "{what}: [data-health={key}] is {} for {want:?}: {durations}",
            health[key]["value"]
        );
        let text = health[key]["text"].as_str().unwrap_or_default();
        assert!(
            text.chars().any(|c| c.is_ascii_digit()) && text.contains('s'),
            "{what}: [data-health={key}] shows a duration: {text:?}"
        );
    }
}

/// The number in a table cell or KPI text whatever the locale's digit grouping.
fn digits(text: &str) -> Option<u64> {
    let d: String = text.chars().filter(char::is_ascii_digit).collect();
    d.parse().ok()
}

/// [`digits`] of a JSON string.
fn digits_of(value: &Value) -> Option<u64> {
    value.as_str().and_then(digits)
}

/// The change the dashboard should show, `(current - previous) / previous`, or null.
fn expected_change(current: &Value, previous: &Value) -> Value {
    match (current.as_f64(), previous.as_f64()) {
        (Some(c), Some(p)) if p > 0.0 => json!((c - p) / p),
        _ => Value::Null,
    }
}

/// Checks the KPI strip against `summary` (current) and `previous`.
fn assert_kpis(setup: &Setup, want: &Value, previous: &Value, what: &str) {
    let got = setup.kpis();
    for kpi in KPIS {
        assert_json_eq(
            &got[kpi]["value"],
            &want[kpi],
            &format!("{what}: KPI {kpi}"),
        );
        assert_json_eq(
            &got[kpi]["change"],
            &expected_change(&want[kpi], &previous[kpi]),
            &format!("{what}: change of KPI {kpi}"),
        );
        if kpi != "load_time_ms_median" {
            assert_eq!(
                digits(got[kpi]["text"].as_str().unwrap_or_default()),
                want[kpi].as_u64(),
                "{what}: KPI {kpi} as shown: {}",
                got[kpi]
            );
        }
    }
}

/// Checks `#table-<name>` against the expected rows (key, page views, visits).
fn assert_table(setup: &Setup, name: &str, want: &[(String, usize, usize)], what: &str) {
    let got = setup.table(name);
    let got: Vec<(String, Option<u64>, Option<u64>)> = got
        .iter()
        .map(|r| (r[0].clone(), digits(&r[1]), digits(&r[2])))
        .collect();
    let want: Vec<(String, Option<u64>, Option<u64>)> = want
        .iter()
        .map(|(k, p, v)| (k.clone(), Some(*p as u64), Some(*v as u64)))
        .collect();
    assert_eq!(got, want, "{what}: #table-{name}");
}

fn the_dashboard_shows_the_known_answers_and_narrows_to_a_page() {
    let now = now_ms();
    let hits = data_set(now);
    let setup = Setup::start(&hits, Metrics::Protected);
    // Beacons to the collector (written to another database than the data set's), then a
    // scrape of the metrics JSON the health panel reads.
    let sent = send_beacon_mix(setup.port, 5);
    let metrics = setup.metrics_json();
    for (outcome, n) in &sent {
        assert_eq!(
            metrics["beacons"][outcome].as_u64(),
            Some(*n),
            "the scrape counts what was sent: {outcome}: {metrics}"
        );
    }
    assert_eq!(metrics["writes"]["failed"], 2, "{metrics}");
    setup.open(&format!("domain={DOMAIN}&period=7d"));
    setup.wait_health(sent[0].1, "desktop");

    // Nothing moved while the page loaded, the health panel included.
    setup.assert_no_layout_shift("desktop");

    // The health panel says what the scrape says.
    assert_health(&setup, &metrics, "desktop");
    let anonymous = request(
        setup.port,
        "GET",
        "/analytics/metrics?format=json",
        "127.0.0.1",
        None,
    );
    assert_eq!(anonymous.status, 401, "the metrics are protected too");

    // The report API is protected: without the login, nothing.
    let anonymous = request(
        setup.port,
        "GET",
        &format!("/analytics/report?report=summary&domain={DOMAIN}"),
        "127.0.0.1",
        None,
    );
    assert_eq!(anonymous.status, 401, "{}", anonymous.body_text());

    // `period=7d` is [now - 7d, now) on nginx's clock; the data set keeps clear of the 7-day
    // boundary, and its newest hits are older than this test.
    let week = Expected::new(&hits, now - 7 * DAY, now + DAY, None);
    let before = Expected::new(&hits, now - 14 * DAY, now - 7 * DAY, None);
    assert_kpis(&setup, &week.summary(), &before.summary(), "7d");

    let pages = week.table(KEYED_TABLES[0].1, 10);
    let first = setup.table("pages")[0][0].clone();
    assert_eq!(first, pages[0].0, "the first top page");
    for (name, key) in KEYED_TABLES {
        assert_table(&setup, name, &week.table(key, 10), "7d");
    }
    let events: Vec<(String, Option<u64>)> = week.events()["rows"]
        .as_array()
        .expect("event rows")
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap().to_string(),
                r["count"].as_u64(),
            )
        })
        .collect();
    let shown: Vec<(String, Option<u64>)> = setup
        .table("events")
        .iter()
        .map(|r| (r[0].clone(), digits(&r[1])))
        .collect();
    assert_eq!(shown, events, "#table-events");

    // The CSV downloads, fetched as the browser would (with the login it holds).
    for (name, key) in KEYED_TABLES {
        let csv = setup.csv(name);
        assert_eq!(csv["status"], 200, "CSV of {name}: {csv}");
        assert_eq!(csv["type"], "text/csv; charset=utf-8", "CSV of {name}");
        assert_eq!(
            csv["body"].as_str().unwrap_or_default(),
            rows_csv(&week.table(key, 1000)),
            "CSV of {name} ({})",
            csv["href"]
        );
        let href = csv["href"].as_str().unwrap_or_default();
        for part in [
            format!("report={name}"),
            format!("domain={DOMAIN}"),
            "period=7d".to_string(),
            "format=csv".to_string(),
            "limit=1000".to_string(),
        ] {
            assert!(href.contains(&part), "{part} in the CSV link {href}");
        }
        assert!(
            csv["download"]
                .as_str()
                .is_some_and(|d| d.starts_with(name) && d.ends_with(".csv")),
            "{csv}"
        );
    }
    let csv = setup.csv("events");
    assert_eq!(csv["status"], 200, "CSV of events: {csv}");
    let lines: Vec<&str> = csv["body"].as_str().unwrap_or_default().lines().collect();
    assert_eq!(lines.first(), Some(&"event,count,value_sum"), "{csv}");
    let want_events = week.events();
    let want_rows = want_events["rows"].as_array().unwrap();
    assert_eq!(lines.len() - 1, want_rows.len(), "{csv}");
    for (line, want) in lines[1..].iter().zip(want_rows) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields[0], want["event"], "{line}");
        assert_eq!(
            fields[1].parse::<u64>().ok(),
            want["count"].as_u64(),
            "{line}"
        );
        let sum = if fields[2].is_empty() {
            Value::Null
        } else {
            json!(fields[2].parse::<f64>().expect("a number"))
        };
        assert_json_eq(&sum, &want["value_sum"], line);
    }

    // The realtime pill: the last 5 minutes (the data set's newest hits are a minute old, the
    // ones before them at least 10 minutes).
    let recent = Expected::new(&hits, now - 5 * 60_000, now + DAY, None);
    let want_live = recent.summary();
    let mut live = Value::Null;
    let shown_live = wait_until(WAIT, || {
        live = setup.js("return {...document.getElementById('realtime').dataset}");
        live.get("visits").is_some()
    });
    assert!(shown_live, "realtime: {live}");
    assert_eq!(
        (digits_of(&live["visits"]), digits_of(&live["pageviews"])),
        (
            want_live["visits"].as_u64(),
            want_live["pageviews"].as_u64()
        ),
        "realtime: {live}"
    );
    let chart = setup.js(
        "return [...document.querySelectorAll('#chart path[data-series]')].map((p) => p.dataset.series)",
    );
    for series in ["pageviews", "visits", "previous"] {
        assert!(
            chart.as_array().unwrap().contains(&json!(series)),
            "{series} in {chart}"
        );
    }
    // "Page views per day, N intervals, TOTAL in total".
    let label = setup.js("return document.querySelector('#chart svg').getAttribute('aria-label')");
    let total = label
        .as_str()
        .and_then(|l| l.rsplit(", ").next())
        .filter(|t| t.ends_with(" in total"))
        .and_then(digits);
    assert_eq!(
        total,
        Some(week.views().count() as u64),
        "the chart's total: {label}"
    );

    // The realtime refresh (here: the page becoming visible again) refreshes the panel.
    let more = send_beacon_mix(setup.port, 3);
    let refreshed = setup.metrics_json();
    let accepted = refreshed["beacons"]["accepted"].as_u64().expect("accepted");
    assert_eq!(accepted, sent[0].1 + more[0].1, "{refreshed}");
    setup.js("document.dispatchEvent(new Event('visibilitychange'))");
    setup.wait_health(accepted, "refreshed");
    assert_health(&setup, &refreshed, "refreshed");

    save_screenshot(&setup);

    // A click on the first top page narrows the whole dashboard to it.
    setup
        .browser
        .click("#table-pages tbody tr:first-child button.rowlink");
    let hash_has_page = wait_until(WAIT, || {
        setup.js("return new URLSearchParams(location.hash.slice(1)).get('page')") == json!(first)
    });
    assert!(
        hash_has_page,
        "the page is in the URL: {}",
        setup.browser.url()
    );
    setup.wait_loaded("narrowed to a page");
    let page_week = Expected::new(&hits, now - 7 * DAY, now + DAY, Some(&first));
    let page_before = Expected::new(&hits, now - 14 * DAY, now - 7 * DAY, Some(&first));
    assert_kpis(
        &setup,
        &page_week.summary(),
        &page_before.summary(),
        &format!("7d, page {first}"),
    );
    assert_table(
        &setup,
        "pages",
        &page_week.table(KEYED_TABLES[0].1, 10),
        "narrowed",
    );
    assert_table(
        &setup,
        "referrers",
        &page_week.table(KEYED_TABLES[1].1, 10),
        "narrowed",
    );
    assert!(setup.shown("page-filter"), "the page filter is shown");
    assert_eq!(
        setup.js("return document.getElementById('page-filter-path').textContent"),
        json!(first)
    );
    let csv = setup.csv("pages");
    assert_eq!(
        csv["body"].as_str().unwrap_or_default(),
        rows_csv(&page_week.table(KEYED_TABLES[0].1, 1000)),
        "CSV of the narrowed pages: {}",
        csv["href"]
    );
    let page_arg = format!(
        "&page={}",
        form_urlencoded::byte_serialize(first.as_bytes()).collect::<String>()
    );
    let access = setup.nginx.access_log();
    assert!(
        access
            .lines()
            .any(|l| l.contains("GET /analytics/report?report=summary&") && l.contains(&page_arg)),
        "the summary was asked with {page_arg}:\n{access}"
    );

    // The observer sees a shift when there is one: the control for the check above.
    let control = setup.browser.execute_async(
        "const done = arguments[arguments.length - 1];
         const seen = [];
         new PerformanceObserver((list) => seen.push(...list.getEntries()))
           .observe({ type: 'layout-shift' });
         const block = document.createElement('div');
         block.style.height = '200px';
         document.getElementById('main').prepend(block);
         requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(() => {
           block.remove();
           done(seen.reduce((sum, e) => sum + e.value, 0));
         }, 100)));",
        json!([]),
    );
    assert!(
        control.as_f64().is_some_and(|v| v > 0.01),
        "a 200 px block pushed in at the top is seen as a layout shift: {control}"
    );

    // On a phone screen too, nothing moves while loading, and the numbers are the same.
    setup.browser.cdp(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
    );
    setup.open(&format!("domain={DOMAIN}&period=7d"));
    setup.wait_health(accepted, "phone");
    setup.assert_no_layout_shift("phone");
    assert_kpis(&setup, &week.summary(), &before.summary(), "7d on a phone");
    assert_eq!(
        setup.table("pages")[0][0],
        first,
        "the first top page on a phone"
    );
    setup
        .browser
        .cdp("Emulation.clearDeviceMetricsOverride", json!({}));
    setup.nginx.assert_no_crash_in_log();
}

/// Takes the screenshot: the whole page at desktop width, light mode, no animation. It goes to
/// `target/dashboard.png`, and to the README's `docs/dashboard.png` with
/// `NGX_ANALYTICS_UPDATE_SCREENSHOT=1` (so that a test run leaves the work tree as it was).
fn save_screenshot(setup: &Setup) {
    setup.browser.cdp(
        "Emulation.setEmulatedMedia",
        json!({"features": [
            {"name": "prefers-color-scheme", "value": "light"},
            {"name": "prefers-reduced-motion", "value": "reduce"}
        ]}),
    );
    let metrics = |height: u64| {
        setup.browser.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": DESKTOP_WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
    };
    metrics(900);
    let height = setup
        .js("return document.documentElement.scrollHeight")
        .as_u64()
        .expect("the page's height");
    metrics(height);
    let size = setup.js("return [document.documentElement.clientWidth, innerHeight,
                 matchMedia('(prefers-color-scheme: dark)').matches]");
    assert_eq!(
        size[0], DESKTOP_WIDTH,
        "desktop width, no scroll bar: {size}"
    );
    assert_eq!(size[1], height, "the whole page: {size}");
    assert_eq!(size[2], false, "light mode: {size}");
    // The chart redraws for the new size in an animation frame: wait for it to be drawn.
    let drawn = wait_until(WAIT, || {
        setup.js(
            "return new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(() =>
               ok(document.querySelector('#chart path[data-series=pageviews]') !== null))))",
        ) == true
    });
    assert!(drawn, "the chart is drawn");
    let png = setup.browser.screenshot_png();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let dir = match std::env::var_os("NGX_ANALYTICS_UPDATE_SCREENSHOT") {
        Some(_) => "docs",
        None => "target",
    };
    let path = format!("{}/{dir}/dashboard.png", env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"))).expect(dir);
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    eprintln!(
        "saved {path}: {DESKTOP_WIDTH}x{height}, {} bytes",
        png.len()
    );
    setup
        .browser
        .cdp("Emulation.clearDeviceMetricsOverride", json!({}));
}

fn an_empty_database_shows_the_empty_state() {
    let setup = Setup::start(&[], Metrics::Absent);
    setup.open("");
    // No metrics location: the page asked, got 404, and shows no health panel and no error.
    let asked = wait_until(WAIT, || {
        setup
            .nginx
            .access_log()
            .contains("\"GET /analytics/metrics?format=json HTTP/1.1\" 404")
    });
    assert!(
        asked,
        "the page asks for the metrics:\n{}",
        setup.nginx.access_log()
    );
    assert!(!setup.shown("health"), "no health panel without metrics");
    assert!(setup.shown("empty-state"), "the empty state is shown");
    assert!(!setup.shown("dashboard"), "the dashboard is hidden");
    assert!(!setup.shown("error-banner"), "no error banner");
    let text = setup.js("return document.getElementById('empty-state').textContent");
    assert!(
        text.as_str().is_some_and(|t| t.contains("analytics_agent")),
        "it says how to start collecting: {text}"
    );
    // The dashboard's skeleton gives way to the shorter empty state without moving anything
    // (the page keeps its height, and the scroll bar's room).
    setup.assert_no_layout_shift("empty state");
    setup.nginx.assert_no_crash_in_log();
}

fn influxdb_stopped_shows_the_error_banner() {
    let now = now_ms();
    let hits = data_set(now);
    let mut setup = Setup::start(&hits[..300], Metrics::Denied);
    setup.open(&format!("domain={DOMAIN}&period=7d"));
    // The metrics location refuses the page (403): no health panel, and no banner for it.
    let asked = wait_until(WAIT, || {
        setup
            .nginx
            .access_log()
            .contains("\"GET /analytics/metrics?format=json HTTP/1.1\" 403")
    });
    assert!(
        asked,
        "the page asks for the metrics:\n{}",
        setup.nginx.access_log()
    );
    assert!(!setup.shown("health"), "no health panel when refused");
    assert!(
        !setup.shown("error-banner"),
        "no banner while InfluxDB runs"
    );
    setup.influx.stop();

    // The open dashboard, asked for another period.
    setup.browser.click("#period button[data-period='30d']");
    setup.wait_loaded("30d with InfluxDB stopped");
    let banner = |what: &str| {
        assert!(
            setup.shown("error-banner"),
            "{what}: the error banner is shown"
        );
        let state = setup.js("const b = document.getElementById('error-banner');
             return { status: b.dataset.status, text: b.textContent };");
        assert_eq!(state["status"], "502", "{what}: {state}");
        assert!(
            state["text"]
                .as_str()
                .is_some_and(|t| t.contains("InfluxDB")),
            "{what}: it names the database: {state}"
        );
    };
    banner("period changed");
    // A fresh load.
    setup.open(&format!("domain={DOMAIN}&period=7d"));
    banner("fresh load");
    assert!(setup
        .nginx
        .wait_for_log("report query failed", Duration::from_secs(5)));
    setup.nginx.assert_no_crash_in_log();
}

fn main() {
    let tests: [(&str, fn()); 3] = [
        (
            "the_dashboard_shows_the_known_answers_and_narrows_to_a_page",
            the_dashboard_shows_the_known_answers_and_narrows_to_a_page,
        ),
        (
            "an_empty_database_shows_the_empty_state",
            an_empty_database_shows_the_empty_state,
        ),
        (
            "influxdb_stopped_shows_the_error_banner",
            influxdb_stopped_shows_the_error_banner,
        ),
    ];
    common::run_tests(&tests);
}
