//! Round trip of the pure core through an independent line-protocol parser (test-only).
//!
//! For any body: [`parse_beacon`] never panics, and a beacon that parses and passes
//! [`check_policy`] encodes to exactly one line that the `influxdb-line-protocol` crate (InfluxDB
//! IOx's parser, a port of the Go `scanLine`) reads back as exactly one point with the expected
//! measurement, tag set, field set and timestamp.
//!
//! The same checker, [`check_body`], is the fuzz target in `fuzz/` (which includes this file and
//! `src/core/` by `#[path]`, because the module's rlib cannot be linked without nginx); the
//! proptest strategies below are compiled only into `cargo test`.
//!
//! # Where the crate and InfluxDB 1.6 disagree
//!
//! The reference for what is *stored* is InfluxDB 1.6 (`tests/influx_e2e.rs` checks it against a
//! real server); the crate is an independent check of the *framing* (one line, the right
//! separators, the right number of tags and fields). They differ in exactly one place that
//! matters here, backslashes in tag values:
//!
//! - InfluxDB 1.6 (`models.unescapeTag`) unescapes only `\,`, `\ ` and `\=`; any other backslash
//!   is stored as sent, so the written tag `a\\b` is stored as `a\\b` (two backslashes).
//! - The crate also unescapes `\\` to `\`, so it reads `a\\b` as `a\b`; a backslash before any
//!   other character is kept (`a\b` reads as `a\b`).
//!
//! So tag values are compared twice: with InfluxDB 1.6 semantics by [`influx16_tags`] (a small
//! reader of the raw series key, see below), which must give exactly
//! `sanitize_tag_value(original)`, and with the crate, which must give
//! [`crate_view_of_tag`]`(sanitize_tag_value(original))`, i.e. the same value with each `\\` pair
//! collapsed to `\`. String fields (`note`) are read the same way by both (`\\` and `\"` are
//! unescaped, a lone `\` is kept) and are compared with `sanitize_string_field(original)`
//! directly.

use influxdb_line_protocol::{parse_lines, split_lines, FieldValue};

use crate::core::beacon::{parse_beacon, Beacon};
use crate::core::line_protocol::{
    encode_point, sanitize_string_field, sanitize_tag_value, SessionStorage,
};
use crate::core::policy::{check_policy, Measurements};

/// Timestamp used for every encoded point (any value in `0..=i64::MAX` works).
pub const TS: u64 = 1_796_007_672_042_563_584;

/// A field value as expected in the point.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Integer field (`1i`).
    Int(i64),
    /// Float field.
    Float(f64),
    /// String field, already sanitized the way InfluxDB stores it.
    Str(String),
}

/// A point as expected: measurement, tags (sanitized, InfluxDB 1.6 view) and fields.
pub type ExpectedPoint = (
    String,
    Vec<(&'static str, String)>,
    Vec<(&'static str, Expected)>,
);

/// The point `beacon` must become with `analytics_session session`.
pub fn expected_point(
    beacon: &Beacon,
    measurements: &Measurements,
    session: SessionStorage,
) -> ExpectedPoint {
    let common = beacon.common();
    let timezone = common.timezone.map(|tz| tz.to_string());
    let sess_tag = common
        .sess_id
        .as_deref()
        .filter(|_| session == SessionStorage::Tag);
    // A `sess` field holds the string field InfluxDB stores; left out when that is empty.
    let sess_field = common
        .sess_id
        .as_deref()
        .filter(|_| session == SessionStorage::Field)
        .map(sanitize_string_field)
        .filter(|v| !v.is_empty())
        .map(|v| ("sess", Expected::Str(v)));
    let (measurement, tags, fields) = match beacon {
        Beacon::Event(event) => {
            let tags: Vec<(&'static str, Option<&str>)> = vec![
                ("domain", Some(&common.domain)),
                ("event", Some(&event.name)),
                ("page", Some(&common.page)),
                ("platform", common.platform.as_deref()),
                ("sess", sess_tag),
                ("timezone", timezone.as_deref()),
                ("type", Some("event")),
            ];
            let mut fields = vec![
                ("counter", Expected::Int(1)),
                ("note", Expected::Str(sanitize_string_field(&event.note))),
            ];
            fields.extend(sess_field);
            if let Some(value) = event.value {
                fields.push(("value", Expected::Float(value)));
            }
            (&measurements.event, tags, fields)
        }
        Beacon::PageView(view) => {
            let tags: Vec<(&'static str, Option<&str>)> = vec![
                ("domain", Some(&common.domain)),
                ("page", Some(&common.page)),
                ("platform", common.platform.as_deref()),
                ("referrer", view.referrer_host.as_deref()),
                ("sess", sess_tag),
                ("timezone", timezone.as_deref()),
                ("type", Some("pageview")),
            ];
            let mut fields = vec![("counter", Expected::Int(1))];
            if let Some(load_time) = view.load_time {
                fields.push(("load_time", Expected::Float(load_time)));
            }
            if let Some(pages) = view.pages_viewed {
                fields.push(("pages_viewed", Expected::Int(i64::from(pages))));
            }
            fields.extend(sess_field);
            (&measurements.page_view, tags, fields)
        }
    };
    let tags = tags
        .into_iter()
        .filter_map(|(key, value)| {
            let value = sanitize_tag_value(value?);
            (!value.is_empty()).then_some((key, value))
        })
        .collect();
    (measurement.clone(), tags, fields)
}

/// How the `influxdb-line-protocol` crate reads back a tag value that InfluxDB 1.6 stores as
/// `sanitized` (see the module docs): every `\\` pair is collapsed to one `\`.
pub fn crate_view_of_tag(sanitized: &str) -> String {
    let mut out = String::with_capacity(sanitized.len());
    let mut chars = sanitized.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '\\' {
            match chars.next() {
                Some('\\') | None => {}
                Some(next) => out.push(next),
            }
        }
    }
    out
}

/// The series key of a line: everything before the first space not escaped by a backslash.
pub fn series_key(line: &str) -> &str {
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

/// Reads the tags of a raw series key (`measurement,k=v,k=v`) the way InfluxDB 1.6 does: the
/// key ends at the first unescaped `,` or `=` (a backslash escapes the next byte), and only
/// `\,`, `\ ` and `\=` are unescaped. Returns `(measurement, tags)`.
pub fn influx16_tags(series: &str) -> Result<(String, Vec<(String, String)>), String> {
    // Split at unescaped commas.
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = series.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                current.push(chars.next().ok_or("series ends with a backslash")?);
            }
            ',' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    let unescape = |s: &str| {
        s.replace("\\,", ",")
            .replace("\\ ", " ")
            .replace("\\=", "=")
    };
    let measurement = unescape(&parts[0]);
    let mut tags = Vec::new();
    for part in &parts[1..] {
        // First unescaped `=`.
        let bytes = part.as_bytes();
        let mut eq = None;
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'=' => {
                    eq = Some(i);
                    break;
                }
                _ => i += 1,
            }
        }
        let eq = eq.ok_or_else(|| format!("tag without `=`: {part:?}"))?;
        let (key, value) = (&part[..eq], &part[eq + 1..]);
        if value.is_empty() {
            return Err(format!("empty tag value in {part:?}"));
        }
        if value.ends_with('\\') && !value.ends_with("\\\\") {
            return Err(format!(
                "tag value ends with an escaping backslash: {part:?}"
            ));
        }
        tags.push((unescape(key), unescape(value)));
    }
    Ok((measurement, tags))
}

/// Checks the encoded `line` of `beacon` (see the module docs); panics with a description on
/// any difference.
pub fn check_point(
    beacon: &Beacon,
    measurements: &Measurements,
    session: SessionStorage,
    ts: u64,
    line: &[u8],
) {
    let text = std::str::from_utf8(line).expect("line protocol is valid UTF-8");
    assert!(text.ends_with('\n'), "point ends with a newline: {text:?}");

    // Framing: the Go-ported line splitter sees exactly one line (plus the empty rest after the
    // final newline); line breaks inside the quoted note do not split it.
    let pieces: Vec<&str> = split_lines(text).collect();
    assert_eq!(pieces.len(), 2, "exactly one line: {text:?} -> {pieces:?}");
    assert_eq!(pieces[1], "", "nothing after the final newline: {text:?}");

    let parsed: Vec<_> = parse_lines(text).collect();
    assert_eq!(parsed.len(), 1, "exactly one point: {text:?}");
    let point = match &parsed[0] {
        Ok(point) => point,
        Err(err) => panic!("the crate cannot parse {text:?}: {err}"),
    };

    let (measurement, tags, fields) = expected_point(beacon, measurements, session);
    assert_eq!(
        point.series.measurement.as_str(),
        measurement,
        "measurement of {text:?}"
    );

    // Tags as the crate reads them.
    let got_tags: Vec<(String, String)> = point
        .series
        .tag_set
        .iter()
        .flatten()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let want_tags: Vec<(String, String)> = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), crate_view_of_tag(v)))
        .collect();
    assert_eq!(got_tags, want_tags, "tags (crate view) of {text:?}");

    // Tags as InfluxDB 1.6 reads them: exactly sanitize_tag_value(original).
    let (m16, tags16) = influx16_tags(series_key(text)).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(m16, measurement, "measurement (1.6 view) of {text:?}");
    let want16: Vec<(String, String)> = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    assert_eq!(tags16, want16, "tags (InfluxDB 1.6 view) of {text:?}");

    // Fields: same keys in the same order, same types, same values.
    let got_fields: Vec<(String, Expected)> = point
        .field_set
        .iter()
        .map(|(k, v)| {
            let v = match v {
                FieldValue::I64(n) => Expected::Int(*n),
                FieldValue::F64(f) => Expected::Float(*f),
                FieldValue::String(s) => Expected::Str(s.to_string()),
                other => panic!("unexpected field type {other:?} in {text:?}"),
            };
            (k.to_string(), v)
        })
        .collect();
    let want_fields: Vec<(String, Expected)> =
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    assert_eq!(got_fields, want_fields, "fields of {text:?}");

    assert_eq!(
        point.timestamp,
        Some(i64::try_from(ts).expect("test timestamps fit in i64")),
        "timestamp of {text:?}"
    );
}

/// The whole property for one body: never panics on any input; an accepted beacon round-trips
/// with `analytics_session session`, and with `off` no byte of its session id is in the line.
/// Returns the beacon when it was accepted (for callers that compare it with what they sent).
pub fn check_body<'a>(
    body: &'a [u8],
    measurements: &Measurements,
    session: SessionStorage,
) -> Option<Beacon<'a>> {
    let beacon = match parse_beacon(body) {
        Ok(beacon) => beacon,
        Err(err) => {
            let msg = err.to_string();
            assert!(
                msg.len() < 200 && !msg.chars().any(|c| c.is_control()),
                "error messages are short and single-line: {msg:?}"
            );
            return None;
        }
    };
    // Policy: the beacon's own domain as the request's Host (with a port, in upper case), and its
    // own event name permitted, even when it is not a name a configuration could list: the
    // encoder must be safe for any name.
    let host = format!("{}:8080", beacon.common().domain.to_ascii_uppercase());
    let permitted: Vec<String> = beacon.event_name().map(str::to_owned).into_iter().collect();
    check_policy(&beacon, &permitted, None, &host).expect("own domain and event pass");
    // Another host is refused.
    assert!(check_policy(&beacon, &permitted, None, "other.invalid").is_err());

    let mut line = Vec::new();
    encode_point(&beacon, measurements, session, TS, &mut line);
    check_point(&beacon, measurements, session, TS, &line);
    if session == SessionStorage::Off {
        let mut without = beacon.clone();
        match &mut without {
            Beacon::Event(event) => event.common.sess_id = None,
            Beacon::PageView(view) => view.common.sess_id = None,
        }
        let mut line_without = Vec::new();
        encode_point(&without, measurements, session, TS, &mut line_without);
        assert_eq!(
            line, line_without,
            "with `off` the line does not depend on the session id"
        );
    }
    Some(beacon)
}

#[cfg(test)]
mod props {
    use std::borrow::Cow;

    use super::*;
    use crate::core::beacon::referrer_host;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    /// Characters that matter to JSON, line protocol, URLs and logs, plus anything.
    fn rich_char() -> impl Strategy<Value = char> {
        prop_oneof![
            5 => prop::sample::select(vec![
                ',', '=', ' ', '"', '\\', '\n', '\r', '\t', '\0', '\u{1}', '\u{1b}', '\u{7f}',
                '\u{85}', '\u{9f}', '\u{2028}', '\u{2029}', '\u{a0}', '\u{feff}', 'é', '€',
                '😀', '?', '#', '/', ':', '@', '[', ']', '.', '-', '_', '\'', '{', '}', 'i',
                '1', 'Z',
            ]),
            3 => prop::char::range('a', 'z'),
            1 => any::<char>(),
        ]
    }

    /// A string rich in special characters, often ending in a run of backslashes or a space.
    fn rich_string(max_chars: usize) -> BoxedStrategy<String> {
        (
            prop::collection::vec(rich_char(), 0..=max_chars),
            prop::sample::select(vec!["", "", "", "\\", "\\\\", "\\\\\\", " ", "\\ ", "\n"]),
        )
            .prop_map(|(chars, tail)| {
                let mut s: String = chars.into_iter().collect();
                s.push_str(tail);
                s
            })
            .boxed()
    }

    /// A JSON value as sent.
    #[derive(Debug, Clone)]
    enum J {
        Str(String),
        Int(i64),
        Float(f64),
        /// Raw JSON text (also invalid JSON such as `NaN`).
        Raw(&'static str),
    }

    impl J {
        fn as_str(&self) -> Option<&str> {
            match self {
                J::Str(s) => Some(s),
                J::Raw("\"\"") => Some(""),
                _ => None,
            }
        }
    }

    /// JSON text of a string: serde_json's escaping, or every non-ASCII and special character as
    /// `\uXXXX` (surrogate pairs above the BMP).
    fn json_string(s: &str, all_escaped: bool) -> String {
        if !all_escaped {
            return serde_json::to_string(s).unwrap();
        }
        let mut out = String::from("\"");
        for c in s.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out.push('"');
        out
    }

    fn json(value: &J, all_escaped: bool) -> String {
        match value {
            J::Str(s) => json_string(s, all_escaped),
            J::Int(n) => n.to_string(),
            // serde_json writes non-finite floats as `null`.
            J::Float(f) => serde_json::to_string(f).unwrap(),
            J::Raw(raw) => (*raw).to_owned(),
        }
    }

    fn odd_value() -> impl Strategy<Value = J> {
        prop::sample::select(vec![
            J::Raw("null"),
            J::Raw("true"),
            J::Raw("[]"),
            J::Raw("{}"),
            J::Raw("[\"/\"]"),
            J::Raw("-0"),
            J::Raw("1.0"),
            J::Raw("1E3"),
            J::Raw("0.5e-3"),
            J::Raw("1e400"),
            J::Raw("NaN"),
            J::Raw("-Infinity"),
            J::Raw("18446744073709551616"),
            J::Raw("\"\""),
        ])
    }

    /// `(weight, strategy)` pairs with the zero weights left out, as one strategy.
    fn weighted<T: std::fmt::Debug + 'static>(
        arms: Vec<(u32, BoxedStrategy<T>)>,
    ) -> BoxedStrategy<T> {
        prop::strategy::Union::new_weighted(arms.into_iter().filter(|(w, _)| *w > 0).collect())
            .boxed()
    }

    /// An optional value for a string key: mostly a string, sometimes absent; with `hostile`,
    /// sometimes a value of another type.
    fn string_value(s: BoxedStrategy<String>, hostile: bool) -> BoxedStrategy<Option<J>> {
        weighted(vec![
            (8, s.prop_map(|s| Some(J::Str(s))).boxed()),
            (2, Just(None).boxed()),
            (u32::from(hostile), odd_value().prop_map(Some).boxed()),
        ])
    }

    fn int_value(lo: i64, hi: i64, hostile: bool) -> BoxedStrategy<Option<J>> {
        weighted(vec![
            (8, (lo..=hi).prop_map(|n| Some(J::Int(n))).boxed()),
            (2, Just(None).boxed()),
            (
                u32::from(hostile),
                any::<i64>().prop_map(|n| Some(J::Int(n))).boxed(),
            ),
            (u32::from(hostile), odd_value().prop_map(Some).boxed()),
        ])
    }

    fn float_value(lo: f64, hi: f64, hostile: bool) -> BoxedStrategy<Option<J>> {
        weighted(vec![
            (6, (lo..=hi).prop_map(|f| Some(J::Float(f))).boxed()),
            (
                2,
                prop::sample::select(vec![0.0, -0.0, 1e-7, 5e-324, lo, hi, 812.5, 0.1, 1.0 / 3.0])
                    .prop_map(|f| Some(J::Float(f)))
                    .boxed(),
            ),
            (2, Just(None).boxed()),
            (
                u32::from(hostile),
                any::<f64>().prop_map(|f| Some(J::Float(f))).boxed(),
            ),
            (u32::from(hostile), odd_value().prop_map(Some).boxed()),
        ])
    }

    fn domain(hostile: bool) -> BoxedStrategy<String> {
        weighted(vec![
            (
                8,
                (
                    "[ \t]{0,1}",
                    "[a-zA-Z0-9-]{1,12}(\\.[a-zA-Z0-9-]{1,12}){0,3}\\.?",
                    "[ \t]{0,1}",
                )
                    .prop_map(|(a, b, c)| format!("{a}{b}{c}"))
                    .boxed(),
            ),
            (u32::from(hostile), rich_string(20)),
        ])
    }

    /// A page, near the 1024-byte limit now and then, with a query and a fragment sometimes.
    fn page(hostile: bool) -> BoxedStrategy<String> {
        let start = if hostile {
            vec!["/", "/", "/", "", "//", "?", "#"]
        } else {
            vec!["/", "/", "/", "//"]
        };
        (
            prop::sample::select(start),
            rich_string(40),
            prop::option::of(rich_string(10)),
            prop::option::of(rich_string(10)),
            950usize..1100,
            prop::bool::weighted(0.05),
        )
            .prop_map(|(start, path, query, fragment, pad, long)| {
                let mut page = format!("{start}{path}");
                if long {
                    // Around the 1024-byte limit (counted without query and fragment).
                    page.push_str(&"p".repeat(pad.saturating_sub(page.len())));
                }
                if let Some(q) = query {
                    page.push('?');
                    page.push_str(&q);
                }
                if let Some(f) = fragment {
                    page.push('#');
                    page.push_str(&f);
                }
                page
            })
            .boxed()
    }

    /// A short string, and now and then one around `max` bytes.
    fn bounded_string(max: usize) -> BoxedStrategy<String> {
        weighted(vec![
            (8, rich_string(max / 3)),
            (
                1,
                (rich_string(8), max.saturating_sub(12)..max + 4)
                    .prop_map(|(s, n)| {
                        let mut s = s;
                        while s.len() < n {
                            s.push('x');
                        }
                        s
                    })
                    .boxed(),
            ),
        ])
    }

    fn referrer() -> BoxedStrategy<String> {
        prop_oneof![
            4 => (
                prop::sample::select(vec!["https", "http", "android-app", "svn+ssh", "1x", ""]),
                prop::sample::select(vec!["", "user@", "u:p@", "a@b@"]),
                prop_oneof![
                    "[a-zA-Z0-9.-]{1,20}",
                    Just("[2001:DB8::1]".to_owned()),
                    Just("[::1".to_owned()),
                    rich_string(8),
                ],
                prop::sample::select(vec!["", ":443", ":", ":8a"]),
                rich_string(20),
            )
                .prop_map(|(scheme, user, host, port, rest)| {
                    format!("{scheme}://{user}{host}{port}/{rest}")
                }),
            1 => rich_string(30),
        ]
        .boxed()
    }

    /// One generated beacon: the value sent for each key (`None` = key left out), extra keys,
    /// key order and string escaping.
    #[derive(Debug, Clone)]
    struct Sent {
        fields: Vec<(&'static str, Option<J>)>,
        extra: Vec<(String, J)>,
        duplicate: Option<usize>,
        order_seed: Vec<usize>,
        all_escaped: bool,
        whitespace: bool,
    }

    impl Sent {
        fn get(&self, key: &str) -> Option<&J> {
            self.fields
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.as_ref())
        }

        fn body(&self) -> String {
            let mut members: Vec<String> = Vec::new();
            for (key, value) in &self.fields {
                if let Some(value) = value {
                    members.push(format!("\"{key}\":{}", json(value, self.all_escaped)));
                }
            }
            for (key, value) in &self.extra {
                members.push(format!(
                    "{}:{}",
                    json_string(key, self.all_escaped),
                    json(value, self.all_escaped)
                ));
            }
            if let Some(i) = self.duplicate {
                if let Some(m) = members.get(i % members.len().max(1)).cloned() {
                    members.push(m);
                }
            }
            // Deterministic shuffle driven by the generated seed.
            for (i, &s) in self.order_seed.iter().enumerate() {
                if members.len() > 1 {
                    let a = i % members.len();
                    let b = s % members.len();
                    members.swap(a, b);
                }
            }
            let sep = if self.whitespace { " ,\n\t" } else { "," };
            let colon_ws = if self.whitespace { " {\r\n " } else { "{" };
            format!("{colon_ws}{}}}", members.join(sep))
        }
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![3 => sent_with(false), 1 => sent_with(true)]
    }

    /// A generated beacon; with `hostile`, values of the wrong type and invalid domains and
    /// pages are mixed in (most of those beacons are refused).
    fn sent_with(hostile: bool) -> impl Strategy<Value = Sent> {
        let event = weighted(vec![
            (1, Just(None).boxed()),
            (1, rich_string(16).prop_map(|s| Some(J::Str(s))).boxed()),
            (
                1,
                "[a-zA-Z0-9_.:-]{1,20}"
                    .prop_map(|s| Some(J::Str(s)))
                    .boxed(),
            ),
            (u32::from(hostile), odd_value().prop_map(Some).boxed()),
        ]);
        let utcoffset = weighted(vec![
            (1, int_value(-840, 840, hostile)),
            (
                1,
                "[ ]?[+-]?[0-9]{0,3}[ ]?"
                    .prop_map(|s| Some(J::Str(s)))
                    .boxed(),
            ),
        ]);
        (
            (
                string_value(domain(hostile), hostile),
                string_value(page(hostile), hostile),
                int_value(-840, 840, hostile),
                utcoffset,
                string_value(bounded_string(64), hostile),
                string_value(bounded_string(64), hostile),
            ),
            (
                event,
                string_value(bounded_string(1024), hostile),
                float_value(-1e15, 1e15, hostile),
                string_value(referrer(), hostile),
                float_value(0.0, 600_000.0, hostile),
                int_value(1, 1_000_000, hostile),
            ),
            prop::collection::vec(("[a-z_]{1,8}", odd_value()), 0..3),
            prop::option::weighted(if hostile { 0.1 } else { 0.001 }, 0usize..20),
            prop::collection::vec(0usize..20, 0..12),
            any::<bool>(),
            prop::bool::weighted(0.2),
        )
            .prop_map(
                |(
                    (domain, page, timezone, utcoffset, platform, sess_id),
                    (event, note, value, referrer, load_time, pages_viewed),
                    extra,
                    duplicate,
                    order_seed,
                    all_escaped,
                    whitespace,
                )| Sent {
                    fields: vec![
                        ("domain", domain),
                        ("page", page),
                        ("timezone", timezone),
                        ("utcoffset", utcoffset),
                        ("platform", platform),
                        ("sess_id", sess_id),
                        ("event", event),
                        ("note", note),
                        ("value", value),
                        ("referrer", referrer),
                        ("load_time", load_time),
                        ("pages_viewed", pages_viewed),
                    ],
                    extra: extra
                        .into_iter()
                        .map(|(k, v)| (format!("x_{k}"), v))
                        .collect(),
                    duplicate,
                    order_seed,
                    all_escaped,
                    whitespace,
                },
            )
    }

    fn measurements() -> impl Strategy<Value = Measurements> {
        prop_oneof![
            3 => Just(Measurements::default()),
            1 => ("[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
                .prop_filter("different names", |(a, b)| a != b)
                .prop_map(|(page_view, event)| Measurements { page_view, event }),
        ]
    }

    fn session() -> impl Strategy<Value = SessionStorage> {
        prop::sample::select(SessionStorage::ALL.to_vec())
    }

    /// What the accepted beacon must hold, computed from what was sent.
    fn check_against_sent(sent: &Sent, beacon: &Beacon) -> Result<(), TestCaseError> {
        let common = beacon.common();
        let s = |key| sent.get(key).and_then(J::as_str);

        let domain = s("domain").expect("an accepted beacon had a domain string");
        let mut want_domain = domain.trim_ascii().to_ascii_lowercase();
        if want_domain.ends_with('.') {
            want_domain.pop();
        }
        prop_assert_eq!(&common.domain, &want_domain);

        let page = s("page").expect("an accepted beacon had a page string");
        let want_page = page.split(['?', '#']).next().unwrap();
        prop_assert_eq!(&common.page, want_page);

        let nonempty = |key| s(key).filter(|v| !v.is_empty()).map(Cow::Borrowed);
        prop_assert_eq!(&common.platform, &nonempty("platform"));
        prop_assert_eq!(&common.sess_id, &nonempty("sess_id"));

        let int = |key| match sent.get(key) {
            Some(J::Int(n)) => Some(*n),
            Some(J::Raw("-0")) => Some(0),
            _ => None,
        };
        let timezone = int("timezone").or_else(|| match sent.get("utcoffset") {
            Some(J::Str(text)) if !text.trim().is_empty() => Some(text.trim().parse().unwrap()),
            _ => int("utcoffset"),
        });
        prop_assert_eq!(common.timezone.map(i64::from), timezone);

        let float = |key| match sent.get(key) {
            Some(J::Float(f)) => Some(*f),
            Some(J::Int(n)) => Some(*n as f64),
            Some(J::Raw("-0")) => Some(-0.0),
            Some(J::Raw("1.0")) => Some(1.0),
            Some(J::Raw("1E3")) => Some(1000.0),
            Some(J::Raw("0.5e-3")) => Some(0.0005),
            _ => None,
        };
        match beacon {
            Beacon::Event(event) => {
                let name = s("event").expect("an event had an event string");
                prop_assert_eq!(&event.name, &name.to_ascii_lowercase());
                prop_assert_eq!(&event.note, s("note").unwrap_or(""));
                prop_assert_eq!(
                    event.value,
                    float("value"),
                    "`value` stored differs from the float sent (its shortest decimal form, as JS \
                     and serde_json write it)"
                );
            }
            Beacon::PageView(view) => {
                prop_assert!(s("event").is_none());
                prop_assert_eq!(
                    view.load_time,
                    float("load_time"),
                    "`load_time` stored differs from the float sent"
                );
                prop_assert_eq!(view.pages_viewed.map(i64::from), int("pages_viewed"));
                // Only a host is kept, and it is the referrer's own host.
                let want_host = s("referrer").and_then(referrer_host);
                prop_assert_eq!(&view.referrer_host, &want_host);
                if let Some(host) = &view.referrer_host {
                    let sent_lower = s("referrer").unwrap().to_ascii_lowercase();
                    prop_assert!(sent_lower.contains(host.trim_end_matches('.')));
                    prop_assert!(!host.contains(['/', '?', '#', '@', ' ']));
                }
            }
        }
        Ok(())
    }

    fn config(cases: u32) -> Config {
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        }
    }

    #[test]
    fn generated_beacons_round_trip_through_an_independent_parser() {
        let mut runner = TestRunner::new(config(1500));
        let accepted = std::cell::Cell::new(0u32);
        let events = std::cell::Cell::new(0u32);
        let total = std::cell::Cell::new(0u32);
        runner
            .run(
                &(sent(), measurements(), session()),
                |(sent, measurements, session)| {
                    total.set(total.get() + 1);
                    let body = sent.body();
                    if let Some(beacon) = check_body(body.as_bytes(), &measurements, session) {
                        accepted.set(accepted.get() + 1);
                        if beacon.event_name().is_some() {
                            events.set(events.get() + 1);
                        }
                        check_against_sent(&sent, &beacon)?;
                    }
                    Ok(())
                },
            )
            .unwrap();
        // Not vacuous: a good share of the generated beacons is accepted, of both kinds.
        let (accepted, events, total) = (accepted.get(), events.get(), total.get());
        eprintln!("{accepted} of {total} generated beacons accepted ({events} events)");
        assert!(accepted * 10 >= total, "{accepted} of {total} accepted");
        assert!(events * 4 >= accepted, "{events} events of {accepted}");
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_round_trip_when_accepted() {
        let mut runner = TestRunner::new(config(3000));
        runner
            .run(
                &(prop::collection::vec(any::<u8>(), 0..400), session()),
                |(bytes, session)| {
                    check_body(&bytes, &Measurements::default(), session);
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn mutated_beacons_never_panic_and_round_trip_when_accepted() {
        let edits =
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6);
        let mut runner = TestRunner::new(config(1000));
        runner
            .run(&(sent(), edits, session()), |(sent, edits, session)| {
                let mut body = sent.body().into_bytes();
                for (at, byte, op) in edits {
                    let i = at.index(body.len() + 1);
                    match op {
                        0 => body.insert(i, byte),
                        1 if i < body.len() => {
                            body.remove(i);
                        }
                        _ if i < body.len() => body[i] = byte,
                        _ => {}
                    }
                }
                check_body(&body, &Measurements::default(), session);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_crate_view_of_tags_is_documented_correctly() {
        // The difference documented at the top, checked against the crate itself.
        for (sanitized, crate_view) in [
            ("a\\\\b", "a\\b"),
            ("a\\b", "a\\b"),
            ("\\\\\\x", "\\\\x"),
            ("plain", "plain"),
        ] {
            assert_eq!(crate_view_of_tag(sanitized), crate_view);
            let text = format!("m,t={sanitized} f=1i 1\n");
            let point = parse_lines(&text).next().unwrap().unwrap();
            assert_eq!(
                point.tag_value("t").unwrap().as_str(),
                crate_view,
                "{text:?}"
            );
            let (_, tags) = influx16_tags(series_key(&text)).unwrap();
            assert_eq!(tags[0].1, sanitized, "InfluxDB 1.6 stores it as written");
        }
    }
}
