//! The browser agent (`agent/analytics.js`, served by `analytics_agent;`) in a real headless
//! Chromium, driven through chromedriver, against a real nginx with the module writing to a real
//! InfluxDB 1.x: page views, events, Do Not Track / Global Privacy Control, single-page
//! navigation, the 502 retry, and the agent's size budget.
//!
//! The browser resolves `www.example.com` (the site) and `news.example.org` (another site that
//! links to it) to 127.0.0.1, so pages are loaded as `http://www.example.com:<port>/...`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};

use common::webdriver::{Browser, BrowserOptions};
use common::{free_port, request, wait_until, FakeSink, Influx, Nginx, TestDir};

const DB: &str = "analytics";
const SITE: &str = "www.example.com";
const NEWS: &str = "news.example.org";
/// Bound of every wait for a beacon, a point or a page.
const WAIT: Duration = Duration::from_secs(5);
/// Hard budget of the served agent after `gzip -9`.
const GZIP_BUDGET: usize = 1024;

const AGENT_TAG: &str = r#"<script src="/analytics/agent.js" defer></script>"#;
/// The queue stub documented in the README, for calls before the agent has loaded.
const STUB: &str = "<script>window.recordEvent=window.recordEvent||function(){\
    (window.recordEvent.q=window.recordEvent.q||[]).push(arguments)}</script>";
/// Records every uncaught error and unhandled rejection of the page in `window.pageErrors`.
const CAPTURE_ERRORS: &str = r#"<script>window.pageErrors=[];
addEventListener("error",e=>pageErrors.push("error: "+e.message));
addEventListener("unhandledrejection",e=>pageErrors.push("unhandled rejection: "+e.reason));
</script>"#;

/// Browser tests run one at a time: each runs Chromium, nginx and InfluxDB.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A complete page: error capture first, then `head`, then `body`.
fn page(head: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>test</title>\
         <link rel=\"icon\" href=\"data:,\">\n{CAPTURE_ERRORS}\n{head}\n</head>\n\
         <body>\n{body}\n</body></html>\n"
    )
}

fn agent_source() -> Vec<u8> {
    let path = format!("{}/agent/analytics.js", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[derive(Default)]
struct SiteOptions {
    /// Relay the writes through a [`FakeSink`] in forwarding mode (to inject sink failures).
    through_sink: bool,
    /// Chromium preferences.
    prefs: Option<Value>,
    /// Environment of the browser.
    env: Vec<(String, String)>,
    /// Extra lines in the nginx `server` block.
    server_extra: String,
}

/// Chromium + nginx (serving the pages, the agent and the endpoint) + InfluxDB.
/// Fields drop in declaration order: the browser first, the lock last.
struct Site {
    browser: Browser,
    nginx: Nginx,
    sink: Option<FakeSink>,
    influx: Influx,
    _pages: TestDir,
    port: u16,
    _lock: MutexGuard<'static, ()>,
}

impl Site {
    /// Writes `pages` (path relative to the document root, HTML with `@PORT@` standing for the
    /// nginx port) and starts everything.
    fn start(pages: &[(&str, String)], opts: SiteOptions) -> Site {
        let lock = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let influx = Influx::start();
        influx.create_database(DB);
        let sink = opts.through_sink.then(|| {
            let sink = FakeSink::start();
            sink.set_forward(Some(&influx.addr()));
            sink
        });
        let write_port = sink.as_ref().map_or(influx.port(), FakeSink::port);
        let port = free_port();
        let root = TestDir::new("pages");
        for (path, html) in pages {
            let file = root.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(file.parent().unwrap()).expect("creating a page directory");
            std::fs::write(&file, html.replace("@PORT@", &port.to_string()))
                .expect("writing a page");
        }
        let write_location =
            common::write_location(&format!("http://influxdb/write?db={DB}&precision=ns"), "5s");
        let conf = format!(
            r#"
upstream influxdb {{
    server 127.0.0.1:{write_port};
    keepalive 4;
}}
server {{
    listen 127.0.0.1:{port};
    server_name {SITE} {NEWS};
    root {root};
    permitted_events socialclick;
    # The browser is HeadlessChrome, which the module drops as a bot by default.
    analytics_drop_bots off;
    {server_extra}
    location = /analytics/agent.js {{
        analytics_agent;
    }}
    location = /analytics/collect {{
        analytics;
    }}
    location /app/ {{
        try_files /app.html =404;
    }}
{write_location}
}}
"#,
            root = root.path().display(),
            server_extra = opts.server_extra,
        );
        let nginx = Nginx::start(&conf);
        let browser = Browser::start(BrowserOptions {
            hosts: vec![SITE.to_string(), NEWS.to_string()],
            prefs: opts.prefs,
            extra_args: vec![],
            env: opts.env,
        });
        Site {
            browser,
            nginx,
            sink,
            influx,
            _pages: root,
            port,
            _lock: lock,
        }
    }

    /// `http://www.example.com:<port><path>`.
    fn url(&self, path: &str) -> String {
        format!("http://{SITE}:{}{path}", self.port)
    }

    /// Opens `path` on the site and waits for its load event.
    fn open(&self, path: &str) {
        self.browser.goto(&self.url(path));
    }

    /// Runs `script` in the page.
    fn js(&self, script: &str) -> Value {
        self.browser.execute(script, json!([]))
    }

    /// Every point of `measurement`, oldest first.
    fn points(&self, measurement: &str) -> Vec<Map<String, Value>> {
        self.influx
            .rows(DB, &format!("SELECT * FROM \"{measurement}\""))
    }

    /// Waits (≤ 5 s) until `measurement` holds `n` points, then 300 ms more to catch extra
    /// ones; returns them (panics unless there are exactly `n`).
    fn expect_points(&self, measurement: &str, n: usize) -> Vec<Map<String, Value>> {
        let mut count = 0;
        wait_until(WAIT, || {
            count = self.points(measurement).len();
            count >= n
        });
        std::thread::sleep(Duration::from_millis(300));
        let points = self.points(measurement);
        assert_eq!(
            points.len(),
            n,
            "expected {n} points in {measurement}, found {}: {points:#?}\naccess log:\n{}",
            points.len(),
            self.nginx.access_log()
        );
        points
    }

    /// Access-log lines of beacons (`POST /analytics/collect`).
    fn beacon_requests(&self) -> Vec<String> {
        self.nginx
            .access_log()
            .lines()
            .filter(|l| l.contains("\"POST /analytics/collect "))
            .map(str::to_string)
            .collect()
    }

    /// Waits (≤ 5 s) until nginx has logged `n` beacon requests; returns them.
    fn wait_for_beacons(&self, n: usize) -> Vec<String> {
        wait_until(WAIT, || self.beacon_requests().len() >= n);
        self.beacon_requests()
    }

    /// The page caught no error or unhandled rejection, and the browser log has no console
    /// output and no error other than the network's own report of a failed request (which
    /// the agent cannot silence, e.g. the 502 it retries).
    fn assert_page_clean(&self) {
        let errors = self.js("return window.pageErrors || ['pageErrors missing']");
        assert_eq!(errors, json!([]), "the page caught errors");
        let noisy: Vec<String> = self
            .browser
            .log()
            .into_iter()
            .filter(|e| e.source == "console-api" || (e.level == "SEVERE" && e.source != "network"))
            .map(|e| format!("{} {}: {}", e.level, e.source, e.message))
            .collect();
        assert!(noisy.is_empty(), "browser log entries: {noisy:#?}");
    }

    fn measurements(&self) -> Vec<String> {
        self.influx
            .rows(DB, "SHOW MEASUREMENTS")
            .into_iter()
            .filter_map(|r| r.get("name").and_then(Value::as_str).map(str::to_string))
            .collect()
    }
}

fn str_of<'a>(row: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    row.get(key).and_then(Value::as_str)
}

fn absent(row: &Map<String, Value>, key: &str) -> bool {
    row.get(key).is_none_or(Value::is_null)
}

/// A page with the agent, a share button, and a button sending an event that is not permitted.
fn share_page(head_extra: &str) -> String {
    page(
        &format!("{head_extra}\n{AGENT_TAG}"),
        r#"<h1>Share buttons</h1>
<button id="share" onclick='recordEvent("socialclick", "mastodon"); document.title = "shared"'>Share on Mastodon</button>
<button id="bad" onclick='recordEvent("notpermitted"); document.title = "clicked"'>Not permitted</button>"#,
    )
}

#[test]
fn the_served_agent_is_the_source_byte_for_byte_and_within_the_gzip_budget() {
    let port = free_port();
    let _nginx = Nginx::start(&format!(
        "server {{ listen 127.0.0.1:{port}; \
         location = /analytics/agent.js {{ analytics_agent; }} }}"
    ));
    let response = request(port, "GET", "/analytics/agent.js", SITE, None);
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert!(
        response.body == agent_source(),
        "the served agent differs from agent/analytics.js"
    );

    let mut gzip = Command::new("/bin/gzip")
        .args(["-9", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running /bin/gzip -9 -c");
    gzip.stdin
        .take()
        .unwrap()
        .write_all(&response.body)
        .expect("writing to gzip");
    let out = gzip.wait_with_output().expect("reading gzip's output");
    assert!(out.status.success(), "gzip failed: {}", out.status);
    eprintln!(
        "agent: {} bytes, {} bytes after gzip -9 (budget {GZIP_BUDGET})",
        response.body.len(),
        out.stdout.len()
    );
    assert!(
        out.stdout.len() <= GZIP_BUDGET,
        "the agent is {} bytes after gzip -9, over the budget of {GZIP_BUDGET}",
        out.stdout.len()
    );
}

#[test]
fn page_views_carry_the_path_the_referrer_host_the_load_time_and_one_session() {
    let posts = page(
        AGENT_TAG,
        r#"<p>Hello</p><a id="next" href="/posts/second.html">next</a>"#,
    );
    let site = Site::start(
        &[
            (
                "news.html",
                page(
                    "",
                    r#"<a id="go" href="http://www.example.com:@PORT@/posts/hello.html?utm_source=news&id=7#comments">read</a>"#,
                ),
            ),
            ("posts/hello.html", posts.clone()),
            ("posts/second.html", posts),
        ],
        SiteOptions {
            // UTC+5:30 all year: getTimezoneOffset() is -330.
            env: vec![("TZ".into(), "Asia/Kolkata".into())],
            ..Default::default()
        },
    );
    let b = &site.browser;
    b.goto(&format!("http://{NEWS}:{}/news.html", site.port));
    b.click("#go");
    b.wait_for_page(&site.url("/posts/hello.html?utm_source=news"), WAIT);
    let first = site.expect_points("pf_analytics", 1).remove(0);

    let platform = site.js("return navigator.platform");
    let timezone = site.js("return String(new Date().getTimezoneOffset())");
    assert_eq!(timezone, "-330");
    let stored_sess = site.js("return sessionStorage.getItem('na_sess')");
    assert_eq!(
        site.js("return document.cookie"),
        "",
        "the agent sets no cookie"
    );

    assert_eq!(str_of(&first, "domain"), Some(SITE));
    assert_eq!(str_of(&first, "page"), Some("/posts/hello.html"));
    assert_eq!(str_of(&first, "referrer"), Some(NEWS));
    assert_eq!(str_of(&first, "type"), Some("pageview"));
    assert_eq!(first.get("platform"), Some(&platform));
    assert_eq!(first.get("timezone"), Some(&timezone));
    assert_eq!(first["pages_viewed"], 1);
    assert_eq!(first["counter"], 1);
    let load_time = first["load_time"].as_f64().expect("load_time is stored");
    assert!(
        load_time > 0.0 && load_time < 15_000.0,
        "load_time {load_time}"
    );
    let sess = str_of(&first, "sess")
        .expect("a session (sess field)")
        .to_string();
    assert!(!sess.is_empty() && sess.len() <= 64, "sess {sess:?}");
    assert_eq!(
        stored_sess,
        sess.as_str(),
        "sess_id lives in sessionStorage"
    );

    b.click("#next");
    b.wait_for_page(&site.url("/posts/second.html"), WAIT);
    let points = site.expect_points("pf_analytics", 2);
    let second = &points[1];
    assert_eq!(str_of(second, "page"), Some("/posts/second.html"));
    assert!(
        absent(second, "referrer"),
        "a referrer from the same host is not sent: {second:?}"
    );
    assert_eq!(second["pages_viewed"], 2);
    assert_eq!(
        str_of(second, "sess"),
        Some(sess.as_str()),
        "same tab, same session"
    );
    assert!(second["load_time"].as_f64().is_some_and(|t| t > 0.0));
    assert_eq!(site.wait_for_beacons(2).len(), 2);
    site.assert_page_clean();
}

#[test]
fn data_no_session_leaves_out_the_session() {
    let site = Site::start(
        &[(
            "plain.html",
            page(
                r#"<script src="/analytics/agent.js" data-no-session defer></script>"#,
                "<p>no session</p>",
            ),
        )],
        SiteOptions::default(),
    );
    site.open("/plain.html");
    let point = site.expect_points("pf_analytics", 1).remove(0);
    assert_eq!(str_of(&point, "page"), Some("/plain.html"));
    assert!(absent(&point, "sess"), "no sess expected: {point:?}");
    assert!(
        absent(&point, "referrer"),
        "no referrer expected: {point:?}"
    );
    assert_eq!(point["pages_viewed"], 1);
    assert_eq!(
        site.js("return sessionStorage.getItem('na_sess')"),
        Value::Null
    );
    site.assert_page_clean();
}

#[test]
fn a_share_click_is_an_event_point_and_an_event_not_permitted_lands_nowhere() {
    // An event recorded through the queue stub before the agent loaded is sent too.
    let head = format!("{STUB}\n<script>recordEvent(\"socialclick\", \"queued\", 3)</script>");
    let site = Site::start(
        &[("posts/share.html", share_page(&head))],
        SiteOptions::default(),
    );
    site.open("/posts/share.html");
    site.expect_points("pf_analytics", 1);
    let queued = site.expect_points("pf_analytics_event", 1).remove(0);
    assert_eq!(str_of(&queued, "note"), Some("queued"));
    assert_eq!(queued["value"], 3.0);

    site.browser.click("#share");
    let events = site.expect_points("pf_analytics_event", 2);
    let share = &events[1];
    assert_eq!(str_of(share, "event"), Some("socialclick"));
    assert_eq!(str_of(share, "note"), Some("mastodon"));
    assert_eq!(str_of(share, "page"), Some("/posts/share.html"));
    assert_eq!(str_of(share, "domain"), Some(SITE));
    assert_eq!(str_of(share, "type"), Some("event"));
    assert!(absent(share, "value"));
    assert_eq!(
        share.get("sess"),
        site.points("pf_analytics")[0].get("sess")
    );
    assert_eq!(site.js("return document.title"), "shared");

    site.browser.click("#bad");
    let beacons = site.wait_for_beacons(4);
    assert_eq!(beacons.len(), 4, "{beacons:#?}");
    assert!(
        beacons[3].contains("\" 422 "),
        "the module refuses the event: {}",
        beacons[3]
    );
    assert_eq!(
        site.js("return document.title"),
        "clicked",
        "the click handler ran past recordEvent"
    );
    site.expect_points("pf_analytics_event", 2);
    site.expect_points("pf_analytics", 1);
    site.assert_page_clean();
}

/// On the loaded share page: clicks both buttons and asserts that nothing was sent or stored.
fn assert_nothing_is_sent(site: &Site) {
    assert_eq!(site.js("return typeof recordEvent"), "function");
    site.browser.click("#share");
    site.browser.click("#bad");
    assert_eq!(site.js("return document.title"), "clicked");
    // A page view would have been sent at the load event, before open() returned.
    std::thread::sleep(Duration::from_millis(1500));
    let log = site.nginx.access_log();
    assert!(
        log.contains("\"GET /analytics/agent.js HTTP/1.1\" 200 "),
        "the agent was loaded:\n{log}"
    );
    assert!(
        site.beacon_requests().is_empty(),
        "beacons were sent:\n{log}"
    );
    assert!(
        site.measurements().is_empty(),
        "points were stored: {:?}",
        site.measurements()
    );
    assert_eq!(site.js("return sessionStorage.length"), 0, "nothing stored");
    site.assert_page_clean();
}

#[test]
fn do_not_track_suppresses_everything() {
    let site = Site::start(
        &[("share.html", share_page(""))],
        SiteOptions {
            prefs: Some(json!({ "enable_do_not_track": true })),
            ..Default::default()
        },
    );
    site.open("/share.html");
    assert_eq!(site.js("return navigator.doNotTrack"), "1");
    assert_nothing_is_sent(&site);
}

#[test]
fn global_privacy_control_suppresses_everything() {
    let gpc = "<script>Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', \
               { get: () => true, configurable: true })</script>";
    let site = Site::start(&[("share.html", share_page(gpc))], SiteOptions::default());
    site.open("/share.html");
    assert_eq!(site.js("return navigator.globalPrivacyControl"), true);
    assert_ne!(site.js("return navigator.doNotTrack"), "1");
    assert_nothing_is_sent(&site);
}

#[test]
fn single_page_navigation_sends_a_page_view_per_new_path_only() {
    let app = page(&format!("{STUB}\n{AGENT_TAG}"), "<p>single-page app</p>");
    let site = Site::start(&[("app.html", app)], SiteOptions::default());
    site.open("/app/one?from=start");
    site.expect_points("pf_analytics", 1);

    site.js("history.pushState({}, '', '/app/two?tab=1')");
    site.expect_points("pf_analytics", 2);

    // Same path again: a fragment, another query, replaceState.
    site.js("history.pushState({}, '', '/app/two#comments')");
    site.js("history.replaceState({}, '', '/app/two?tab=2')");
    site.expect_points("pf_analytics", 2);

    // Back to /app/two (same path: nothing), then to /app/one (a new path: a page view).
    let back = "const done = arguments[arguments.length - 1];\
                addEventListener('popstate', () => done(location.pathname), { once: true });\
                history.back();";
    assert_eq!(site.browser.execute_async(back, json!([])), "/app/two");
    site.expect_points("pf_analytics", 2);
    assert_eq!(site.browser.execute_async(back, json!([])), "/app/one");
    let points = site.expect_points("pf_analytics", 3);

    let pages: Vec<&str> = points.iter().filter_map(|p| str_of(p, "page")).collect();
    assert_eq!(pages, ["/app/one", "/app/two", "/app/one"]);
    let viewed: Vec<&Value> = points.iter().map(|p| &p["pages_viewed"]).collect();
    assert_eq!(viewed, [1, 2, 3]);
    assert!(points[0]["load_time"].as_f64().is_some_and(|t| t > 0.0));
    assert!(
        absent(&points[1], "load_time") && absent(&points[2], "load_time"),
        "single-page views have no load time: {points:#?}"
    );
    let sessions: Vec<Option<&str>> = points.iter().map(|p| str_of(p, "sess")).collect();
    assert!(sessions[0].is_some() && sessions.iter().all(|s| *s == sessions[0]));
    assert_eq!(site.wait_for_beacons(3).len(), 3);
    site.assert_page_clean();
}

#[test]
fn a_single_502_is_retried_once_and_the_point_lands() {
    let site = Site::start(
        &[("retry.html", page(AGENT_TAG, "<p>retry</p>"))],
        SiteOptions {
            through_sink: true,
            ..Default::default()
        },
    );
    let sink = site.sink.as_ref().unwrap();
    sink.push_response(500, r#"{"error":"injected failure"}"#);
    site.open("/retry.html");
    // The retry comes 1-2 s after the 502.
    let point = site.expect_points("pf_analytics", 1).remove(0);
    assert_eq!(str_of(&point, "page"), Some("/retry.html"));
    std::thread::sleep(Duration::from_millis(2500));
    site.expect_points("pf_analytics", 1);

    let writes = sink.requests();
    assert_eq!(writes.len(), 2, "the sink saw {} writes", writes.len());
    // The same point, retried (the module gives each write its own timestamp).
    let series_and_fields = |body: &[u8]| {
        let line = String::from_utf8_lossy(body).trim_end().to_string();
        line.rsplit_once(' ').map(|(head, _)| head.to_string())
    };
    assert_eq!(
        series_and_fields(&writes[0].body),
        series_and_fields(&writes[1].body),
        "the retry carries the same beacon"
    );
    let beacons = site.beacon_requests();
    assert_eq!(beacons.len(), 2, "{beacons:#?}");
    assert!(beacons[0].contains("\" 502 "), "{}", beacons[0]);
    assert!(beacons[1].contains("\" 204 "), "{}", beacons[1]);
    site.assert_page_clean();
}

#[test]
fn data_endpoint_overrides_the_collector() {
    let site = Site::start(
        &[(
            "custom.html",
            page(
                r#"<script src="/analytics/agent.js" data-endpoint="/beacons/in" defer></script>"#,
                "<p>custom endpoint</p>",
            ),
        )],
        SiteOptions {
            server_extra: "location = /beacons/in { analytics; }".into(),
            ..Default::default()
        },
    );
    site.open("/custom.html");
    let point = site.expect_points("pf_analytics", 1).remove(0);
    assert_eq!(str_of(&point, "page"), Some("/custom.html"));
    assert!(site.beacon_requests().is_empty());
    assert!(site
        .nginx
        .access_log()
        .contains("\"POST /beacons/in HTTP/1.1\" 204 "));
    site.assert_page_clean();
}

#[test]
fn an_unreachable_endpoint_leaves_the_page_alone() {
    let closed = free_port();
    let tag = format!(
        r#"<script src="/analytics/agent.js" data-endpoint="http://127.0.0.1:{closed}/collect" defer></script>"#
    );
    let body = r#"<button id="share" onclick='recordEvent("socialclick", "mastodon"); document.title = "shared"'>Share</button>"#;
    let site = Site::start(&[("down.html", page(&tag, body))], SiteOptions::default());
    site.open("/down.html");
    site.browser.click("#share");
    assert_eq!(site.js("return document.title"), "shared");
    std::thread::sleep(Duration::from_millis(500));
    assert!(site.measurements().is_empty());
    site.assert_page_clean();
}
