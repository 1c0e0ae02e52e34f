//! The dashboard in real headless Chromium (driven over WebDriver), served by nginx with the
//! module (dashboard, report and query locations as in the README, behind `allow`/`deny` and
//! `auth_basic`), on the known data set of tests/reports.rs in a real InfluxDB: the KPI numbers,
//! the tables and the CSV downloads match the answers computed from the data set, a click on a
//! top page narrows the dashboard to that page, nothing shifts while loading, and the page
//! saves the README's screenshot (`docs/dashboard.png`, see `save_screenshot`). On an empty database it shows the empty state; with InfluxDB
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

use serde_json::{json, Value};

use common::webdriver::{Browser, BrowserOptions};
use common::{free_port, query_location, request, wait_until, Influx, Nginx, TestDir};
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
    /// desktop size in light mode.
    fn start(hits: &[Hit]) -> Setup {
        let influx = Influx::start();
        influx.create_database(DB);
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
{query}
}}
"#,
            influx_port = influx.port(),
            query = query_location(&format!("http://influxdb/query?db={DB}")),
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

    /// Whether `#id` is shown (not `hidden`, not inside a hidden ancestor).
    fn shown(&self, id: &str) -> bool {
        self.browser.execute(
            "const e = document.getElementById(arguments[0]);
             return !!e && e.getClientRects().length > 0;",
            json!([id]),
        ) == true
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
    let setup = Setup::start(&hits);
    setup.open(&format!("domain={DOMAIN}&period=7d"));

    // Nothing moved while the page loaded.
    setup.assert_no_layout_shift("desktop");

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
    let setup = Setup::start(&[]);
    setup.open("");
    assert!(setup.shown("empty-state"), "the empty state is shown");
    assert!(!setup.shown("dashboard"), "the dashboard is hidden");
    assert!(!setup.shown("error-banner"), "no error banner");
    let text = setup.js("return document.getElementById('empty-state').textContent");
    assert!(
        text.as_str().is_some_and(|t| t.contains("analytics_agent")),
        "it says how to start collecting: {text}"
    );
    // Not asserted: the dashboard's skeleton gives way to the shorter empty state, which moves
    // the footer up (and, when the page no longer scrolls, everything by the scroll bar's width).
    let shifts = setup.layout_shifts();
    let total = shifts
        .iter()
        .filter_map(|e| e["value"].as_f64())
        .fold(0.0, |sum, v| sum + v);
    eprintln!("empty state: layout shift {total}: {shifts:?}");
    setup.nginx.assert_no_crash_in_log();
}

fn influxdb_stopped_shows_the_error_banner() {
    let now = now_ms();
    let hits = data_set(now);
    let mut setup = Setup::start(&hits[..300]);
    setup.open(&format!("domain={DOMAIN}&period=7d"));
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
