//! InfluxDB line-protocol encoding: one [`Beacon`] becomes exactly one point.
//!
//! Client strings are sanitized so that the InfluxDB 1.6 scanner can never see a line break, an
//! early end of the tag set or an extra point: control characters are removed, backslashes that
//! would escape a separator are dropped, and separators are escaped.

use super::beacon::Beacon;
use super::policy::Measurements;

/// Where a beacon's `sess_id` goes in its point (`analytics_session`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionStorage {
    /// A string field `sess`: no new series per visit (the default).
    #[default]
    Field,
    /// A tag `sess`: every visit opens new series (the original schema).
    Tag,
    /// Not stored and never sent to the sink (still accepted and validated).
    Off,
}

impl SessionStorage {
    /// Every setting, in directive order (for tests).
    pub const ALL: [SessionStorage; 3] = [
        SessionStorage::Field,
        SessionStorage::Tag,
        SessionStorage::Off,
    ];

    /// Parses the argument of `analytics_session`.
    pub fn parse(arg: &str) -> Option<SessionStorage> {
        match arg {
            "field" => Some(SessionStorage::Field),
            "tag" => Some(SessionStorage::Tag),
            "off" => Some(SessionStorage::Off),
            _ => None,
        }
    }
}

/// Control characters removed from everything written to InfluxDB or logs: C0, DEL, C1 and the
/// Unicode line and paragraph separators.
pub(crate) fn is_control(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Appends one point for `beacon`, terminated by `\n`, to `out`; its `sess_id` becomes the tag
/// or the string field `sess`, or nothing, as `session` says (never both).
///
/// Absent tags, and tags that are empty after sanitizing, are left out; so is a `sess` field
/// that is empty after sanitizing. Non-finite floats (which
/// [`parse_beacon`](super::beacon::parse_beacon) never produces) are left out as well.
pub fn encode_point(
    beacon: &Beacon,
    measurements: &Measurements,
    session: SessionStorage,
    timestamp_ns: u64,
    out: &mut Vec<u8>,
) {
    let common = beacon.common();
    let timezone = common.timezone.map(|tz| tz.to_string());
    let sess = common.sess_id.as_deref();
    let (sess_tag, sess_field) = match session {
        SessionStorage::Tag => (sess, None),
        SessionStorage::Field => (None, sess),
        SessionStorage::Off => (None, None),
    };
    match beacon {
        Beacon::Event(event) => {
            write_measurement(out, &measurements.event);
            write_tags(
                out,
                &[
                    ("domain", Some(&common.domain)),
                    ("event", Some(&event.name)),
                    ("page", Some(&common.page)),
                    ("platform", common.platform.as_deref()),
                    ("sess", sess_tag),
                    ("timezone", timezone.as_deref()),
                    ("type", Some("event")),
                ],
            );
            out.extend_from_slice(b" counter=1i,note=");
            write_string_field(out, &event.note);
            write_sess_field(out, sess_field);
            write_float_field(out, "value", event.value);
        }
        Beacon::PageView(view) => {
            write_measurement(out, &measurements.page_view);
            write_tags(
                out,
                &[
                    ("domain", Some(&common.domain)),
                    ("page", Some(&common.page)),
                    ("platform", common.platform.as_deref()),
                    ("referrer", view.referrer_host.as_deref()),
                    ("sess", sess_tag),
                    ("timezone", timezone.as_deref()),
                    ("type", Some("pageview")),
                ],
            );
            out.extend_from_slice(b" counter=1i");
            write_float_field(out, "load_time", view.load_time);
            if let Some(pages) = view.pages_viewed {
                out.extend_from_slice(b",pages_viewed=");
                out.extend_from_slice(pages.to_string().as_bytes());
                out.push(b'i');
            }
            write_sess_field(out, sess_field);
        }
    }
    out.push(b' ');
    out.extend_from_slice(timestamp_ns.to_string().as_bytes());
    out.push(b'\n');
}

/// Writes the measurement name, escaping `,` and space (names are validated, this is a backstop).
fn write_measurement(out: &mut Vec<u8>, name: &str) {
    for b in sanitize_tag_value(name).bytes() {
        if matches!(b, b',' | b' ') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Writes `,key=value` for every present tag whose sanitized value is not empty.
fn write_tags(out: &mut Vec<u8>, tags: &[(&str, Option<&str>)]) {
    for &(key, value) in tags {
        let Some(value) = value else { continue };
        let value = sanitize_tag_value(value);
        if value.is_empty() {
            continue;
        }
        out.push(b',');
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        escape_tag_value(out, &value);
    }
}

/// Writes `,sess="<value>"` unless `value` is absent or empty after sanitizing.
fn write_sess_field(out: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value.map(sanitize_string_field).filter(|v| !v.is_empty()) else {
        return;
    };
    out.extend_from_slice(b",sess=");
    quote_string_field(out, &value);
}

/// Writes `,key=<float>` unless `value` is absent or not finite; `-0` is written as `0`.
fn write_float_field(out: &mut Vec<u8>, key: &str, value: Option<f64>) {
    let Some(value) = value.filter(|v| v.is_finite()) else {
        return;
    };
    out.push(b',');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    if value == 0.0 {
        out.push(b'0');
    } else {
        // `Display` for f64 never uses exponent notation; InfluxDB reads `812` as a float.
        out.extend_from_slice(value.to_string().as_bytes());
    }
}

/// The tag value InfluxDB will store for `value`: control characters removed, and every run of
/// backslashes removed when it is followed by `,`, space, `=` or the end of the value.
pub fn sanitize_tag_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut backslashes = 0usize;
    for c in value.chars().filter(|&c| !is_control(c)) {
        if c == '\\' {
            backslashes += 1;
            continue;
        }
        if !matches!(c, ',' | ' ' | '=') {
            out.extend(std::iter::repeat_n('\\', backslashes));
        }
        backslashes = 0;
        out.push(c);
    }
    out
}

/// Escapes `,`, space and `=` of an already sanitized tag value.
fn escape_tag_value(out: &mut Vec<u8>, sanitized: &str) {
    for b in sanitized.bytes() {
        if matches!(b, b',' | b' ' | b'=') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Appends `value` as a tag value: sanitized like [`sanitize_tag_value`], then `,`, space and
/// `=` escaped. Writes nothing when the sanitized value is empty (callers omit such tags).
pub fn write_tag_value(out: &mut Vec<u8>, value: &str) {
    escape_tag_value(out, &sanitize_tag_value(value));
}

/// The string field value InfluxDB will store for `value`: control characters removed except
/// tab and line feed (carriage return is removed).
pub fn sanitize_string_field(value: &str) -> String {
    value
        .chars()
        .filter(|&c| c == '\t' || c == '\n' || !is_control(c))
        .collect()
}

/// Appends `value` as a quoted string field value: sanitized like [`sanitize_string_field`],
/// then `\` and `"` escaped with a backslash.
pub fn write_string_field(out: &mut Vec<u8>, value: &str) {
    quote_string_field(out, &sanitize_string_field(value));
}

/// Appends an already sanitized string field value in quotes, `\` and `"` escaped.
fn quote_string_field(out: &mut Vec<u8>, sanitized: &str) {
    out.push(b'"');
    for b in sanitized.bytes() {
        if matches!(b, b'\\' | b'"') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::beacon::{parse_beacon, Common, Event, PageView};

    const TS: u64 = 1_700_000_000_000_000_000;

    /// The line for `beacon` with the default `analytics_session field`.
    fn encode(beacon: &Beacon) -> String {
        encode_with(beacon, SessionStorage::default())
    }

    fn encode_with(beacon: &Beacon, session: SessionStorage) -> String {
        let mut out = Vec::new();
        encode_point(beacon, &Measurements::default(), session, TS, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn encode_body(body: &str) -> String {
        encode(&parse_beacon(body.as_bytes()).unwrap())
    }

    fn common() -> Common<'static> {
        Common {
            domain: "example.com".into(),
            page: "/".into(),
            timezone: None,
            platform: None,
            sess_id: None,
        }
    }

    fn page_view() -> PageView<'static> {
        PageView {
            common: common(),
            referrer_host: None,
            load_time: None,
            pages_viewed: None,
        }
    }

    fn tag(value: &str) -> String {
        let mut out = Vec::new();
        write_tag_value(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    fn string_field(value: &str) -> String {
        let mut out = Vec::new();
        write_string_field(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sample_event() {
        let body = concat!(
            r#"{"domain":"www.example.com","page":"/posts/blog/general/share-buttons.html","#,
            r#""timezone":-60,"platform":"Linux x86_64","sess_id":"07ab-8022","#,
            r#""event":"socialClick","note":"mastodon"}"#
        );
        assert_eq!(
            encode_body(body),
            "pf_analytics_event,domain=www.example.com,event=socialclick,\
             page=/posts/blog/general/share-buttons.html,platform=Linux\\ x86_64,\
             timezone=-60,type=event counter=1i,note=\"mastodon\",sess=\"07ab-8022\" \
             1700000000000000000\n"
        );
    }

    #[test]
    fn sample_page_view() {
        let body = concat!(
            r#"{"domain":"www.example.com","page":"/posts/hello.html?utm_source=feed#comments","#,
            r#""referrer":"https://news.example.org/item?id=123","timezone":330,"#,
            r#""platform":"Win32","sess_id":"5e5e-0001","load_time":812.5,"pages_viewed":3}"#
        );
        assert_eq!(
            encode_body(body),
            "pf_analytics,domain=www.example.com,page=/posts/hello.html,platform=Win32,\
             referrer=news.example.org,timezone=330,type=pageview \
             counter=1i,load_time=812.5,pages_viewed=3i,sess=\"5e5e-0001\" 1700000000000000000\n"
        );
    }

    #[test]
    fn sample_minimal_page_view_with_utcoffset() {
        let body = concat!(
            r#"{"page":"/foo/bar","domain":"www.example.com","referrer":"","utcoffset":"0","#,
            r#""platform":"Linux x86_64"}"#
        );
        assert_eq!(
            encode_body(body),
            "pf_analytics,domain=www.example.com,page=/foo/bar,platform=Linux\\ x86_64,\
             timezone=0,type=pageview counter=1i 1700000000000000000\n"
        );
    }

    #[test]
    fn sample_injection_attempt_stays_one_point() {
        let body = concat!(
            r#"{"domain":"www.example.com","#,
            r#""page":"/x y,z=1\npf_analytics_event,domain=evil counter=100i","#,
            r#""platform":"Linux\\","sess_id":"a=b c","event":"socialclick","#,
            r#""note":"say \"hi\" \\ then\nnew line"}"#
        );
        let line = encode_body(body);
        assert_eq!(
            line,
            "pf_analytics_event,domain=www.example.com,event=socialclick,\
             page=/x\\ y\\,z\\=1pf_analytics_event\\,domain\\=evil\\ counter\\=100i,\
             platform=Linux,type=event \
             counter=1i,note=\"say \\\"hi\\\" \\\\ then\nnew line\",sess=\"a=b c\" \
             1700000000000000000\n"
        );
        let point = parse_line(line.as_bytes()).unwrap();
        assert_eq!(point.tags.len(), 5);
        assert_eq!(
            point
                .tags
                .iter()
                .find(|(k, _)| k == "page")
                .map(|(_, v)| v.as_str()),
            Some("/x y,z=1pf_analytics_event,domain=evil counter=100i")
        );
        assert_eq!(
            point.fields[1],
            (
                "note".into(),
                Field::Str("say \"hi\" \\ then\nnew line".into())
            )
        );
        assert_eq!(point.fields[2], ("sess".into(), Field::Str("a=b c".into())));
    }

    #[test]
    fn the_session_is_a_field_a_tag_or_nothing() {
        let event = concat!(
            r#"{"domain":"a.com","page":"/","sess_id":"07ab-8022","event":"e","note":"n","#,
            r#""value":2}"#
        );
        let view = r#"{"domain":"a.com","page":"/","sess_id":"07ab-8022","pages_viewed":3}"#;
        for (body, session, expected) in [
            (
                event,
                SessionStorage::Field,
                r#"pf_analytics_event,domain=a.com,event=e,page=/,type=event counter=1i,note="n",sess="07ab-8022",value=2"#,
            ),
            (
                event,
                SessionStorage::Tag,
                r#"pf_analytics_event,domain=a.com,event=e,page=/,sess=07ab-8022,type=event counter=1i,note="n",value=2"#,
            ),
            (
                event,
                SessionStorage::Off,
                r#"pf_analytics_event,domain=a.com,event=e,page=/,type=event counter=1i,note="n",value=2"#,
            ),
            (
                view,
                SessionStorage::Field,
                r#"pf_analytics,domain=a.com,page=/,type=pageview counter=1i,pages_viewed=3i,sess="07ab-8022""#,
            ),
            (
                view,
                SessionStorage::Tag,
                r#"pf_analytics,domain=a.com,page=/,sess=07ab-8022,type=pageview counter=1i,pages_viewed=3i"#,
            ),
            (
                view,
                SessionStorage::Off,
                r#"pf_analytics,domain=a.com,page=/,type=pageview counter=1i,pages_viewed=3i"#,
            ),
        ] {
            let beacon = parse_beacon(body.as_bytes()).unwrap();
            assert_eq!(
                encode_with(&beacon, session),
                format!("{expected} {TS}\n"),
                "{session:?}: {body}"
            );
        }
    }

    #[test]
    fn without_a_session_id_no_setting_writes_sess() {
        for body in [
            r#"{"domain":"a.com","page":"/"}"#,
            r#"{"domain":"a.com","page":"/","sess_id":""}"#,
            r#"{"domain":"a.com","page":"/","sess_id":null,"event":"e"}"#,
        ] {
            let beacon = parse_beacon(body.as_bytes()).unwrap();
            for session in SessionStorage::ALL {
                let line = encode_with(&beacon, session);
                assert!(!line.contains("sess"), "{session:?}: {body}: {line}");
            }
        }
    }

    #[test]
    fn a_session_field_is_escaped_like_a_string_field() {
        for (sess_id, field) in [
            ("a b,c=d", r#",sess="a b,c=d""#),
            ("say \"hi\"", r#",sess="say \"hi\"""#),
            ("ends\\", r#",sess="ends\\""#),
            ("tab\there", ",sess=\"tab\there\""),
            ("a\r\u{0}\u{2028}b", r#",sess="ab""#),
            // Empty after sanitizing: left out, as an empty tag would be.
            ("\r\u{0}\u{85}", ""),
        ] {
            let beacon = Beacon::PageView(PageView {
                common: Common {
                    sess_id: Some(sess_id.into()),
                    ..common()
                },
                ..page_view()
            });
            assert_eq!(
                encode(&beacon),
                format!(
                    "pf_analytics,domain=example.com,page=/,type=pageview counter=1i{field} {TS}\n"
                ),
                "{sess_id:?}"
            );
            let point = parse_line(encode(&beacon).as_bytes()).unwrap();
            let stored = point
                .fields
                .iter()
                .find(|(k, _)| k == "sess")
                .map(|(_, v)| v);
            let expected = sanitize_string_field(sess_id);
            assert_eq!(
                stored,
                (!expected.is_empty()).then_some(&Field::Str(expected)),
                "{sess_id:?}"
            );
        }
    }

    #[test]
    fn tag_values_are_sanitized_and_escaped() {
        for (input, written, stored) in [
            ("plain", "plain", "plain"),
            ("a,b", "a\\,b", "a,b"),
            ("a b", "a\\ b", "a b"),
            ("a=b", "a\\=b", "a=b"),
            ("Linux\\", "Linux", "Linux"),
            ("a\\\\\\", "a", "a"),
            ("a\\ b", "a\\ b", "a b"),
            ("a\\\\ b", "a\\ b", "a b"),
            ("a\\,b", "a\\,b", "a,b"),
            ("a\\=b", "a\\=b", "a=b"),
            ("a\\b", "a\\b", "a\\b"),
            ("a\\\\b", "a\\\\b", "a\\\\b"),
            ("\\\\x\\", "\\\\x", "\\\\x"),
            ("a\nb", "ab", "ab"),
            ("a\\\nb", "a\\b", "a\\b"),
            ("a\\\n b", "a\\ b", "a b"),
            ("a\r\t\u{0}\u{7f}\u{85}\u{9f}\u{2028}\u{2029}b", "ab", "ab"),
            ("é€😀", "é€😀", "é€😀"),
            ("\u{a0}x", "\u{a0}x", "\u{a0}x"),
            (" ", "\\ ", " "),
            ("\\", "", ""),
            ("\n", "", ""),
            ("", "", ""),
        ] {
            assert_eq!(tag(input), written, "{input:?}");
            assert_eq!(sanitize_tag_value(input), stored, "{input:?}");
        }
    }

    #[test]
    fn string_fields_are_sanitized_and_escaped() {
        for (input, written, stored) in [
            ("mastodon", "\"mastodon\"", "mastodon"),
            ("say \"hi\"", "\"say \\\"hi\\\"\"", "say \"hi\""),
            ("back\\slash", "\"back\\\\slash\"", "back\\slash"),
            ("ends with \\", "\"ends with \\\\\"", "ends with \\"),
            ("new\nline", "\"new\nline\"", "new\nline"),
            ("tab\there", "\"tab\there\"", "tab\there"),
            ("crlf\r\n", "\"crlf\n\"", "crlf\n"),
            ("a\u{0}\u{1b}\u{7f}\u{85}\u{2028}\u{2029}b", "\"ab\"", "ab"),
            ("a, b=c", "\"a, b=c\"", "a, b=c"),
            ("", "\"\"", ""),
        ] {
            assert_eq!(string_field(input), written, "{input:?}");
            assert_eq!(sanitize_string_field(input), stored, "{input:?}");
        }
    }

    #[test]
    fn floats_are_always_float_literals() {
        for (load_time, expected) in [
            (Some(812.5), ",load_time=812.5"),
            (Some(812.0), ",load_time=812"),
            (Some(0.0), ",load_time=0"),
            (Some(-0.0), ",load_time=0"),
            (Some(0.1), ",load_time=0.1"),
            (Some(1e-7), ",load_time=0.0000001"),
            (Some(600_000.0), ",load_time=600000"),
            (Some(1e15), ",load_time=1000000000000000"),
            (Some(-2.5), ",load_time=-2.5"),
            (Some(f64::NAN), ""),
            (Some(f64::INFINITY), ""),
            (None, ""),
        ] {
            let view = Beacon::PageView(PageView {
                load_time,
                ..page_view()
            });
            let expected = format!(
                "pf_analytics,domain=example.com,page=/,type=pageview counter=1i{expected} {TS}\n"
            );
            assert_eq!(encode(&view), expected, "{load_time:?}");
        }
    }

    #[test]
    fn field_types_never_vary() {
        for (body, fields) in [
            (
                r#"{"domain":"a.com","page":"/","pages_viewed":1}"#,
                "counter=1i,pages_viewed=1i",
            ),
            (
                r#"{"domain":"a.com","page":"/","load_time":5}"#,
                "counter=1i,load_time=5",
            ),
            (
                r#"{"domain":"a.com","page":"/","event":"e"}"#,
                "counter=1i,note=\"\"",
            ),
            (
                r#"{"domain":"a.com","page":"/","event":"e","value":3}"#,
                "counter=1i,note=\"\",value=3",
            ),
            (
                r#"{"domain":"a.com","page":"/","event":"e","value":-1.5}"#,
                "counter=1i,note=\"\",value=-1.5",
            ),
        ] {
            let line = encode_body(body);
            assert!(
                line.contains(&format!(" {fields} {TS}\n")),
                "{body}: {line}"
            );
        }
    }

    #[test]
    fn empty_and_absent_tags_are_omitted() {
        let beacon = Beacon::PageView(PageView {
            common: Common {
                platform: Some("\r\n".into()),
                sess_id: Some("\\\\".into()),
                timezone: Some(0),
                ..common()
            },
            referrer_host: Some(String::new()),
            ..page_view()
        });
        assert_eq!(
            encode_with(&beacon, SessionStorage::Tag),
            format!(
                "pf_analytics,domain=example.com,page=/,timezone=0,type=pageview counter=1i {TS}\n"
            )
        );
    }

    #[test]
    fn custom_measurements_are_used_and_escaped() {
        let view = Beacon::PageView(page_view());
        for (page_view, expected) in [
            ("web", "web,"),
            ("we b", "we\\ b,"),
            ("w,eb", "w\\,eb,"),
            ("w\neb\\", "web,"),
        ] {
            let measurements = Measurements {
                page_view: page_view.into(),
                event: "ev".into(),
            };
            let mut out = Vec::new();
            encode_point(&view, &measurements, SessionStorage::Field, 1, &mut out);
            let line = String::from_utf8(out).unwrap();
            assert!(line.starts_with(expected), "{page_view:?}: {line}");
        }
    }

    #[test]
    fn points_are_appended() {
        let mut out = b"previous\n".to_vec();
        encode_point(
            &Beacon::PageView(page_view()),
            &Measurements::default(),
            SessionStorage::Field,
            7,
            &mut out,
        );
        assert_eq!(
            out,
            b"previous\npf_analytics,domain=example.com,page=/,type=pageview counter=1i 7\n"
        );
    }

    /// A field value as a line-protocol reader sees it.
    #[derive(Debug, PartialEq)]
    enum Field {
        Str(String),
        Other(String),
    }

    /// A point as read back by [`parse_line`].
    #[derive(Debug)]
    struct Point {
        measurement: String,
        tags: Vec<(String, String)>,
        fields: Vec<(String, Field)>,
        timestamp: u64,
    }

    /// Reads a key, measurement or tag value up to one of `stops`, the way InfluxDB 1.6 does:
    /// a backslash escapes the next byte, and only `\,`, `\ ` and `\=` are unescaped. Also
    /// rejects separators preceded by a backslash (the 1.6 tag scanner only checks the previous
    /// byte), unescaped `forbidden` bytes and line breaks.
    fn scan_token(
        line: &[u8],
        i: &mut usize,
        stops: &[u8],
        forbidden: &[u8],
    ) -> Result<(String, u8), String> {
        let mut token = Vec::new();
        while let Some(&b) = line.get(*i) {
            if b == b'\\' {
                let next = *line.get(*i + 1).ok_or("backslash at end of line")?;
                if !matches!(next, b',' | b' ' | b'=') {
                    token.push(b'\\');
                }
                token.push(next);
                *i += 2;
                continue;
            }
            if b == b'\n' {
                return Err(format!("line break at {i}"));
            }
            if forbidden.contains(&b) {
                return Err(format!("unescaped {:?} at {i}", b as char));
            }
            if stops.contains(&b) {
                if *i > 0 && line[*i - 1] == b'\\' {
                    return Err(format!("separator after a backslash at {i}"));
                }
                *i += 1;
                return Ok((String::from_utf8(token).map_err(|e| e.to_string())?, b));
            }
            token.push(b);
            *i += 1;
        }
        Err("unexpected end of line".into())
    }

    /// Parses one complete line (which must end with its only unquoted `\n`).
    fn parse_line(line: &[u8]) -> Result<Point, String> {
        let mut i = 0;
        let (measurement, mut stop) = scan_token(line, &mut i, b", ", b"")?;
        let mut tags = Vec::new();
        while stop == b',' {
            let (key, _) = scan_token(line, &mut i, b"=", b", ")?;
            let (value, s) = scan_token(line, &mut i, b", ", b"=")?;
            if value.is_empty() {
                return Err(format!("empty tag value for {key}"));
            }
            tags.push((key, value));
            stop = s;
        }
        let mut fields = Vec::new();
        loop {
            let (key, _) = scan_token(line, &mut i, b"=", b", ")?;
            let value = if line.get(i) == Some(&b'"') {
                i += 1;
                let mut s = Vec::new();
                loop {
                    match *line.get(i).ok_or("unterminated string")? {
                        b'\\' => {
                            let next = *line.get(i + 1).ok_or("backslash at end")?;
                            if !matches!(next, b'\\' | b'"') {
                                s.push(b'\\');
                            }
                            s.push(next);
                            i += 2;
                        }
                        b'"' => break,
                        b => {
                            s.push(b);
                            i += 1;
                        }
                    }
                }
                i += 1;
                Field::Str(String::from_utf8(s).map_err(|e| e.to_string())?)
            } else {
                let start = i;
                while line.get(i).is_some_and(|b| !b", \n".contains(b)) {
                    i += 1;
                }
                Field::Other(String::from_utf8(line[start..i].to_vec()).unwrap())
            };
            fields.push((key, value));
            match line.get(i) {
                Some(b',') => i += 1,
                Some(b' ') => {
                    i += 1;
                    break;
                }
                other => return Err(format!("unexpected {other:?} after field at {i}")),
            }
        }
        let rest = line.get(i..).ok_or("missing timestamp")?;
        let digits = rest
            .strip_suffix(b"\n")
            .ok_or("line does not end with a line feed")?;
        let timestamp = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| format!("bad timestamp {digits:?}"))?;
        Ok(Point {
            measurement,
            tags,
            fields,
            timestamp,
        })
    }

    /// InfluxDB 1.6 `scanLine`: the index where the first line ends (quotes and escapes honoured).
    fn influx_line_end(buf: &[u8]) -> usize {
        let (mut i, mut quoted, mut fields, mut equals, mut commas) = (0, false, false, 0, 0);
        while i < buf.len() {
            if buf[i] == b'\\' && i + 2 < buf.len() {
                i += 2;
                continue;
            }
            if buf[i] == b' ' {
                fields = true;
            }
            if fields {
                if !quoted && buf[i] == b'=' {
                    i += 1;
                    equals += 1;
                    continue;
                } else if !quoted && buf[i] == b',' {
                    i += 1;
                    commas += 1;
                    continue;
                } else if buf[i] == b'"' && equals > commas {
                    i += 1;
                    quoted = !quoted;
                    continue;
                }
            }
            if buf[i] == b'\n' && !quoted {
                break;
            }
            i += 1;
        }
        i
    }

    /// xorshift64: a fixed pseudo-random sequence, so failures are reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn string(&mut self) -> String {
            const ALPHABET: &[char] = &[
                ',', ' ', '=', '"', '\\', '\\', '\\', '\n', '\r', '\t', '\u{0}', '\u{7f}',
                '\u{85}', '\u{2028}', '\u{2029}', 'a', 'Z', '0', '_', '-', '.', '/', '?', '#', 'é',
                '€', '😀', '\u{a0}', '\'', 'i',
            ];
            let len = self.below(24);
            (0..len)
                .map(|_| ALPHABET[self.below(ALPHABET.len())])
                .collect()
        }

        fn maybe_string(&mut self) -> Option<String> {
            (self.below(4) != 0).then(|| self.string())
        }
    }

    #[test]
    fn random_strings_always_encode_to_exactly_one_well_formed_point() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let common = Common {
                domain: rng.string().into(),
                page: format!("/{}", rng.string()).into(),
                timezone: (rng.below(2) == 0).then(|| rng.below(1681) as i32 - 840),
                platform: rng.maybe_string().map(Into::into),
                sess_id: rng.maybe_string().map(Into::into),
            };
            let float = |rng: &mut Rng| (rng.below(2) == 0).then(|| f64::from_bits(rng.next()));
            let beacon = if round % 2 == 0 {
                Beacon::Event(Event {
                    common,
                    name: rng.string().into(),
                    note: rng.string().into(),
                    value: float(&mut rng),
                })
            } else {
                Beacon::PageView(PageView {
                    common,
                    referrer_host: rng.maybe_string(),
                    load_time: float(&mut rng),
                    pages_viewed: (rng.below(2) == 0).then(|| rng.next() as u32),
                })
            };
            let ts = rng.next();
            let session = SessionStorage::ALL[round % 3];
            let mut out = Vec::new();
            encode_point(&beacon, &Measurements::default(), session, ts, &mut out);
            let shown = String::from_utf8_lossy(&out).into_owned();

            assert_eq!(influx_line_end(&out), out.len() - 1, "{shown:?}");
            assert_eq!(out.last(), Some(&b'\n'), "{shown:?}");
            let point = parse_line(&out).unwrap_or_else(|e| panic!("{e}: {shown:?}"));
            assert_eq!(point.timestamp, ts);

            let c = beacon.common();
            let tz = c.timezone.map(|t| t.to_string());
            let sess_tag = c
                .sess_id
                .as_deref()
                .filter(|_| session == SessionStorage::Tag);
            let (measurement, expected_tags, note) = match &beacon {
                Beacon::Event(e) => (
                    "pf_analytics_event",
                    vec![
                        ("domain", Some(&*c.domain)),
                        ("event", Some(&*e.name)),
                        ("page", Some(&*c.page)),
                        ("platform", c.platform.as_deref()),
                        ("sess", sess_tag),
                        ("timezone", tz.as_deref()),
                        ("type", Some("event")),
                    ],
                    Some(&e.note),
                ),
                Beacon::PageView(v) => (
                    "pf_analytics",
                    vec![
                        ("domain", Some(&*c.domain)),
                        ("page", Some(&*c.page)),
                        ("platform", c.platform.as_deref()),
                        ("referrer", v.referrer_host.as_deref()),
                        ("sess", sess_tag),
                        ("timezone", tz.as_deref()),
                        ("type", Some("pageview")),
                    ],
                    None,
                ),
            };
            let expected_tags: Vec<(String, String)> = expected_tags
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_owned(), sanitize_tag_value(v?))))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            assert_eq!(point.measurement, measurement, "{shown:?}");
            assert_eq!(point.tags, expected_tags, "{shown:?}");
            assert_eq!(
                point.fields[0],
                ("counter".into(), Field::Other("1i".into()))
            );
            if let Some(note) = note {
                let expected = Field::Str(sanitize_string_field(note));
                assert_eq!(point.fields[1], ("note".into(), expected), "{shown:?}");
            }
            let sess_field = point.fields.iter().find(|(k, _)| k == "sess");
            let expected_sess = c
                .sess_id
                .as_deref()
                .filter(|_| session == SessionStorage::Field)
                .map(sanitize_string_field)
                .filter(|v| !v.is_empty());
            assert_eq!(
                sess_field.map(|(_, v)| v),
                expected_sess.map(Field::Str).as_ref(),
                "{session:?}: {shown:?}"
            );
            for (key, value) in &point.fields {
                match (key.as_str(), value) {
                    ("note" | "sess", Field::Str(_)) => {}
                    ("counter" | "pages_viewed", Field::Other(v)) => {
                        assert!(
                            v.ends_with('i') && v[..v.len() - 1].parse::<u64>().is_ok(),
                            "{v}"
                        )
                    }
                    ("value" | "load_time", Field::Other(v)) => {
                        assert!(!v.ends_with('i') && !v.contains(['e', 'E']), "{v}");
                        assert!(v.parse::<f64>().is_ok_and(f64::is_finite), "{v}");
                    }
                    other => panic!("unexpected field {other:?}"),
                }
            }
        }
    }

    #[test]
    fn random_tag_values_read_back_as_sanitized() {
        let mut rng = Rng(42);
        for _ in 0..20_000 {
            let value = rng.string();
            let mut line = b"m,k=".to_vec();
            write_tag_value(&mut line, &value);
            line.extend_from_slice(b" f=1i 1\n");
            let stored = sanitize_tag_value(&value);
            let shown = String::from_utf8_lossy(&line).into_owned();
            if stored.is_empty() {
                assert_eq!(shown, "m,k= f=1i 1\n");
                continue;
            }
            let point = parse_line(&line).unwrap_or_else(|e| panic!("{e}: {shown:?}"));
            assert_eq!(point.tags, [("k".to_owned(), stored)], "{shown:?}");
            assert!(!point.tags[0].1.chars().any(is_control), "{shown:?}");
        }
    }
}
