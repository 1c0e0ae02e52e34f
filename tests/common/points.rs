//! Reading back the line protocol the module wrote to a [`FakeSink`](super::FakeSink): a
//! quote-aware line splitter, a parser with InfluxDB 1.6 semantics, and the README's rules for
//! what InfluxDB stores from a client string (an oracle written from the README, independent of
//! `src/core/`).

use super::sink::FakeSink;

/// A field value as read back: a string field (unescaped), or the literal token (`1i`, `2.5`).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Str(String),
    Raw(String),
}

/// One point, read the way InfluxDB 1.6 reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub measurement: String,
    /// Tags in written order, values unescaped like InfluxDB 1.6 (only `\,`, `\ `, `\=`).
    pub tags: Vec<(String, String)>,
    /// Fields in written order.
    pub fields: Vec<(String, FieldValue)>,
    pub timestamp: u64,
    /// The line as written, without its final newline.
    pub line: String,
}

impl Point {
    /// The value of tag `key`.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of field `key`.
    pub fn field(&self, key: &str) -> Option<&FieldValue> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The session: the string field `sess` (`analytics_session field`, the default) or the tag
    /// `sess` (`analytics_session tag`).
    pub fn sess(&self) -> Option<&str> {
        match self.field("sess") {
            Some(FieldValue::Str(sess)) => Some(sess),
            _ => self.tag("sess"),
        }
    }

    /// Parses one line (without its newline). Errors on anything InfluxDB 1.6 would refuse or
    /// read differently: an unescaped line break, a tag without value, a separator right after
    /// an escaping backslash, an unterminated string, a bad timestamp.
    pub fn parse(line: &str) -> Result<Point, String> {
        let b = line.as_bytes();
        let mut i = 0;
        // Series key: up to the first space not escaped by a backslash.
        let mut series_end = None;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'\n' | b'\r' => return Err(format!("line break in series key at {i}")),
                b' ' => {
                    series_end = Some(i);
                    break;
                }
                _ => i += 1,
            }
        }
        let series_end = series_end.ok_or("no space after the series key")?;
        let series = &line[..series_end];
        let parts = split_unescaped(series, b',')?;
        let unescape = |s: &str| {
            s.replace("\\,", ",")
                .replace("\\ ", " ")
                .replace("\\=", "=")
        };
        let measurement = unescape(&parts[0]);
        let mut tags = Vec::new();
        for part in &parts[1..] {
            let kv = split_unescaped(part, b'=')?;
            if kv.len() != 2 || kv[1].is_empty() {
                return Err(format!("bad tag {part:?}"));
            }
            tags.push((unescape(&kv[0]), unescape(&kv[1])));
        }

        // Field set: key=value pairs separated by commas outside quotes, then a space.
        i = series_end + 1;
        let mut fields = Vec::new();
        loop {
            let key_start = i;
            while i < b.len() && b[i] != b'=' {
                if matches!(b[i], b' ' | b',' | b'\n') {
                    return Err(format!("bad field key at {key_start}"));
                }
                i += 1;
            }
            let key = line[key_start..i].to_string();
            i += 1;
            let value = if b.get(i) == Some(&b'"') {
                i += 1;
                let mut s = Vec::new();
                loop {
                    match *b.get(i).ok_or("unterminated string field")? {
                        b'\\' if matches!(b.get(i + 1), Some(b'\\' | b'"')) => {
                            s.push(b[i + 1]);
                            i += 2;
                        }
                        b'"' => break,
                        c => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                FieldValue::Str(String::from_utf8(s).map_err(|e| e.to_string())?)
            } else {
                let start = i;
                while i < b.len() && !matches!(b[i], b',' | b' ') {
                    if b[i] == b'\n' {
                        return Err("line break in a field value".into());
                    }
                    i += 1;
                }
                FieldValue::Raw(line[start..i].to_string())
            };
            fields.push((key, value));
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b' ') => {
                    i += 1;
                    break;
                }
                _ => return Err(format!("no timestamp in {line:?}")),
            }
        }
        let timestamp = line[i..]
            .parse::<u64>()
            .map_err(|_| format!("bad timestamp {:?}", &line[i..]))?;
        Ok(Point {
            measurement,
            tags,
            fields,
            timestamp,
            line: line.to_string(),
        })
    }
}

/// Splits at `sep` bytes not escaped by a backslash; errors when `sep` directly follows a
/// backslash that is itself escaped-looking in a way InfluxDB 1.6 would misread (a run of
/// backslashes before a separator).
fn split_unescaped(s: &str, sep: u8) -> Result<Vec<String>, String> {
    let b = s.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if i + 1 >= b.len() {
                return Err(format!("trailing backslash in {s:?}"));
            }
            i += 2;
            continue;
        }
        if b[i] == sep {
            // InfluxDB 1.6 only looks at the previous byte: `\\,` would be read as `\` + `\,`.
            if i > 0 && b[i - 1] == b'\\' {
                return Err(format!("separator after a backslash in {s:?}"));
            }
            parts.push(s[start..i].to_string());
            start = i + 1;
        }
        i += 1;
    }
    parts.push(s[start..].to_string());
    Ok(parts)
}

/// Splits a write body into lines at the newlines that end a point: not those inside a quoted
/// string field, nor escaped ones. Every line must end with a newline.
pub fn split_lines(body: &str) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut in_fields = false;
    let mut quoted = false;
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            ' ' if !quoted => {
                in_fields = true;
                current.push(c);
            }
            '"' if in_fields => {
                quoted = !quoted;
                current.push(c);
            }
            '\n' if !quoted => {
                lines.push(std::mem::take(&mut current));
                in_fields = false;
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() || quoted {
        return Err(format!(
            "write does not end with a complete line: {current:?}"
        ));
    }
    Ok(lines)
}

/// Every point the sink received so far, across all writes, in arrival order. Panics on a body
/// that is not valid line protocol.
pub fn sink_points(sink: &FakeSink) -> Vec<Point> {
    let mut points = Vec::new();
    for req in sink.requests() {
        let body = String::from_utf8(req.body.clone()).expect("line protocol is UTF-8");
        let lines = split_lines(&body).unwrap_or_else(|e| panic!("{e}\nbody: {body:?}"));
        for line in lines {
            points.push(Point::parse(&line).unwrap_or_else(|e| panic!("{e}\nline: {line:?}")));
        }
    }
    points
}

/// Control characters the module removes (README: "control characters are removed"): C0, DEL,
/// C1, U+2028, U+2029.
pub fn is_removed_control(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// The tag value InfluxDB stores for a client string, per the README: control characters
/// removed; a run of backslashes right before `,`, space, `=` or the end is dropped; other
/// backslashes kept.
pub fn stored_tag(value: &str) -> String {
    let chars: Vec<char> = value.chars().filter(|&c| !is_removed_control(c)).collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' {
            let start = i;
            while i < chars.len() && chars[i] == '\\' {
                i += 1;
            }
            let dropped = i == chars.len() || matches!(chars[i], ',' | ' ' | '=');
            if !dropped {
                out.extend(&chars[start..i]);
            }
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The string field value InfluxDB stores for a client string (`note`), per the README: line
/// feeds and tabs kept, other control characters (including CR) removed.
pub fn stored_string_field(value: &str) -> String {
    value
        .chars()
        .filter(|&c| c == '\n' || c == '\t' || !is_removed_control(c))
        .collect()
}
