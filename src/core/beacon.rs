//! Beacon schema and validation: a JSON request body becomes a [`Beacon`] or a 400-class
//! [`BeaconError`].
//!
//! The body must be a UTF-8 JSON object. Only the known keys are looked at; unknown keys are
//! skipped without being stored. A known key may appear only once. `null` for an optional key
//! means "absent"; for a required key it means "missing".
//!
//! Strings are borrowed from the body wherever JSON allows it (no escape sequence, nothing to
//! lowercase or cut), so a typical beacon is validated without allocating.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Longest accepted `domain` after normalization, in bytes (the longest DNS name).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest accepted `page` after the query and fragment are cut off, in bytes.
pub const MAX_PAGE_LEN: usize = 1024;
/// Longest accepted `platform`, in bytes.
pub const MAX_PLATFORM_LEN: usize = 64;
/// Longest accepted `sess_id`, in bytes.
pub const MAX_SESS_ID_LEN: usize = 64;
/// Longest accepted `event` name, in bytes.
pub const MAX_EVENT_LEN: usize = 64;
/// Longest accepted `note`, in bytes.
pub const MAX_NOTE_LEN: usize = 1024;
/// Longest accepted `referrer` URL, in bytes.
pub const MAX_REFERRER_LEN: usize = 2048;
/// Largest accepted magnitude of `timezone` / `utcoffset`, in minutes.
pub const MAX_TIMEZONE_MINUTES: i64 = 840;
/// Largest accepted `load_time`, in milliseconds.
pub const MAX_LOAD_TIME_MS: f64 = 600_000.0;
/// Largest accepted `pages_viewed`.
pub const MAX_PAGES_VIEWED: i64 = 1_000_000;
/// Largest accepted magnitude of an event's `value`.
pub const MAX_VALUE_MAGNITUDE: f64 = 1e15;

/// Fields shared by page views and events (strings borrowed from the body where possible).
#[derive(Debug, Clone, PartialEq)]
pub struct Common<'a> {
    /// Site host name: lowercase, no trailing dot, `[a-z0-9.-]{1,253}`.
    pub domain: Cow<'a, str>,
    /// Path of the page, starting with `/`, without query and fragment (not yet sanitized).
    pub page: Cow<'a, str>,
    /// Offset from UTC in minutes as the browser reports it, `-840..=840`.
    pub timezone: Option<i32>,
    /// Browser platform string (at most 64 bytes, never empty).
    pub platform: Option<Cow<'a, str>>,
    /// Session id chosen by the browser agent (at most 64 bytes, never empty).
    pub sess_id: Option<Cow<'a, str>>,
}

/// A page-view beacon (a beacon without an `event` key).
#[derive(Debug, Clone, PartialEq)]
pub struct PageView<'a> {
    /// Shared fields.
    pub common: Common<'a>,
    /// Host part of the referrer URL, when it had a usable one.
    pub referrer_host: Option<String>,
    /// Page load time in milliseconds, `0..=600000`.
    pub load_time: Option<f64>,
    /// Pages viewed in this session so far, `1..=1000000`.
    pub pages_viewed: Option<u32>,
}

/// A named-event beacon (a beacon with an `event` key).
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// Shared fields.
    pub common: Common<'a>,
    /// Event name, ASCII-lowercased, at most 64 bytes; its charset is checked by the policy.
    pub name: Cow<'a, str>,
    /// Free-form note, at most 1024 bytes; empty when absent.
    pub note: Cow<'a, str>,
    /// Optional finite value with magnitude at most 1e15.
    pub value: Option<f64>,
}

/// A validated beacon, borrowing from the body it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub enum Beacon<'a> {
    /// A page view.
    PageView(PageView<'a>),
    /// A named event.
    Event(Event<'a>),
}

impl<'a> Beacon<'a> {
    /// The fields shared by both kinds.
    pub fn common(&self) -> &Common<'a> {
        match self {
            Beacon::PageView(view) => &view.common,
            Beacon::Event(event) => &event.common,
        }
    }

    /// The same beacon owning all its strings (no longer tied to the body).
    pub fn into_owned(self) -> Beacon<'static> {
        let own = |s: Cow<'_, str>| Cow::Owned(s.into_owned());
        let common = |c: Common<'_>| Common {
            domain: own(c.domain),
            page: own(c.page),
            timezone: c.timezone,
            platform: c.platform.map(own),
            sess_id: c.sess_id.map(own),
        };
        match self {
            Beacon::PageView(view) => Beacon::PageView(PageView {
                common: common(view.common),
                referrer_host: view.referrer_host,
                load_time: view.load_time,
                pages_viewed: view.pages_viewed,
            }),
            Beacon::Event(event) => Beacon::Event(Event {
                common: common(event.common),
                name: own(event.name),
                note: own(event.note),
                value: event.value,
            }),
        }
    }

    /// The lowercased event name, or `None` for a page view.
    pub fn event_name(&self) -> Option<&str> {
        match self {
            Beacon::PageView(_) => None,
            Beacon::Event(event) => Some(&event.name),
        }
    }
}

/// Why a body is not a valid beacon (answered with 400). Messages never contain body data.
#[derive(Debug, Clone, PartialEq)]
pub enum BeaconError {
    /// The body is empty or only whitespace.
    EmptyBody,
    /// The body is not valid UTF-8.
    NotUtf8,
    /// The body is not valid JSON; holds serde_json's message (position only, no data).
    InvalidJson(String),
    /// The body is valid JSON but its top level is not an object.
    NotAnObject,
    /// A known key appears more than once.
    DuplicateKey(&'static str),
    /// A required key is absent or `null`.
    Missing(&'static str),
    /// A key has the wrong JSON type; `expected` reads like "a string".
    WrongType {
        /// The key.
        field: &'static str,
        /// The expected type, with article.
        expected: &'static str,
    },
    /// A string value is longer than allowed.
    TooLong {
        /// The key.
        field: &'static str,
        /// The limit in bytes.
        max: usize,
    },
    /// A number is outside its accepted range.
    OutOfRange {
        /// The key.
        field: &'static str,
        /// Smallest accepted value.
        min: f64,
        /// Largest accepted value.
        max: f64,
    },
    /// `page` does not start with `/`.
    PageNotAbsolute,
    /// A value is malformed (used for `domain`).
    Invalid(&'static str),
}

impl fmt::Display for BeaconError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BeaconError::EmptyBody => f.write_str("empty body"),
            BeaconError::NotUtf8 => f.write_str("body is not valid UTF-8"),
            BeaconError::InvalidJson(msg) => write!(f, "invalid JSON: {msg}"),
            BeaconError::NotAnObject => f.write_str("beacon must be a JSON object"),
            BeaconError::DuplicateKey(key) => write!(f, "duplicate key `{key}`"),
            BeaconError::Missing(key) => write!(f, "missing `{key}`"),
            BeaconError::WrongType { field, expected } => write!(f, "`{field}` must be {expected}"),
            BeaconError::TooLong { field, max } => {
                write!(f, "`{field}` is longer than {max} bytes")
            }
            BeaconError::OutOfRange { field, min, max } => {
                write!(f, "`{field}` must be between {min} and {max}")
            }
            BeaconError::PageNotAbsolute => f.write_str("`page` must start with \"/\""),
            BeaconError::Invalid(field) => write!(f, "invalid `{field}`"),
        }
    }
}

impl std::error::Error for BeaconError {}

/// The keys the parser looks at; everything else is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Domain,
    Page,
    Timezone,
    Utcoffset,
    Platform,
    SessId,
    Event,
    Note,
    Value,
    Referrer,
    LoadTime,
    PagesViewed,
}

const KEY_COUNT: usize = 12;

const KEYS: [Key; KEY_COUNT] = [
    Key::Domain,
    Key::Page,
    Key::Timezone,
    Key::Utcoffset,
    Key::Platform,
    Key::SessId,
    Key::Event,
    Key::Note,
    Key::Value,
    Key::Referrer,
    Key::LoadTime,
    Key::PagesViewed,
];

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Domain => "domain",
            Key::Page => "page",
            Key::Timezone => "timezone",
            Key::Utcoffset => "utcoffset",
            Key::Platform => "platform",
            Key::SessId => "sess_id",
            Key::Event => "event",
            Key::Note => "note",
            Key::Value => "value",
            Key::Referrer => "referrer",
            Key::LoadTime => "load_time",
            Key::PagesViewed => "pages_viewed",
        }
    }

    fn from_name(name: &str) -> Option<Key> {
        KEYS.iter().copied().find(|key| key.name() == name)
    }
}

/// An object key: `Some` for a known key, `None` for one to skip.
struct MapKey(Option<Key>);

impl<'de> Deserialize<'de> for MapKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = MapKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<MapKey, E> {
                Ok(MapKey(Key::from_name(key)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A JSON value of a known key: strings borrowed from the body when they hold no escape,
/// numbers as parsed, and everything else reduced to its kind (nested arrays and objects are
/// still walked, so the nesting limit applies to them).
#[derive(Debug)]
enum Value<'a> {
    Null,
    String(Cow<'a, str>),
    Integer(i64),
    /// A non-negative integer (any `u64`; those above `i64::MAX` are out of every range).
    Unsigned(u64),
    Float(f64),
    /// A boolean, an array or an object: never a valid value of a known key.
    Other,
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = Value<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_unit<E>(self) -> Result<Value<'de>, E> {
                Ok(Value::Null)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Value<'de>, E> {
                Ok(Value::Other)
            }

            fn visit_i64<E>(self, n: i64) -> Result<Value<'de>, E> {
                Ok(Value::Integer(n))
            }

            fn visit_u64<E>(self, n: u64) -> Result<Value<'de>, E> {
                Ok(Value::Unsigned(n))
            }

            fn visit_f64<E>(self, n: f64) -> Result<Value<'de>, E> {
                Ok(Value::Float(n))
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Value<'de>, E> {
                Ok(Value::String(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Value<'de>, E> {
                Ok(Value::String(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E>(self, s: String) -> Result<Value<'de>, E> {
                Ok(Value::String(Cow::Owned(s)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
                while seq.next_element::<Value>()?.is_some() {}
                Ok(Value::Other)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, Value>()?.is_some() {}
                Ok(Value::Other)
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

/// The known keys of a beacon object, still as raw JSON values.
#[derive(Default)]
struct RawBeacon<'a> {
    /// Indexed by `Key as usize`; `Some(Value::Null)` records an explicit `null`.
    values: [Option<Value<'a>>; KEY_COUNT],
    /// The first known key seen twice.
    duplicate: Option<Key>,
}

impl<'de> Deserialize<'de> for RawBeacon<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;

        impl<'de> Visitor<'de> for RawVisitor {
            type Value = RawBeacon<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBeacon<'de>, A::Error> {
                let mut raw = RawBeacon::default();
                while let Some(MapKey(key)) = map.next_key()? {
                    let slot = match key {
                        Some(key) if raw.duplicate.is_none() => raw.values.get_mut(key as usize),
                        _ => None,
                    };
                    match (key, slot) {
                        (Some(key), Some(slot)) if slot.is_some() => {
                            // Keep consuming so that the rest of the body is still
                            // syntax-checked; the duplicate is reported afterwards.
                            raw.duplicate = Some(key);
                            map.next_value::<IgnoredAny>()?;
                        }
                        (Some(_), Some(slot)) => *slot = Some(map.next_value::<Value>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(raw)
            }
        }

        deserializer.deserialize_map(RawVisitor)
    }
}

impl<'a> RawBeacon<'a> {
    /// Takes the value of `key`; `null` counts as absent.
    fn take(&mut self, key: Key) -> Option<Value<'a>> {
        match self.values.get_mut(key as usize).and_then(Option::take) {
            None | Some(Value::Null) => None,
            Some(value) => Some(value),
        }
    }

    fn opt_string(&mut self, key: Key, max: usize) -> Result<Option<Cow<'a, str>>, BeaconError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() > max => Err(BeaconError::TooLong {
                field: key.name(),
                max,
            }),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(key, "a string")),
        }
    }

    /// An optional string where the empty string also means absent.
    fn opt_nonempty_string(
        &mut self,
        key: Key,
        max: usize,
    ) -> Result<Option<Cow<'a, str>>, BeaconError> {
        Ok(self.opt_string(key, max)?.filter(|s| !s.is_empty()))
    }

    fn required_string(&mut self, key: Key) -> Result<Cow<'a, str>, BeaconError> {
        match self.take(key) {
            None => Err(BeaconError::Missing(key.name())),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(wrong_type(key, "a string")),
        }
    }

    /// An optional JSON integer (floats such as `1.0` are a type error) within `min..=max`.
    fn opt_integer(&mut self, key: Key, min: i64, max: i64) -> Result<Option<i64>, BeaconError> {
        self.take(key)
            .map(|value| integer(key, &value, min, max))
            .transpose()
    }

    /// An optional finite JSON number (integer or float) within `min..=max`.
    fn opt_number(&mut self, key: Key, min: f64, max: f64) -> Result<Option<f64>, BeaconError> {
        let number = match self.take(key) {
            None => return Ok(None),
            Some(Value::Integer(n)) => n as f64,
            Some(Value::Unsigned(n)) => n as f64,
            Some(Value::Float(n)) => n,
            Some(_) => return Err(wrong_type(key, "a number")),
        };
        match number {
            v if v.is_finite() && v >= min && v <= max => Ok(Some(v)),
            _ => Err(out_of_range(key, min, max)),
        }
    }

    /// `utcoffset`: an integer, or a string holding one; an empty string means absent.
    fn opt_utcoffset(&mut self) -> Result<Option<i64>, BeaconError> {
        let key = Key::Utcoffset;
        let (min, max) = (-MAX_TIMEZONE_MINUTES, MAX_TIMEZONE_MINUTES);
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => {
                let s = s.trim_ascii();
                if s.is_empty() {
                    return Ok(None);
                }
                let n = s
                    .parse::<i64>()
                    .map_err(|_| wrong_type(key, "an integer"))?;
                if (min..=max).contains(&n) {
                    Ok(Some(n))
                } else {
                    Err(out_of_range(key, min as f64, max as f64))
                }
            }
            Some(value) => integer(key, &value, min, max).map(Some),
        }
    }
}

/// Checks that `value` is a JSON integer within `min..=max`.
fn integer(key: Key, value: &Value, min: i64, max: i64) -> Result<i64, BeaconError> {
    let n = match *value {
        Value::Integer(n) => Some(n),
        Value::Unsigned(n) => i64::try_from(n).ok(),
        _ => return Err(wrong_type(key, "an integer")),
    };
    n.filter(|n| (min..=max).contains(n))
        .ok_or_else(|| out_of_range(key, min as f64, max as f64))
}

fn wrong_type(key: Key, expected: &'static str) -> BeaconError {
    BeaconError::WrongType {
        field: key.name(),
        expected,
    }
}

fn out_of_range(key: Key, min: f64, max: f64) -> BeaconError {
    BeaconError::OutOfRange {
        field: key.name(),
        min,
        max,
    }
}

/// Longest serde_json error message passed on (they hold only a description and a position).
const MAX_JSON_ERROR_LEN: usize = 128;

fn json_error(err: &serde_json::Error) -> BeaconError {
    let msg: String = err
        .to_string()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_JSON_ERROR_LEN)
        .collect();
    BeaconError::InvalidJson(msg)
}

/// Parses and validates a beacon body; the beacon borrows its strings from `body` where it can.
pub fn parse_beacon(body: &[u8]) -> Result<Beacon<'_>, BeaconError> {
    let text = std::str::from_utf8(body).map_err(|_| BeaconError::NotUtf8)?;
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\r']);
    if trimmed.is_empty() {
        return Err(BeaconError::EmptyBody);
    }
    if !trimmed.starts_with('{') {
        // Tell "valid JSON, but not an object" apart from a syntax error.
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => BeaconError::NotAnObject,
            Err(err) => json_error(&err),
        });
    }
    let mut raw: RawBeacon = serde_json::from_str(text).map_err(|err| json_error(&err))?;
    if let Some(key) = raw.duplicate {
        return Err(BeaconError::DuplicateKey(key.name()));
    }

    let domain = raw.required_string(Key::Domain)?;
    let domain = normalize_domain(domain).ok_or(BeaconError::Invalid("domain"))?;

    let mut page = raw.required_string(Key::Page)?;
    let path_len = page.find(['?', '#']).unwrap_or(page.len());
    if !page.starts_with('/') {
        return Err(BeaconError::PageNotAbsolute);
    }
    if path_len > MAX_PAGE_LEN {
        return Err(BeaconError::TooLong {
            field: "page",
            max: MAX_PAGE_LEN,
        });
    }
    match &mut page {
        Cow::Borrowed(path) => *path = &path[..path_len],
        Cow::Owned(path) => path.truncate(path_len),
    }

    let timezone = raw.opt_integer(Key::Timezone, -MAX_TIMEZONE_MINUTES, MAX_TIMEZONE_MINUTES)?;
    let utcoffset = raw.opt_utcoffset()?;
    // Both are within -840..=840, so the conversion cannot fail.
    let timezone = timezone.or(utcoffset).and_then(|tz| i32::try_from(tz).ok());

    let platform = raw.opt_nonempty_string(Key::Platform, MAX_PLATFORM_LEN)?;
    let sess_id = raw.opt_nonempty_string(Key::SessId, MAX_SESS_ID_LEN)?;
    let common = Common {
        domain,
        page,
        timezone,
        platform,
        sess_id,
    };

    match raw.take(Key::Event) {
        Some(Value::String(name)) => {
            if name.len() > MAX_EVENT_LEN {
                return Err(BeaconError::TooLong {
                    field: "event",
                    max: MAX_EVENT_LEN,
                });
            }
            let note = raw.opt_string(Key::Note, MAX_NOTE_LEN)?.unwrap_or_default();
            let value = raw.opt_number(Key::Value, -MAX_VALUE_MAGNITUDE, MAX_VALUE_MAGNITUDE)?;
            Ok(Beacon::Event(Event {
                common,
                name: ascii_lowercase(name),
                note,
                value,
            }))
        }
        Some(_) => Err(wrong_type(Key::Event, "a string")),
        None => {
            let referrer = raw.opt_string(Key::Referrer, MAX_REFERRER_LEN)?;
            let load_time = raw.opt_number(Key::LoadTime, 0.0, MAX_LOAD_TIME_MS)?;
            let pages_viewed = raw.opt_integer(Key::PagesViewed, 1, MAX_PAGES_VIEWED)?;
            Ok(Beacon::PageView(PageView {
                common,
                referrer_host: referrer.as_deref().and_then(referrer_host),
                load_time,
                pages_viewed: pages_viewed.and_then(|n| u32::try_from(n).ok()),
            }))
        }
    }
}

/// `[a-z0-9.-]{1,253}`: the host names accepted for `domain` and referrer hosts.
fn is_host_name(host: &str) -> bool {
    (1..=MAX_DOMAIN_LEN).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// `s` ASCII-lowercased, copied only when it has an uppercase letter.
fn ascii_lowercase(s: Cow<'_, str>) -> Cow<'_, str> {
    if !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return s;
    }
    let mut s = s.into_owned();
    s.make_ascii_lowercase();
    Cow::Owned(s)
}

/// Trims ASCII whitespace, lowercases, drops one trailing dot and checks the charset.
pub fn normalize_domain(domain: Cow<'_, str>) -> Option<Cow<'_, str>> {
    // The byte range that is kept: whitespace around and one trailing dot left out.
    let kept = |s: &str| {
        let start = s.len() - s.trim_ascii_start().len();
        let inner = s.trim_ascii();
        start..start + inner.strip_suffix('.').unwrap_or(inner).len()
    };
    let domain = match domain {
        Cow::Borrowed(s) => Cow::Borrowed(&s[kept(s)]),
        Cow::Owned(s) => Cow::Owned(s[kept(&s)].to_owned()),
    };
    let domain = ascii_lowercase(domain);
    is_host_name(&domain).then_some(domain)
}

/// Extracts the lowercased host of an absolute URL (`scheme://[userinfo@]host[:port]...`).
///
/// Returns `None` when there is no scheme, or the host is not a plain host name
/// (`[a-z0-9.-]{1,253}`, one trailing dot dropped) or a bracketed IPv6 address.
pub fn referrer_host(url: &str) -> Option<String> {
    let url = url.trim_ascii();
    let (scheme, rest) = url.split_once("://")?;
    let mut scheme_chars = scheme.chars();
    if !scheme_chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        || !scheme_chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);

    if let Some(bracketed) = host_port.strip_prefix('[') {
        let (inside, after) = bracketed.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
        let inside_ok = (2..=45).contains(&inside.len())
            && inside.contains(':')
            && inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return (port_ok && inside_ok).then(|| format!("[{}]", inside.to_ascii_lowercase()));
    }

    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host_port,
    };
    normalize_host(host)
}

/// Lowercases, drops one trailing dot and checks the charset (no whitespace trimming).
fn normalize_host(host: &str) -> Option<String> {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    is_host_name(host).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid page view with `extra` (starting with a comma) appended to the object.
    fn page_view(extra: &str) -> String {
        format!(r#"{{"domain":"example.com","page":"/"{extra}}}"#)
    }

    /// A minimal valid event with `extra` (starting with a comma) appended to the object.
    fn event(extra: &str) -> String {
        format!(r#"{{"domain":"example.com","page":"/","event":"click"{extra}}}"#)
    }

    fn parse(body: &str) -> Result<Beacon<'static>, String> {
        parse_beacon(body.as_bytes())
            .map(Beacon::into_owned)
            .map_err(|e| e.to_string())
    }

    fn parse_view(body: &str) -> PageView<'static> {
        match parse_beacon(body.as_bytes()).map(Beacon::into_owned) {
            Ok(Beacon::PageView(view)) => view,
            other => panic!("expected a page view for {body}, got {other:?}"),
        }
    }

    fn parse_event(body: &str) -> Event<'static> {
        match parse_beacon(body.as_bytes()).map(Beacon::into_owned) {
            Ok(Beacon::Event(event)) => event,
            other => panic!("expected an event for {body}, got {other:?}"),
        }
    }

    fn json_string(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    #[test]
    fn a_plain_beacon_borrows_its_strings_from_the_body() {
        let body = br#"{"domain":"www.example.com","page":"/a?q=1","platform":"Linux x86_64",
            "sess_id":"07ab","event":"socialclick","note":"mastodon"}"#;
        let Ok(Beacon::Event(event)) = parse_beacon(body) else {
            panic!("not an event");
        };
        let common = &event.common;
        for (field, value) in [
            ("domain", Some(&common.domain)),
            ("page", Some(&common.page)),
            ("platform", common.platform.as_ref()),
            ("sess_id", common.sess_id.as_ref()),
            ("event", Some(&event.name)),
            ("note", Some(&event.note)),
        ] {
            assert!(
                matches!(value, Some(Cow::Borrowed(_))),
                "{field}: {value:?}"
            );
        }
        assert_eq!(&*common.page, "/a");

        // Escapes, uppercase and a trailing dot need a copy, with the same result.
        let body =
            br#"{"domain":" WWW.Example.com. ","page":"/\u0061?q","event":"Social\u0043lick",
            "note":"a\"b"}"#;
        let Ok(Beacon::Event(event)) = parse_beacon(body) else {
            panic!("not an event");
        };
        assert_eq!(
            (
                &*event.common.domain,
                &*event.common.page,
                &*event.name,
                &*event.note
            ),
            ("www.example.com", "/a", "socialclick", "a\"b")
        );
    }

    #[test]
    fn sample_event_is_parsed() {
        let body = r#"{"domain":"www.example.com","page":"/posts/blog/general/share-buttons.html",
            "timezone":-60,"platform":"Linux x86_64","sess_id":"07ab-8022",
            "event":"socialClick","note":"mastodon"}"#;
        let expected = Beacon::Event(Event {
            common: Common {
                domain: "www.example.com".into(),
                page: "/posts/blog/general/share-buttons.html".into(),
                timezone: Some(-60),
                platform: Some("Linux x86_64".into()),
                sess_id: Some("07ab-8022".into()),
            },
            name: "socialclick".into(),
            note: "mastodon".into(),
            value: None,
        });
        assert_eq!(parse_beacon(body.as_bytes()), Ok(expected.clone()));
        assert_eq!(expected.event_name(), Some("socialclick"));
        assert_eq!(expected.common().domain, "www.example.com");
    }

    #[test]
    fn sample_page_view_is_parsed() {
        let body = r#"{"domain":"www.example.com",
            "page":"/posts/hello.html?utm_source=feed#comments",
            "referrer":"https://news.example.org/item?id=123","timezone":330,"platform":"Win32",
            "sess_id":"5e5e-0001","load_time":812.5,"pages_viewed":3}"#;
        let expected = Beacon::PageView(PageView {
            common: Common {
                domain: "www.example.com".into(),
                page: "/posts/hello.html".into(),
                timezone: Some(330),
                platform: Some("Win32".into()),
                sess_id: Some("5e5e-0001".into()),
            },
            referrer_host: Some("news.example.org".into()),
            load_time: Some(812.5),
            pages_viewed: Some(3),
        });
        assert_eq!(parse_beacon(body.as_bytes()), Ok(expected.clone()));
        assert_eq!(expected.event_name(), None);
    }

    #[test]
    fn body_must_be_a_json_object() {
        for (body, expected) in [
            ("", "empty body"),
            (" \r\n\t", "empty body"),
            (r#"["example.com","/"]"#, "beacon must be a JSON object"),
            (r#"  ["example.com","/"]"#, "beacon must be a JSON object"),
            (r#""{}""#, "beacon must be a JSON object"),
            ("42", "beacon must be a JSON object"),
            ("null", "beacon must be a JSON object"),
            ("true", "beacon must be a JSON object"),
            (
                r#"{"domain":"example.com","page":"/""#,
                "invalid JSON: EOF while parsing",
            ),
            (
                r#"{"domain":"example.com","page":"/"} x"#,
                "invalid JSON: trailing characters",
            ),
            (
                r#"{"domain":"example.com","page":"/"}{}"#,
                "invalid JSON: trailing characters",
            ),
            (
                r#"{"domain":"example.com",}"#,
                "invalid JSON: trailing comma",
            ),
            (
                r#"{'domain':'example.com'}"#,
                "invalid JSON: key must be a string",
            ),
            (r#"["unclosed"#, "invalid JSON: EOF while parsing"),
            ("nul", "invalid JSON: "),
            (
                r#"{"page":"\ud800"}"#,
                "invalid JSON: unexpected end of hex escape",
            ),
            ("\u{feff}{}", "invalid JSON: "),
        ] {
            let err = parse(body).unwrap_err();
            assert!(err.starts_with(expected), "{body:?}: {err}");
        }
    }

    #[test]
    fn json_errors_do_not_echo_body_data() {
        let secret = "secret-token-value";
        for body in [
            format!(r#"{{"domain":"{secret}"#),
            format!(r#"{{"domain":"example.com","page":"/"}} {secret}"#),
            format!(r#"{{"{secret}":{secret}}}"#),
            format!(r#"[{secret}]"#),
        ] {
            let err = parse(&body).unwrap_err();
            assert!(err.starts_with("invalid JSON: "), "{body}: {err}");
            assert!(!err.contains("secret"), "{body}: {err}");
        }
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        for body in [
            &b"{\"domain\":\"ex\xffample.com\",\"page\":\"/\"}"[..],
            &b"{\"domain\":\"example.com\",\"page\":\"/\",\"x\":\"\xc3\"}"[..],
            &b"\xff"[..],
        ] {
            assert_eq!(parse_beacon(body), Err(BeaconError::NotUtf8), "{body:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let recursion = "invalid JSON: recursion limit exceeded";
        for depth in [200, 100_000] {
            for (body, expected) in [
                ("[".repeat(depth), Err("invalid JSON: EOF while parsing")),
                (nested(depth), Err("beacon must be a JSON object")),
                (format!(r#"{{"page":{}}}"#, nested(depth)), Err(recursion)),
                (
                    format!(r#"{{"note":{}}}"#, "{\"a\":".repeat(depth)),
                    Err(recursion),
                ),
                // Unknown keys are skipped without recursion, so depth does not matter there.
                (page_view(&format!(r#","x":{}"#, nested(depth))), Ok(())),
                (
                    page_view(&format!(r#","x":{}"#, "[".repeat(depth))),
                    Err("invalid JSON: "),
                ),
            ] {
                let got = parse(&body).map(|_| ());
                match (got, expected) {
                    (Ok(()), Ok(())) => {}
                    (Err(err), Err(expected)) if err.starts_with(expected) => {}
                    (got, _) => panic!("depth {depth}: {got:?}, expected {expected:?}"),
                }
            }
        }
    }

    #[test]
    fn duplicate_known_keys_are_rejected() {
        for (body, expected) in [
            (
                r#"{"domain":"a.com","page":"/","page":"/b"}"#,
                "duplicate key `page`",
            ),
            (
                r#"{"domain":"a.com","domain":"a.com","page":"/"}"#,
                "duplicate key `domain`",
            ),
            (
                r#"{"domain":"a.com","page":"/","event":null,"event":"x"}"#,
                "duplicate key `event`",
            ),
            (
                r#"{"domain":"a.com","page":"/","note":1,"note":{}}"#,
                "duplicate key `note`",
            ),
            (
                r#"{"domain":"a.com","page":"/","value":1,"value":1,"page":"/"}"#,
                "duplicate key `value`",
            ),
            // Syntax errors after the duplicate still win: the whole body is checked.
            (
                r#"{"domain":"a.com","page":"/","page":"/" x}"#,
                "invalid JSON: expected `,` or `}`",
            ),
        ] {
            let err = parse(body).unwrap_err();
            assert!(err.starts_with(expected), "{body}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_ignored() {
        for body in [
            page_view(r#","extra":1"#),
            page_view(r#","extra":{"deep":[1,2,{"x":null}]},"extra":"twice is fine""#),
            page_view(r#","Domain":5,"PAGE":[]"#),
            page_view(r#","":"""#),
        ] {
            let view = parse_view(&body);
            assert_eq!(view.common.domain, "example.com", "{body}");
            assert_eq!(view.common.page, "/", "{body}");
        }
    }

    #[test]
    fn missing_required_keys() {
        for (body, expected) in [
            (r#"{}"#, "missing `domain`"),
            (r#"{"page":"/"}"#, "missing `domain`"),
            (r#"{"domain":null,"page":"/"}"#, "missing `domain`"),
            (r#"{"domain":"example.com"}"#, "missing `page`"),
            (r#"{"domain":"example.com","page":null}"#, "missing `page`"),
        ] {
            assert_eq!(parse(body).unwrap_err(), expected, "{body}");
        }
    }

    #[test]
    fn wrong_types() {
        for (body, expected) in [
            (
                r#"{"domain":1,"page":"/"}"#.to_owned(),
                "`domain` must be a string",
            ),
            (
                r#"{"domain":["example.com"],"page":"/"}"#.to_owned(),
                "`domain` must be a string",
            ),
            (
                r#"{"domain":"example.com","page":{}}"#.to_owned(),
                "`page` must be a string",
            ),
            (
                r#"{"domain":"example.com","page":true}"#.to_owned(),
                "`page` must be a string",
            ),
            (
                page_view(r#","timezone":"-60""#),
                "`timezone` must be an integer",
            ),
            (
                page_view(r#","timezone":-60.5"#),
                "`timezone` must be an integer",
            ),
            (
                page_view(r#","timezone":-60.0"#),
                "`timezone` must be an integer",
            ),
            (
                page_view(r#","timezone":6e1"#),
                "`timezone` must be an integer",
            ),
            (
                page_view(r#","utcoffset":true"#),
                "`utcoffset` must be an integer",
            ),
            (
                page_view(r#","utcoffset":"1.5""#),
                "`utcoffset` must be an integer",
            ),
            (
                page_view(r#","utcoffset":"abc""#),
                "`utcoffset` must be an integer",
            ),
            (
                page_view(r#","utcoffset":60.0"#),
                "`utcoffset` must be an integer",
            ),
            (page_view(r#","platform":1"#), "`platform` must be a string"),
            (
                page_view(r#","sess_id":12345"#),
                "`sess_id` must be a string",
            ),
            (
                page_view(r#","referrer":{}"#),
                "`referrer` must be a string",
            ),
            (
                page_view(r#","load_time":"812""#),
                "`load_time` must be a number",
            ),
            (
                page_view(r#","pages_viewed":3.0"#),
                "`pages_viewed` must be an integer",
            ),
            (
                page_view(r#","pages_viewed":"3""#),
                "`pages_viewed` must be an integer",
            ),
            (page_view(r#","event":1"#), "`event` must be a string"),
            (
                page_view(r#","event":["click"]"#),
                "`event` must be a string",
            ),
            (event(r#","note":1"#), "`note` must be a string"),
            (event(r#","value":"1""#), "`value` must be a number"),
            (event(r#","value":false"#), "`value` must be a number"),
        ] {
            assert_eq!(parse(&body).unwrap_err(), expected, "{body}");
        }
    }

    #[test]
    fn numeric_ranges() {
        let tz_range = "must be between -840 and 840";
        for (extra, expected) in [
            (r#","timezone":-840"#, Ok(Some(-840))),
            (r#","timezone":840"#, Ok(Some(840))),
            (r#","timezone":0"#, Ok(Some(0))),
            (r#","timezone":-841"#, Err(format!("`timezone` {tz_range}"))),
            (r#","timezone":841"#, Err(format!("`timezone` {tz_range}"))),
            (
                r#","timezone":18446744073709551615"#,
                Err(format!("`timezone` {tz_range}")),
            ),
            (r#","utcoffset":-840"#, Ok(Some(-840))),
            (r#","utcoffset":"840""#, Ok(Some(840))),
            (
                r#","utcoffset":"841""#,
                Err(format!("`utcoffset` {tz_range}")),
            ),
            (
                r#","utcoffset":-841"#,
                Err(format!("`utcoffset` {tz_range}")),
            ),
            (
                r#","utcoffset":"99999999999999999999""#,
                Err("`utcoffset` must be an integer".into()),
            ),
        ] {
            let body = page_view(extra);
            let got = parse(&body).map(|b| b.common().timezone);
            assert_eq!(got, expected, "{body}");
        }

        let load_range = "`load_time` must be between 0 and 600000";
        for (extra, expected) in [
            (r#","load_time":0"#, Ok(Some(0.0))),
            (r#","load_time":0.0"#, Ok(Some(0.0))),
            (r#","load_time":600000"#, Ok(Some(600_000.0))),
            (r#","load_time":812.5"#, Ok(Some(812.5))),
            (r#","load_time":600000.1"#, Err(load_range)),
            (r#","load_time":-0.001"#, Err(load_range)),
            (r#","load_time":-1"#, Err(load_range)),
            (r#","load_time":1e300"#, Err(load_range)),
        ] {
            let body = page_view(extra);
            let got = parse(&body).map(|b| match b {
                Beacon::PageView(view) => view.load_time,
                Beacon::Event(_) => panic!("not a page view"),
            });
            assert_eq!(got, expected.map_err(str::to_owned), "{body}");
        }

        let pages_range = "`pages_viewed` must be between 1 and 1000000";
        for (extra, expected) in [
            (r#","pages_viewed":1"#, Ok(Some(1))),
            (r#","pages_viewed":1000000"#, Ok(Some(1_000_000))),
            (r#","pages_viewed":0"#, Err(pages_range)),
            (r#","pages_viewed":-1"#, Err(pages_range)),
            (r#","pages_viewed":1000001"#, Err(pages_range)),
            (r#","pages_viewed":18446744073709551615"#, Err(pages_range)),
        ] {
            let body = page_view(extra);
            let got = parse(&body).map(|b| match b {
                Beacon::PageView(view) => view.pages_viewed,
                Beacon::Event(_) => panic!("not a page view"),
            });
            assert_eq!(got, expected.map_err(str::to_owned), "{body}");
        }

        let value_range = "`value` must be between -1000000000000000 and 1000000000000000";
        for (extra, expected) in [
            (r#","value":1"#, Ok(Some(1.0))),
            (r#","value":-2.5"#, Ok(Some(-2.5))),
            (r#","value":1e15"#, Ok(Some(1e15))),
            (r#","value":-1000000000000000"#, Ok(Some(-1e15))),
            (r#","value":1000000000000001"#, Err(value_range)),
            (r#","value":-1.0000001e15"#, Err(value_range)),
            (r#","value":18446744073709551615"#, Err(value_range)),
        ] {
            let body = event(extra);
            let got = parse(&body).map(|b| match b {
                Beacon::Event(event) => event.value,
                Beacon::PageView(_) => panic!("not an event"),
            });
            assert_eq!(got, expected.map_err(str::to_owned), "{body}");
        }
    }

    #[test]
    fn json_numbers_too_large_for_f64_are_invalid_json() {
        let err = parse(&event(r#","value":1e400"#)).unwrap_err();
        assert!(
            err.starts_with("invalid JSON: number out of range"),
            "{err}"
        );
    }

    #[test]
    fn utcoffset_alias() {
        for (extra, expected) in [
            (r#","utcoffset":"0""#, Some(0)),
            (r#","utcoffset":"-60""#, Some(-60)),
            (r#","utcoffset":" 330 ""#, Some(330)),
            (r#","utcoffset":"+60""#, Some(60)),
            (r#","utcoffset":-60"#, Some(-60)),
            (r#","utcoffset":"""#, None),
            (r#","utcoffset":"  ""#, None),
            (r#","utcoffset":null"#, None),
            // `timezone` wins over `utcoffset` ...
            (r#","timezone":-60,"utcoffset":"120""#, Some(-60)),
            (r#","utcoffset":"120","timezone":-60"#, Some(-60)),
            // ... but a null `timezone` is absent.
            (r#","timezone":null,"utcoffset":"120""#, Some(120)),
        ] {
            let body = page_view(extra);
            assert_eq!(parse_view(&body).common.timezone, expected, "{body}");
        }
        // `utcoffset` is still checked when `timezone` wins.
        for (extra, expected) in [
            (
                r#","timezone":-60,"utcoffset":"abc""#,
                "`utcoffset` must be an integer",
            ),
            (
                r#","timezone":-60,"utcoffset":[]"#,
                "`utcoffset` must be an integer",
            ),
            (
                r#","timezone":-60,"utcoffset":900"#,
                "`utcoffset` must be between -840 and 840",
            ),
        ] {
            let body = page_view(extra);
            assert_eq!(parse(&body).unwrap_err(), expected, "{body}");
        }
    }

    #[test]
    fn null_means_absent_for_optional_keys() {
        let view = parse_view(&page_view(
            r#","timezone":null,"platform":null,"sess_id":null,"referrer":null,"load_time":null,
               "pages_viewed":null,"event":null"#,
        ));
        assert_eq!(
            view,
            PageView {
                common: Common {
                    domain: "example.com".into(),
                    page: "/".into(),
                    timezone: None,
                    platform: None,
                    sess_id: None,
                },
                referrer_host: None,
                load_time: None,
                pages_viewed: None,
            }
        );
        let event = parse_event(&event(r#","note":null,"value":null"#));
        assert_eq!((&*event.note, event.value), ("", None));
    }

    #[test]
    fn empty_optional_strings_are_absent() {
        let view = parse_view(&page_view(r#","platform":"","sess_id":"","referrer":"""#));
        assert_eq!(view.common.platform, None);
        assert_eq!(view.common.sess_id, None);
        assert_eq!(view.referrer_host, None);
        assert_eq!(parse_event(&event(r#","note":"""#)).note, "");
    }

    #[test]
    fn domain_is_normalized() {
        for (domain, expected) in [
            ("www.example.com", Ok("www.example.com")),
            ("WWW.Example.COM", Ok("www.example.com")),
            ("  example.com\t", Ok("example.com")),
            ("example.com.", Ok("example.com")),
            ("xn--bcher-kva.example", Ok("xn--bcher-kva.example")),
            ("localhost", Ok("localhost")),
            ("127.0.0.1", Ok("127.0.0.1")),
            ("", Err("invalid `domain`")),
            ("  ", Err("invalid `domain`")),
            (".", Err("invalid `domain`")),
            ("example.com:8080", Err("invalid `domain`")),
            ("exa mple.com", Err("invalid `domain`")),
            ("exa_mple.com", Err("invalid `domain`")),
            ("bücher.example", Err("invalid `domain`")),
            ("example.com/", Err("invalid `domain`")),
            ("example.com\n", Ok("example.com")),
            ("example\n.com", Err("invalid `domain`")),
        ] {
            let body = format!(r#"{{"domain":{},"page":"/"}}"#, json_string(domain));
            let got = parse(&body).map(|b| b.common().domain.clone());
            assert_eq!(
                got,
                expected.map(Cow::Borrowed).map_err(str::to_owned),
                "{domain:?}"
            );
        }
    }

    #[test]
    fn page_drops_query_and_fragment() {
        for (page, expected) in [
            ("/", Ok("/")),
            (
                "/posts/hello.html?utm_source=feed#comments",
                Ok("/posts/hello.html"),
            ),
            ("/a?b#c", Ok("/a")),
            ("/a#b?c", Ok("/a")),
            ("/a?", Ok("/a")),
            ("/?q", Ok("/")),
            ("/x y,z=1\\", Ok("/x y,z=1\\")),
            ("/ünïcödé", Ok("/ünïcödé")),
            ("", Err("`page` must start with \"/\"")),
            ("?q=1", Err("`page` must start with \"/\"")),
            ("#top", Err("`page` must start with \"/\"")),
            ("posts/hello.html", Err("`page` must start with \"/\"")),
            ("https://example.com/", Err("`page` must start with \"/\"")),
        ] {
            let body = format!(r#"{{"domain":"example.com","page":{}}}"#, json_string(page));
            let got = parse(&body).map(|b| b.common().page.clone());
            assert_eq!(
                got,
                expected.map(Cow::Borrowed).map_err(str::to_owned),
                "{page:?}"
            );
        }
    }

    #[test]
    fn string_length_limits() {
        let long = |n: usize| format!("/{}", "a".repeat(n - 1));
        let page_ok = long(1024);
        let page_long = long(1025);
        let page_long_query = format!("{page_ok}?{}", "q".repeat(5000));
        let domain_ok = format!("{}.com", "a".repeat(249));
        let domain_long = format!("{}.com", "a".repeat(250));
        let referrer_ok = format!("https://example.org/{}", "r".repeat(2048 - 20));
        let referrer_long = format!("https://example.org/{}", "r".repeat(2048 - 19));
        let s64 = "é".repeat(32); // 64 bytes, 32 chars: limits are in bytes
        let s65 = format!("{s64}x");
        let e64 = "e".repeat(64);
        let e65 = "e".repeat(65);
        let n1024 = "n".repeat(1024);
        let n1025 = "n".repeat(1025);
        let kv = |k: &str, v: &str| format!(",{}:{}", json_string(k), json_string(v));
        let with_page = |p: &str| format!(r#"{{"domain":"a.com","page":{}}}"#, json_string(p));
        let with_domain = |d: &str| format!(r#"{{"domain":{},"page":"/"}}"#, json_string(d));
        for (body, expected) in [
            (with_page(&page_ok), Ok(())),
            (with_page(&page_long_query), Ok(())),
            (
                with_page(&page_long),
                Err("`page` is longer than 1024 bytes"),
            ),
            (with_domain(&domain_ok), Ok(())),
            (with_domain(&domain_long), Err("invalid `domain`")),
            (page_view(&kv("referrer", &referrer_ok)), Ok(())),
            (
                page_view(&kv("referrer", &referrer_long)),
                Err("`referrer` is longer than 2048 bytes"),
            ),
            (page_view(&kv("platform", &s64)), Ok(())),
            (
                page_view(&kv("platform", &s65)),
                Err("`platform` is longer than 64 bytes"),
            ),
            (page_view(&kv("sess_id", &s64)), Ok(())),
            (
                page_view(&kv("sess_id", &s65)),
                Err("`sess_id` is longer than 64 bytes"),
            ),
            (page_view(&kv("event", &e64)), Ok(())),
            (
                page_view(&kv("event", &e65)),
                Err("`event` is longer than 64 bytes"),
            ),
            (event(&kv("note", &n1024)), Ok(())),
            (
                event(&kv("note", &n1025)),
                Err("`note` is longer than 1024 bytes"),
            ),
        ] {
            let got = parse(&body).map(|_| ());
            let start: String = body.chars().take(60).collect();
            assert_eq!(got, expected.map_err(str::to_owned), "{start}");
        }
    }

    #[test]
    fn event_names_are_ascii_lowercased_but_not_charset_checked() {
        for (name, expected) in [
            ("socialClick", "socialclick"),
            ("SIGNUP", "signup"),
            ("already_lower", "already_lower"),
            ("Ünïcode Ä", "Ünïcode Ä"),
            ("with space,comma=eq", "with space,comma=eq"),
            ("", ""),
        ] {
            let body = format!(
                r#"{{"domain":"a.com","page":"/","event":{}}}"#,
                json_string(name)
            );
            assert_eq!(parse_event(&body).name, expected, "{name:?}");
        }
    }

    #[test]
    fn keys_of_the_other_kind_are_ignored() {
        let view = parse_view(&page_view(r#","note":5,"value":"x""#));
        assert_eq!(view.common.domain, "example.com");
        let event = parse_event(&event(r#","referrer":5,"load_time":"x","pages_viewed":-1"#));
        assert_eq!(event.name, "click");
    }

    #[test]
    fn referrer_is_reduced_to_its_host() {
        for (url, expected) in [
            (
                "https://news.example.org/item?id=123",
                Some("news.example.org"),
            ),
            ("http://Example.ORG", Some("example.org")),
            ("https://example.org.", Some("example.org")),
            ("https://example.org:8443/path", Some("example.org")),
            ("https://example.org:/path", Some("example.org")),
            ("https://user:pa%40ss@example.org/", Some("example.org")),
            ("https://a@b@example.org:81/x", Some("example.org")),
            ("https://example.org?q=a/b", Some("example.org")),
            ("https://example.org#frag@evil.com", Some("example.org")),
            ("https://[2001:DB8::1]:8080/x", Some("[2001:db8::1]")),
            ("https://[::1]/", Some("[::1]")),
            ("https://[::ffff:192.0.2.1]", Some("[::ffff:192.0.2.1]")),
            ("android-app://com.example.app/", Some("com.example.app")),
            ("svn+ssh://host.example", Some("host.example")),
            (" https://example.org ", Some("example.org")),
            ("", None),
            ("example.org", None),
            ("//example.org/path", None),
            ("/relative/path", None),
            ("javascript:alert(1)", None),
            ("javascript://%0aalert(1)", None),
            ("data:text/html,<script>", None),
            ("1http://example.org", None),
            ("ht tp://example.org", None),
            ("https://", None),
            ("https:///path", None),
            ("https://exa mple.org/", None),
            ("https://exa,mple.org/", None),
            ("https://bücher.example/", None),
            ("https://example.org:80a/", None),
            ("https://[::1/", None),
            ("https://[::1]x/", None),
            ("https://[fe80::1%25eth0]/", None),
            ("https://[]/", None),
            ("https://[example.org]/", None),
            ("https://.", None),
        ] {
            assert_eq!(referrer_host(url).as_deref(), expected, "{url:?}");
        }
        let long_host = format!("https://{}.org/", "a".repeat(250));
        assert_eq!(referrer_host(&long_host), None);
    }

    #[test]
    fn unusable_referrer_is_silently_omitted() {
        let view = parse_view(&page_view(r#","referrer":"javascript:alert(1)""#));
        assert_eq!(view.referrer_host, None);
    }

    #[test]
    fn random_bodies_never_panic() {
        const PIECES: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "null",
            "true",
            "-",
            "0",
            "1e3",
            "-60",
            ".5",
            "\"domain\"",
            "\"page\"",
            "\"event\"",
            "\"utcoffset\"",
            "\"timezone\"",
            "\"value\"",
            "\"referrer\"",
            "\"load_time\"",
            "\"pages_viewed\"",
            "\"note\"",
            "\"/\"",
            "\"a.com\"",
            "\"https://[::1]:80/\"",
            "\\",
            "\\u0000",
            "\\ud83d",
            "é",
            "\u{0}",
            "\n",
            " ",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = next() % 24;
            let mut body: String = (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            if next() % 2 == 0 {
                body = format!(r#"{{"domain":"a.com","page":"/",{body}"#);
            }
            let mut bytes = body.into_bytes();
            if next() % 16 == 0 {
                let at = (next() as usize) % (bytes.len() + 1);
                bytes.insert(at, 0xff);
            }
            if let Err(err) = parse_beacon(&bytes) {
                let msg = err.to_string();
                assert!(
                    msg.len() < 200 && !msg.contains(['\n', '\r', '\0']),
                    "{msg:?}"
                );
            }
        }
    }

    #[test]
    fn errors_are_lowercase_and_short() {
        for err in [
            BeaconError::EmptyBody,
            BeaconError::NotUtf8,
            BeaconError::NotAnObject,
            BeaconError::DuplicateKey("page"),
            BeaconError::Missing("domain"),
            BeaconError::PageNotAbsolute,
            BeaconError::Invalid("domain"),
        ] {
            let msg = err.to_string();
            assert!(
                msg.starts_with(|c: char| c.is_ascii_lowercase() || c == '`'),
                "{msg}"
            );
            assert!(msg.len() < 80, "{msg}");
        }
    }
}
