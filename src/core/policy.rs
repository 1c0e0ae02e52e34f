//! Configuration values (event names, domain patterns, measurement names) and the 422-class
//! checks that a valid beacon must also pass.

use std::borrow::Cow;
use std::fmt;

use super::beacon::Beacon;
use super::line_protocol::is_control;

/// Longest event name accepted in configuration, in bytes.
pub const MAX_EVENT_NAME_LEN: usize = 64;
/// Longest measurement name accepted in configuration, in bytes.
pub const MAX_MEASUREMENT_LEN: usize = 64;
/// Longest snippet of a client value quoted in a message, in characters.
pub const MAX_SNIPPET_CHARS: usize = 64;
/// Longest host name, in bytes.
const MAX_HOST_LEN: usize = 253;

/// A short, log-safe copy of a client-supplied value: control characters removed, at most
/// 64 characters.
pub fn sanitize_snippet(value: &str) -> String {
    snippet(value).into_owned()
}

/// [`sanitize_snippet`] without a copy when `value` already is one (the usual case).
pub fn snippet(value: &str) -> Cow<'_, str> {
    for (chars, (i, c)) in value.char_indices().enumerate() {
        if is_control(c) || chars == MAX_SNIPPET_CHARS {
            let kept = value[i..].chars().filter(|&c| !is_control(c));
            let rest = kept.take(MAX_SNIPPET_CHARS - chars);
            return Cow::Owned(value[..i].chars().chain(rest).collect());
        }
    }
    Cow::Borrowed(value)
}

/// Like [`sanitize_snippet`] but control characters are replaced by `?` (configuration errors).
fn config_snippet(value: &str) -> String {
    value
        .chars()
        .map(|c| if is_control(c) { '?' } else { c })
        .take(MAX_SNIPPET_CHARS)
        .collect()
}

fn is_event_name(name: &str) -> bool {
    (1..=MAX_EVENT_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b':' | b'-')
        })
}

/// Parses one directive argument holding event names separated by commas and/or ASCII
/// whitespace; names are lowercased and must match `[a-z0-9_.:-]{1,64}`.
pub fn parse_event_names(arg: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    push_event_names(&mut names, arg)?;
    Ok(names)
}

/// Parses `arg` like [`parse_event_names`] and appends the names not yet in `list`.
pub fn push_event_names(list: &mut Vec<String>, arg: &str) -> Result<(), String> {
    let pieces = arg.split(|c: char| c == ',' || c.is_ascii_whitespace());
    for piece in pieces.filter(|p| !p.is_empty()) {
        let name = piece.to_ascii_lowercase();
        if !is_event_name(&name) {
            return Err(format!("invalid event name \"{}\"", config_snippet(piece)));
        }
        if !list.contains(&name) {
            list.push(name);
        }
    }
    Ok(())
}

/// An entry of the accepted-domains list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// `example.com`: exactly this host.
    Exact(String),
    /// `*.example.com`: any subdomain of the suffix, but not the suffix itself.
    Subdomains(String),
    /// `.example.com`: the suffix itself and any subdomain (like nginx `server_name`).
    DomainAndSubdomains(String),
}

impl DomainPattern {
    /// Parses `example.com`, `*.example.com` or `.example.com` (case-insensitive; one trailing
    /// dot is ignored). Labels must be non-empty and made of `[a-z0-9-]`.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let lower = arg.to_ascii_lowercase();
        let (make, name): (fn(String) -> Self, &str) = if let Some(rest) = lower.strip_prefix("*.")
        {
            (DomainPattern::Subdomains, rest)
        } else if let Some(rest) = lower.strip_prefix('.') {
            (DomainPattern::DomainAndSubdomains, rest)
        } else {
            (DomainPattern::Exact, lower.as_str())
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let valid = (1..=MAX_HOST_LEN).contains(&name.len())
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if !valid {
            let hint = if name.contains('*') {
                ": \"*\" is only allowed as a \"*.\" prefix"
            } else {
                ""
            };
            return Err(format!(
                "invalid domain pattern \"{}\"{hint}",
                config_snippet(arg)
            ));
        }
        Ok(make(name.to_owned()))
    }

    /// Whether `host` (a host name without port) matches; case-insensitive, one trailing dot
    /// of `host` is ignored.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            DomainPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            DomainPattern::Subdomains(suffix) => is_subdomain(host, suffix),
            DomainPattern::DomainAndSubdomains(suffix) => {
                host.eq_ignore_ascii_case(suffix) || is_subdomain(host, suffix)
            }
        }
    }
}

/// Whether `host` is `<something>.<suffix>` (case-insensitive).
fn is_subdomain(host: &str, suffix: &str) -> bool {
    let (host, suffix) = (host.as_bytes(), suffix.as_bytes());
    let Some(dot) = host.len().checked_sub(suffix.len() + 1) else {
        return false;
    };
    dot > 0
        && host.get(dot) == Some(&b'.')
        && host
            .get(dot + 1..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
}

/// Strips a `:port` from a `Host` value: `"Example.COM:8080"` → `"Example.COM"`,
/// `"[::1]:80"` → `"[::1]"`. Anything else is returned unchanged.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => host.get(..=end).unwrap_or(host),
            None => host,
        };
    }
    match host.split_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Why a valid beacon is refused (answered with 422).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The event name is not in the permitted list (holds a sanitized snippet of it).
    EventNotPermitted(String),
    /// The beacon's domain is not accepted (holds a sanitized snippet of it).
    DomainNotAccepted(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::EventNotPermitted(name) => write!(f, "event \"{name}\" is not permitted"),
            Refusal::DomainNotAccepted(domain) => write!(f, "domain \"{domain}\" is not accepted"),
        }
    }
}

impl std::error::Error for Refusal {}

/// Checks the beacon's domain, then its event name.
///
/// With `accepted_domains == None` only the request's own host (`request_host`, port and one
/// trailing dot ignored, case-insensitive) is accepted; `Some(&[])` accepts no domain. An event
/// must be in `permitted_events` (exact match; an empty list permits none).
pub fn check_policy(
    beacon: &Beacon,
    permitted_events: &[String],
    accepted_domains: Option<&[DomainPattern]>,
    request_host: &str,
) -> Result<(), Refusal> {
    let domain: &str = &beacon.common().domain;
    let domain_ok = match accepted_domains {
        Some(patterns) => patterns.iter().any(|p| p.matches(domain)),
        None => {
            let own = host_without_port(request_host);
            let own = own.strip_suffix('.').unwrap_or(own);
            let domain = domain.strip_suffix('.').unwrap_or(domain);
            !own.is_empty() && own.eq_ignore_ascii_case(domain)
        }
    };
    if !domain_ok {
        return Err(Refusal::DomainNotAccepted(sanitize_snippet(domain)));
    }
    match beacon.event_name() {
        Some(name) if !permitted_events.iter().any(|p| p == name) => {
            Err(Refusal::EventNotPermitted(sanitize_snippet(name)))
        }
        _ => Ok(()),
    }
}

/// Checks a configured measurement name: 1..=64 bytes of `[A-Za-z0-9_.-]`, not starting with
/// `_` (reserved by InfluxDB) or `-`.
pub fn validate_measurement_name(name: &str) -> Result<(), String> {
    let charset_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_MEASUREMENT_LEN {
        Some("is longer than 64 bytes")
    } else if !charset_ok {
        Some("may only contain [A-Za-z0-9_.-]")
    } else if name.starts_with(['_', '-']) {
        Some("must not start with \"_\" or \"-\"")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(format!(
            "invalid measurement name \"{}\": {reason}",
            config_snippet(name)
        )),
        None => Ok(()),
    }
}

/// The measurement names points are written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurements {
    /// Measurement for page views.
    pub page_view: String,
    /// Measurement for events.
    pub event: String,
}

impl Default for Measurements {
    fn default() -> Self {
        Measurements {
            page_view: "pf_analytics".to_owned(),
            event: "pf_analytics_event".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::beacon::parse_beacon;

    fn beacon(domain: &str, event: Option<&str>) -> Beacon<'static> {
        let event = event.map_or(String::new(), |e| format!(r#","event":"{e}""#));
        let body = format!(r#"{{"domain":"{domain}","page":"/"{event}}}"#);
        parse_beacon(body.as_bytes()).unwrap().into_owned()
    }

    #[test]
    fn snippet_copies_only_values_that_need_cleaning() {
        let long = "é".repeat(70);
        for (value, borrowed) in [
            ("socialclick", true),
            ("", true),
            ("a\nb\u{7f}c", false),
            (&long[..128], true),
            (&long[..], false),
            ("x\u{1b}[31m", false),
        ] {
            let got = snippet(value);
            let expected: String = value
                .chars()
                .filter(|&c| !is_control(c))
                .take(MAX_SNIPPET_CHARS)
                .collect();
            assert_eq!(got, expected, "{value:?}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), borrowed, "{value:?}");
        }
    }

    #[test]
    fn event_names_are_split_lowercased_and_validated() {
        for (arg, expected) in [
            ("signup", Ok(vec!["signup"])),
            ("socialClick,Signup", Ok(vec!["socialclick", "signup"])),
            ("a, b ,c\td\n e", Ok(vec!["a", "b", "c", "d", "e"])),
            (",,a,,", Ok(vec!["a"])),
            ("a a A", Ok(vec!["a"])),
            ("ns:event.sub-name_2", Ok(vec!["ns:event.sub-name_2"])),
            ("", Ok(vec![])),
            (" , ", Ok(vec![])),
            ("Foo,Bar!", Err("invalid event name \"Bar!\"")),
            ("ok,caf\u{e9}", Err("invalid event name \"caf\u{e9}\"")),
            ("a\u{1}b", Err("invalid event name \"a?b\"")),
            ("x=1", Err("invalid event name \"x=1\"")),
        ] {
            let expected = expected
                .map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .map_err(str::to_owned);
            assert_eq!(parse_event_names(arg), expected, "{arg:?}");
        }
        let max = "e".repeat(64);
        assert_eq!(parse_event_names(&max), Ok(vec![max.clone()]));
        let long = "e".repeat(65);
        let err = parse_event_names(&long).unwrap_err();
        assert!(err.starts_with("invalid event name \"eee"), "{err}");
        assert!(err.len() < 100, "{err}");
    }

    #[test]
    fn push_event_names_appends_without_duplicates() {
        let mut list = Vec::new();
        push_event_names(&mut list, "a,b").unwrap();
        push_event_names(&mut list, "B c").unwrap();
        assert_eq!(list, ["a", "b", "c"]);
        assert!(push_event_names(&mut list, "d bad!").is_err());
    }

    #[test]
    fn domain_patterns_parse() {
        use DomainPattern::*;
        let bad = |p: &str| Err(format!("invalid domain pattern \"{p}\""));
        let star = |p: &str| {
            Err(format!(
                "invalid domain pattern \"{p}\": \"*\" is only allowed as a \"*.\" prefix"
            ))
        };
        for (arg, expected) in [
            ("example.com", Ok(Exact("example.com".into()))),
            ("Example.COM.", Ok(Exact("example.com".into()))),
            ("*.example.com", Ok(Subdomains("example.com".into()))),
            (
                ".example.com",
                Ok(DomainAndSubdomains("example.com".into())),
            ),
            ("localhost", Ok(Exact("localhost".into()))),
            ("", bad("")),
            ("*", star("*")),
            ("*.", bad("*.")),
            (".", bad(".")),
            ("*example.com", star("*example.com")),
            ("www.*.com", star("www.*.com")),
            ("*.*.example.com", star("*.*.example.com")),
            ("..example.com", bad("..example.com")),
            ("a..com", bad("a..com")),
            ("example.com:80", bad("example.com:80")),
            ("exa_mple.com", bad("exa_mple.com")),
        ] {
            assert_eq!(DomainPattern::parse(arg), expected, "{arg:?}");
        }
    }

    #[test]
    fn domain_patterns_match() {
        for (pattern, host, expected) in [
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com.", true),
            ("example.com", "www.example.com", false),
            ("example.com", "example.co", false),
            ("*.example.com", "www.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "WWW.Example.Com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*.example.com", "www.example.com.evil", false),
            (".example.com", "example.com", true),
            (".example.com", "www.example.com", true),
            (".example.com", "badexample.com", false),
            (".example.com", "", false),
            ("example.com", "", false),
            ("*.example.com", "é.example.com", true),
            ("*.example.com", "ééééééééééé", false),
        ] {
            let p = DomainPattern::parse(pattern).unwrap();
            assert_eq!(p.matches(host), expected, "{pattern} vs {host:?}");
        }
    }

    #[test]
    fn host_without_port_strips_ports() {
        for (host, expected) in [
            ("Example.COM:8080", "Example.COM"),
            ("example.com", "example.com"),
            ("example.com:", "example.com"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
            ("[::1", "[::1"),
            ("::1", "::1"),
            ("example.com:http", "example.com:http"),
            ("", ""),
            ("é:1", "é"),
        ] {
            assert_eq!(host_without_port(host), expected, "{host:?}");
        }
    }

    #[test]
    fn domain_is_checked_before_event() {
        let events = vec!["signup".to_owned()];
        let accepted = [
            DomainPattern::parse("example.com").unwrap(),
            DomainPattern::parse("*.example.org").unwrap(),
        ];
        let refuse_domain = |d: &str| Err(Refusal::DomainNotAccepted(d.to_owned()));
        let refuse_event = |e: &str| Err(Refusal::EventNotPermitted(e.to_owned()));
        for (domain, event, accepted, host, expected) in [
            // Without a list, only the request's own host is accepted.
            ("example.com", None, None, "example.com", Ok(())),
            ("example.com", None, None, "Example.COM:8443", Ok(())),
            ("example.com", None, None, "example.com.", Ok(())),
            (
                "example.com",
                None,
                None,
                "www.example.com",
                refuse_domain("example.com"),
            ),
            ("example.com", None, None, "", refuse_domain("example.com")),
            ("example.com", Some("signup"), None, "example.com", Ok(())),
            ("example.com", Some("SignUp"), None, "example.com", Ok(())),
            (
                "example.com",
                Some("other"),
                None,
                "example.com",
                refuse_event("other"),
            ),
            (
                "evil.com",
                Some("other"),
                None,
                "example.com",
                refuse_domain("evil.com"),
            ),
            // With a list, the request host does not matter.
            (
                "example.com",
                None,
                Some(&accepted[..]),
                "other.net",
                Ok(()),
            ),
            (
                "www.example.org",
                Some("signup"),
                Some(&accepted[..]),
                "x",
                Ok(()),
            ),
            (
                "example.org",
                None,
                Some(&accepted[..]),
                "example.org",
                refuse_domain("example.org"),
            ),
            (
                "example.com",
                Some("x"),
                Some(&accepted[..]),
                "",
                refuse_event("x"),
            ),
            (
                "example.com",
                None,
                Some(&[][..]),
                "example.com",
                refuse_domain("example.com"),
            ),
        ] {
            let b = beacon(domain, event);
            let got = check_policy(&b, &events, accepted, host);
            assert_eq!(got, expected, "{domain} {event:?} {host}");
        }
    }

    #[test]
    fn empty_event_list_permits_no_event_but_all_page_views() {
        let page_view = beacon("example.com", None);
        assert_eq!(check_policy(&page_view, &[], None, "example.com"), Ok(()));
        let event = beacon("example.com", Some("signup"));
        assert_eq!(
            check_policy(&event, &[], None, "example.com"),
            Err(Refusal::EventNotPermitted("signup".into()))
        );
    }

    #[test]
    fn refusals_quote_sanitized_short_values() {
        let body = format!(
            r#"{{"domain":"example.com","page":"/","event":"a\u0000b\nc{}"}}"#,
            "x".repeat(59)
        );
        let event = parse_beacon(body.as_bytes()).unwrap();
        let err = check_policy(&event, &[], None, "example.com").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("event \"abc{}\" is not permitted", "x".repeat(59))
        );
        assert_eq!(
            Refusal::DomainNotAccepted("evil.com".into()).to_string(),
            "domain \"evil.com\" is not accepted"
        );
    }

    #[test]
    fn sanitize_snippet_removes_controls_and_caps_length() {
        for (value, expected) in [
            ("plain", "plain".to_owned()),
            ("a\r\nb\tc\u{7f}d\u{85}e\u{2028}f", "abcdef".to_owned()),
            (&"é".repeat(100), "é".repeat(64)),
        ] {
            assert_eq!(sanitize_snippet(value), expected, "{value:?}");
        }
    }

    #[test]
    fn measurement_names() {
        for (name, expected) in [
            ("pf_analytics", Ok(())),
            ("pf_analytics_event", Ok(())),
            ("Web.Stats-2", Ok(())),
            ("a", Ok(())),
            ("", Err("invalid measurement name \"\": must not be empty")),
            (
                "_internal",
                Err("invalid measurement name \"_internal\": must not start with \"_\" or \"-\""),
            ),
            (
                "-x",
                Err("invalid measurement name \"-x\": must not start with \"_\" or \"-\""),
            ),
            (
                "a b",
                Err("invalid measurement name \"a b\": may only contain [A-Za-z0-9_.-]"),
            ),
            (
                "a,b",
                Err("invalid measurement name \"a,b\": may only contain [A-Za-z0-9_.-]"),
            ),
            (
                "a\nb",
                Err("invalid measurement name \"a?b\": may only contain [A-Za-z0-9_.-]"),
            ),
        ] {
            assert_eq!(
                validate_measurement_name(name),
                expected.map_err(str::to_owned),
                "{name:?}"
            );
        }
        assert_eq!(validate_measurement_name(&"m".repeat(64)), Ok(()));
        assert!(validate_measurement_name(&"m".repeat(65)).is_err());
    }

    #[test]
    fn default_measurements() {
        let m = Measurements::default();
        assert_eq!(
            (m.page_view.as_str(), m.event.as_str()),
            ("pf_analytics", "pf_analytics_event")
        );
        assert_eq!(validate_measurement_name(&m.page_view), Ok(()));
        assert_eq!(validate_measurement_name(&m.event), Ok(()));
    }
}
