//! The privacy audit every [`super::FakeSink`] runs over all it received when it is dropped, so
//! the whole suite proves that what the module sends to the sink carries nothing about the
//! visitor: no client header, address, cookie, user agent, query string or referrer path. A sink
//! behind an endpoint with `analytics_session off` is also told the session ids the test sent
//! ([`super::FakeSink::forbid_sessions`]): none of them may reach it ([`session_violations`]).

use super::points::{split_lines, stored_string_field, stored_tag, Point};
use super::sink::CapturedRequest;

/// The only headers nginx may send to the sink for a write (the internal location sets
/// `proxy_pass_request_headers off`).
const ALLOWED_HEADERS: &[&str] = &["host", "content-length", "content-type", "connection"];

/// Strings the tests put in client headers, query strings and referrer paths; none may reach
/// the sink.
const CLIENT_MARKERS: &[&str] = &[
    "SECRET-",
    "Mozilla/",
    "curl/",
    "HeadlessChrome",
    "utm_",
    "?id=",
    "X-Forwarded-For",
    "203.0.113.",
];

/// Everything about `request` that would leak visitor data, as readable complaints.
pub fn violations(request: &CapturedRequest) -> Vec<String> {
    let mut found = Vec::new();
    for (name, value) in &request.headers {
        if !ALLOWED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            found.push(format!("header {name}: {value}"));
        }
        if !name.eq_ignore_ascii_case("host") && value.contains("127.0.0.1") {
            found.push(format!("client address in header {name}: {value}"));
        }
    }
    let raw = String::from_utf8_lossy(&request.raw);
    for marker in CLIENT_MARKERS {
        if raw.contains(marker) {
            found.push(format!("client data {marker:?} in the write"));
        }
    }
    let body = String::from_utf8_lossy(&request.body);
    let lines = match split_lines(&body) {
        Ok(lines) => lines,
        Err(err) => return [found, vec![format!("unreadable write body: {err}")]].concat(),
    };
    for line in lines {
        let point = match Point::parse(&line) {
            Ok(point) => point,
            Err(err) => {
                found.push(format!("unreadable line {line:?}: {err}"));
                continue;
            }
        };
        if let Some(page) = point
            .tag("page")
            .filter(|p| p.contains('?') || p.contains('#'))
        {
            found.push(format!("query or fragment in page tag {page:?}"));
        }
        let referrer = point.tag("referrer");
        if let Some(host) =
            referrer.filter(|r| r.contains('/') || r.contains('?') || r.contains('@'))
        {
            found.push(format!("more than a host in referrer tag {host:?}"));
        }
    }
    found
}

/// With `analytics_session off`: everything in `request` that carries a session. No point may
/// have a `sess` tag or field, and no session id in `sess_ids` may appear anywhere in the bytes
/// sent, neither as sent nor in the form it would take as a tag or as a string field.
pub fn session_violations(request: &CapturedRequest, sess_ids: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let raw = String::from_utf8_lossy(&request.raw);
    for id in sess_ids {
        let tag = stored_tag(id)
            .replace(',', "\\,")
            .replace(' ', "\\ ")
            .replace('=', "\\=");
        let field = stored_string_field(id)
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        for form in [id.clone(), tag, field] {
            if !form.is_empty() && raw.contains(&form) {
                found.push(format!("session id {id:?} reached the sink as {form:?}"));
            }
        }
    }
    let body = String::from_utf8_lossy(&request.body);
    for line in split_lines(&body).unwrap_or_default() {
        match Point::parse(&line) {
            Ok(point) if point.tag("sess").is_some() || point.field("sess").is_some() => {
                found.push(format!("a sess tag or field in {line:?}"));
            }
            Ok(_) => {}
            Err(err) => found.push(format!("unreadable line {line:?}: {err}")),
        }
    }
    found
}
