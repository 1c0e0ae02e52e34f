//! The privacy audit every [`super::FakeSink`] runs over all it received when it is dropped, so
//! the whole suite proves that what the module sends to the sink carries nothing about the
//! visitor: no client header, address, cookie, user agent, query string or referrer path.

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
    for line in body.lines() {
        for tag in tag_values(line, "page") {
            if tag.contains('?') || tag.contains('#') {
                found.push(format!("query or fragment in page tag {tag:?}"));
            }
        }
        for tag in tag_values(line, "referrer") {
            if tag.contains('/') || tag.contains('?') || tag.contains('@') {
                found.push(format!("more than a host in referrer tag {tag:?}"));
            }
        }
    }
    found
}

/// The (still escaped) values of tag `key` in one line of line protocol.
fn tag_values<'a>(line: &'a str, key: &str) -> Vec<&'a str> {
    let series = series_key(line);
    let needle = format!(",{key}=");
    let mut values = Vec::new();
    let mut rest = series;
    while let Some(at) = rest.find(&needle) {
        let value = &rest[at + needle.len()..];
        let end = unescaped_comma(value).unwrap_or(value.len());
        values.push(&value[..end]);
        rest = &value[end..];
    }
    values
}

/// The measurement and tag set: the line up to its first unescaped space.
fn series_key(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b' ' => return &line[..i],
            _ => i += 1,
        }
    }
    line
}

fn unescaped_comma(value: &str) -> Option<usize> {
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b',' => return Some(i),
            _ => i += 1,
        }
    }
    None
}
