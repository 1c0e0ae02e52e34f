//! `analytics_dashboard [report_uri];` against a real nginx with the module: the page served
//! from memory with its ETag (304, HEAD, 405), a Content-Security-Policy whose hashes match the
//! served inline script and style, the report URI written into the page (escaped), the gzip
//! size budget, configuration errors, and the page running under its own CSP in headless
//! Chromium.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::webdriver::{Browser, BrowserOptions};
use common::{free_port, nginx_test_config, request, wait_until, Conn, Nginx, TestDir};

const HOST: &str = "www.example.com";
/// Hard budget of the served page after `gzip -9`.
const GZIP_BUDGET: usize = 40 * 1024;

fn dashboard_source() -> String {
    let path = format!("{}/dashboard/dashboard.html", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// nginx with the dashboard at `/analytics/` (default report URI) and at `/stats/` (report URI
/// `/stats/api/report`), plus `extra` in the server block.
fn start(extra: &str) -> (Nginx, u16) {
    let port = free_port();
    let nginx = Nginx::start(&format!(
        "server {{
    listen 127.0.0.1:{port};
    location = /analytics/ {{ analytics_dashboard; }}
    location = /stats/ {{ analytics_dashboard /stats/api/report; }}
    {extra}
}}"
    ));
    (nginx, port)
}

/// The content of the one `<tag>` element of `html`.
fn inline(html: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    assert_eq!(html.matches(&format!("<{tag}")).count(), 1, "one <{tag}>");
    let start = html.find(&open).expect("opening tag without attributes") + open.len();
    let end = start + html[start..].find(&close).expect("closing tag");
    html[start..end].to_string()
}

/// `'sha256-...'` of `text`.
fn hash_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The sources of CSP directive `name`.
fn directive(csp: &str, name: &str) -> Vec<String> {
    let found: Vec<Vec<String>> = csp
        .split(';')
        .map(|d| d.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|d| d.first().map(String::as_str) == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "one {name} in {csp}");
    found[0][1..].to_vec()
}

/// The `content` of the page's `<meta name="analytics-report-uri">`.
fn report_uri_in(html: &str) -> &str {
    let marker = "<meta name=\"analytics-report-uri\" content=\"";
    let start = html.find(marker).expect("report URI element") + marker.len();
    &html[start..start + html[start..].find('"').expect("closing quote")]
}

fn gzip9(bytes: &[u8]) -> usize {
    let mut gzip = Command::new("/bin/gzip")
        .args(["-9", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running /bin/gzip -9 -c");
    gzip.stdin
        .take()
        .expect("gzip's stdin")
        .write_all(bytes)
        .expect("writing to gzip");
    let out = gzip.wait_with_output().expect("reading gzip's output");
    assert!(out.status.success(), "gzip failed: {}", out.status);
    out.stdout.len()
}

#[test]
fn the_page_is_served_from_memory_with_an_etag_304_head_and_405() {
    let (_nginx, port) = start("");
    let response = request(port, "GET", "/analytics/", HOST, None);
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert_eq!(
        response.body_text(),
        dashboard_source(),
        "the default page is the file byte for byte"
    );
    assert_eq!(
        response.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(response.header("cache-control"), Some("private, no-cache"));
    assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(response.header("referrer-policy"), Some("no-referrer"));
    let etag = response.header("etag").expect("ETag").to_string();
    assert!(
        etag.len() == 18 && etag.starts_with('"') && etag.ends_with('"'),
        "a strong ETag: {etag}"
    );

    let mut conn = Conn::open(port);
    let not_modified = conn.request(
        format!("GET /analytics/ HTTP/1.1\r\nHost: {HOST}\r\nIf-None-Match: {etag}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    // The same keepalive connection with a stale ETag gets the page again.
    let stale = conn.request(
        format!("GET /analytics/ HTTP/1.1\r\nHost: {HOST}\r\nIf-None-Match: \"0\"\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, response.body);

    let head = request(port, "HEAD", "/analytics/", HOST, None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(response.body.len().to_string().as_str())
    );
    assert_eq!(head.header("etag"), Some(etag.as_str()));

    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let refused = request(port, method, "/analytics/", HOST, Some(b"x"));
        assert_eq!(refused.status, 405, "{method}");
        assert_eq!(refused.header("allow"), Some("GET, HEAD"), "{method}");
        assert!(
            refused.header("content-security-policy").is_none(),
            "{method}: no page, no page headers"
        );
    }
}

#[test]
fn the_csp_header_allows_exactly_the_served_inline_script_and_style() {
    let (_nginx, port) = start("");
    let mut policies = Vec::new();
    for path in ["/analytics/", "/stats/"] {
        let response = request(port, "GET", path, HOST, None);
        assert_eq!(response.status, 200, "{path}");
        let html = response.body_text();
        let csp = response
            .header("content-security-policy")
            .expect("Content-Security-Policy")
            .to_string();
        assert_eq!(
            directive(&csp, "script-src"),
            [hash_source(&inline(&html, "script"))],
            "{path}: {csp}"
        );
        assert_eq!(
            directive(&csp, "style-src"),
            [hash_source(&inline(&html, "style"))],
            "{path}: {csp}"
        );
        assert_eq!(directive(&csp, "default-src"), ["'self'"]);
        assert_eq!(directive(&csp, "frame-ancestors"), ["'none'"]);
        assert_eq!(directive(&csp, "base-uri"), ["'none'"]);
        assert_eq!(directive(&csp, "form-action"), ["'none'"]);
        assert!(!csp.contains("unsafe"), "{csp}");
        let not_modified = Conn::open(port).request(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nIf-None-Match: {}\r\n\
                 Connection: close\r\n\r\n",
                response.header("etag").expect("ETag")
            )
            .as_bytes(),
        );
        assert_eq!(not_modified.status, 304, "{path}");
        assert_eq!(
            not_modified.header("content-security-policy"),
            Some(csp.as_str()),
            "{path}: the 304 carries the same policy"
        );
        policies.push(csp);
    }
    assert_eq!(
        policies[0], policies[1],
        "the report URI is outside the hashed script"
    );
}

#[test]
fn the_report_uri_is_written_into_the_page_escaped_and_changes_the_etag() {
    let (_nginx, port) = start(
        "location = /escaped/ { analytics_dashboard \"/it's&more/report\"; }
    location = /same/ { analytics_dashboard report; }",
    );
    let page = |path: &str| {
        let response = request(port, "GET", path, HOST, None);
        assert_eq!(response.status, 200, "{path}");
        let etag = response.header("etag").expect("ETag").to_string();
        (response.body_text(), etag)
    };
    let (default, default_etag) = page("/analytics/");
    let (same, same_etag) = page("/same/");
    let (stats, stats_etag) = page("/stats/");
    let (escaped, escaped_etag) = page("/escaped/");
    assert_eq!(report_uri_in(&default), "report");
    assert_eq!(report_uri_in(&same), "report");
    assert_eq!(report_uri_in(&stats), "/stats/api/report");
    assert_eq!(report_uri_in(&escaped), "/it&#39;s&amp;more/report");
    assert_eq!(default_etag, same_etag, "same page, same ETag");
    assert_ne!(default_etag, stats_etag);
    assert_ne!(stats_etag, escaped_etag);
    for (html, uri) in [
        (&stats, "/stats/api/report"),
        (&escaped, "/it&#39;s&amp;more/report"),
    ] {
        let meta = format!("<meta name=\"analytics-report-uri\" content=\"{uri}\">");
        assert_eq!(
            html.replacen(
                &meta,
                "<meta name=\"analytics-report-uri\" content=\"report\">",
                1
            ),
            default,
            "only the report URI differs"
        );
    }

    // A stale ETag from another location's page is not a match.
    let cross = Conn::open(port).request(
        format!(
            "GET /stats/ HTTP/1.1\r\nHost: {HOST}\r\nIf-None-Match: {default_etag}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(cross.status, 200);
}

#[test]
fn an_if_block_inside_the_location_still_serves_the_page() {
    let port = free_port();
    let _nginx = Nginx::start(&format!(
        "server {{
    listen 127.0.0.1:{port};
    location = /stats/ {{
        analytics_dashboard /stats/api/report;
        if ($arg_x) {{ set $marker 1; }}
    }}
}}"
    ));
    let response = request(port, "GET", "/stats/?x=1", HOST, None);
    assert_eq!(response.status, 200, "{}", response.body_text());
    assert_eq!(report_uri_in(&response.body_text()), "/stats/api/report");
}

#[test]
fn the_page_is_within_its_gzip_budget() {
    let (_nginx, port) = start("");
    for path in ["/analytics/", "/stats/"] {
        let response = request(port, "GET", path, HOST, None);
        assert_eq!(response.status, 200, "{path}");
        let compressed = gzip9(&response.body);
        eprintln!(
            "dashboard {path}: {} bytes, {compressed} bytes after gzip -9 (budget {GZIP_BUDGET})",
            response.body.len()
        );
        assert!(
            compressed <= GZIP_BUDGET,
            "{path}: {compressed} bytes after gzip -9, over the budget of {GZIP_BUDGET}"
        );
    }
}

#[test]
fn configuration_errors_name_the_directive() {
    for (location, expected) in [
        (
            "analytics_dashboard https://evil.example/report;",
            "\"analytics_dashboard\" directive takes the URI of the report location, a path \
             such as \"/analytics/report\" or \"report\" (relative to the page), not \
             \"https://evil.example/report\": a scheme is not allowed",
        ),
        (
            "analytics_dashboard //evil.example/report;",
            "a host is not allowed",
        ),
        (
            "analytics_dashboard /report?x=1;",
            "a query or fragment is not allowed",
        ),
        (
            "analytics_dashboard \"/a\\\"><script>\";",
            "only URI path characters are allowed",
        ),
        (
            "analytics_dashboard /a /b;",
            "invalid number of arguments in \"analytics_dashboard\" directive",
        ),
        (
            "analytics_dashboard; analytics_dashboard;",
            "\"analytics_dashboard\" directive is duplicate, or the location already has a \
             content handler",
        ),
        (
            "analytics_agent; analytics_dashboard;",
            "\"analytics_dashboard\" directive is duplicate, or the location already has a \
             content handler",
        ),
    ] {
        let (ok, output) = nginx_test_config(&format!(
            "server {{ listen 127.0.0.1:{}; location = /d/ {{ {location} }} }}",
            free_port()
        ));
        assert!(!ok, "{location}: accepted\n{output}");
        assert!(
            output.contains("[emerg]") && output.contains(expected),
            "{location}: expected {expected:?} in\n{output}"
        );
    }
    let (ok, output) = nginx_test_config(&format!(
        "server {{ listen 127.0.0.1:{}; analytics_dashboard; }}",
        free_port()
    ));
    assert!(
        !ok && output.contains("\"analytics_dashboard\" directive is not allowed here"),
        "{output}"
    );
}

/// Whether any browser log entry reports a Content-Security-Policy violation.
fn csp_violations(browser: &Browser) -> Vec<String> {
    browser
        .log()
        .into_iter()
        .map(|entry| entry.message)
        .filter(|message| message.contains("Content Security Policy"))
        .collect()
}

/// State of the loaded page: whether its script ran (the error banner it shows when the report
/// API answers 404) and whether its style applied (the KPI strip is a grid).
fn page_state(browser: &Browser) -> Value {
    browser.execute(
        "const banner = document.getElementById('error-banner');
         return {
           banner: !banner.hidden,
           status: banner.dataset.status || null,
           text: document.getElementById('error-text').textContent,
           kpis: getComputedStyle(document.querySelector('.kpis')).display,
         };",
        json!([]),
    )
}

#[test]
fn chromium_runs_the_page_under_its_own_csp_and_blocks_it_under_another() {
    // A copy of the page under a policy with wrong hashes: the control that shows a violation
    // would be seen.
    let root = TestDir::new("dashboard-root");
    std::fs::write(root.path().join("control.html"), dashboard_source()).expect("control page");
    let wrong_hash = format!("'sha256-{}='", "A".repeat(43));
    let (nginx, port) = start(&format!(
        "root {};
    location = /control.html {{
        default_type text/html;
        add_header Content-Security-Policy \"default-src 'self'; script-src {wrong_hash}; style-src {wrong_hash}\";
    }}",
        root.path().display()
    ));
    let browser = Browser::start(BrowserOptions::default());
    let wait = Duration::from_secs(10);

    for (path, report) in [
        ("/analytics/", "/analytics/report?report=domains"),
        ("/stats/", "/stats/api/report?report=domains"),
    ] {
        browser.goto(&format!("http://127.0.0.1:{port}{path}"));
        let mut state = Value::Null;
        let shown = wait_until(wait, || {
            state = page_state(&browser);
            state["banner"] == true
        });
        assert!(
            shown,
            "{path}: the script ran and showed the banner: {state}"
        );
        assert_eq!(
            state["status"], "404",
            "{path}: no report API here yet: {state}"
        );
        assert_eq!(state["kpis"], "grid", "{path}: the inline style applied");
        let violations = csp_violations(&browser);
        assert!(violations.is_empty(), "{path}: {violations:?}");
        let log = nginx.access_log();
        assert!(
            log.contains(&format!("\"GET {report} HTTP/1.1\" 404")),
            "{path}: the page asked {report}:\n{log}"
        );
    }

    browser.goto(&format!("http://127.0.0.1:{port}/control.html"));
    let mut violations = Vec::new();
    let seen = wait_until(wait, || {
        violations.extend(csp_violations(&browser));
        violations.len() >= 2
    });
    assert!(
        seen,
        "the wrong hashes block script and style: {violations:?}"
    );
    let state = page_state(&browser);
    assert_eq!(state["banner"], false, "the script did not run: {state}");
    assert_ne!(state["kpis"], "grid", "the style did not apply: {state}");
}
